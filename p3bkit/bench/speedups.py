"""Does P3B's latency allocation land on the speedup it was asked for? (`benchmarks/latency_tables.py`)

For each asked speedup, P3B's latency allocation (importance from random ΔΨ and Taylor scores:
this checks the latency side, not accuracy) chooses an architecture from the table, with and
without speed checks (`prune.speed`); the chosen models are exported and timed beside the dense
model, each in a process of its own.
"""

from __future__ import annotations

import copy

import torch

from p3bkit.latency.measure import TableConfig
from p3bkit.latency.table import LatencyTable
from p3bkit.models.adapter import TimmModule


def allocate_for_speedup(
    model: TimmModule,
    table: LatencyTable,
    speedup: float,
    seed: int,
    structure: str = "inner",
    remove_below: float = 0.0,
    target_ms: float | None = None,
) -> TimmModule:
    """P3B's latency allocation for `speedup` over the table's dense model, from random measurements
    (`structure` heads and `remove_below` > 0: whole heads and branches too); `target_ms`: allocate
    for this target instead (a speed check's correction)."""
    from p3bkit.models import add_gates
    from p3bkit.prune.pruner import P3BConfig, P3BPruner
    from p3bkit.prune.schedule import Schedule
    from p3bkit.surgery import apply_surgery

    gated = add_gates(copy.deepcopy(model), structure)
    cfg = P3BConfig(target_ms=table.dense_ms / speedup, remove_below=remove_below, removal_patience=1)
    pruner = P3BPruner(gated, cfg, Schedule(0, 1, 0), latency_table=table)
    if target_ms is not None:
        pruner.retarget(target_ms)  # clamped as in a prune run
    gen = torch.Generator().manual_seed(seed)
    n = len(pruner.branches)
    delta_c, delta_p = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    scores = {name: torch.rand(g.size, generator=gen) for name, g in gated.gates.items()}  # unit choice is arbitrary
    pruner.record_measurements(delta_c, delta_p, scores)
    pruner.update_masks(step=pruner.schedule.total)  # the final update: κ at its target, hard masks
    return apply_surgery(gated.eval(), io_mode="auto")


def check_speedups(
    model: TimmModule,
    table: LatencyTable,
    cfg: TableConfig,
    speedups: list[float],
    structure: str = "inner",
    remove_below: float = 0.0,
    speed_checks: int = 0,
) -> list[dict]:
    """Allocate for each asked speedup, then time the result beside the dense model.

    `speed_checks` > 0: also allocate with that many speed checks (`prune.speed`: the allocated
    architecture timed beside the dense model, the target corrected by measured over asked speedup,
    allocated again, the same measurements each time). Per asked speedup the dense model, the
    table-only model and the checked one are timed in one process of their own, each by its speedup
    over the dense model round by round, timed again while the dense model runs > 10% slower than
    the table's (`prune.speed.steady_time`, as a prune's speed checks and its result are timed)."""
    from p3bkit.prune.speed import SpeedChecks, steady_time

    rows = []
    for i, s in enumerate(speedups):
        plain = allocate_for_speedup(model, table, s, i, structure, remove_below)
        models, history = [plain], []
        if speed_checks:
            checks, target, m = SpeedChecks(model, table, table.dense_ms / s, speed_checks, cfg.runs * 2), None, plain
            for _ in range(speed_checks):
                history.append(checks.check(m.p3b_arch.layers, target or table.dense_ms / s))
                target = history[-1]["target_ms_after"]
                m = allocate_for_speedup(model, table, s, i, structure, remove_below, target)
            models.append(m)
        dense, times, busy = steady_time(
            model, table, [m.p3b_arch.layers for m in models], cfg.runs * 2, table.dense_ms
        )
        row = {"asked": s, "host_busy": busy, **_result(model, table, plain, times[0], dense, s)}
        if speed_checks:
            row["with_checks"] = {**_result(model, table, models[1], times[1], dense, s), "checks": history}
        rows.append(row)
    return rows


def _result(model: TimmModule, table: LatencyTable, m: TimmModule, ms: float, dense: float, asked: float) -> dict:
    layers = m.p3b_arch.layers
    return {
        "measured_speedup": dense / ms,
        "predicted_ms": table.predict(layers),
        "measured_ms": ms,
        "dense_ms": dense,
        "miss": (dense / ms - asked) / asked,
        "head_dims": [len(l["attn"]["head_dim"]) if l["attn"] else 0 for l in layers],
        "heads": [
            len(l["attn"].get("heads", [])) or model.blocks[0].attn.num_heads if l["attn"] else 0 for l in layers
        ],
        "hidden": [len(l["mlp"]["hidden"]) if l["mlp"] else 0 for l in layers],
    }
