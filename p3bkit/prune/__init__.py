"""P3B: the pruner (`pruner`), its importance criteria (`bpi`, `importance`), allocations
(`allocation`), cost models (`costs`: parameters or predicted ms), soft masks (`masks`), the phase
schedule and recipes, and the `p3bkit prune` / `p3bkit analyze` jobs (`job`, `analyze`)."""
