"""Pruning settings as plain data: `P3BConfig` (defaults: the paper's Table 5) and the gate factors.

Kept free of torch so the command line can show these defaults without importing it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# upstream defaults: favour keeping residual writes, prune MLP hidden units first
GATE_FACTORS: dict[str, float] = {"in": 1.0, "heads": 1.0, "head_dim": 1.0, "out": 1.5, "hidden": 0.75}

ClassHead = Literal["linear", "norm-linear"]
AllocationName = str  # a name in prune.allocation.ALLOCATIONS (p3b, uniform, global-magnitude)
BudgetScope = Literal["total", "blocks"]
EmptyBlocks = Literal["disable", "regrow"]


@dataclass
class P3BConfig:
    """Pruning hyper-parameters; defaults are the paper's Table 5 (epochs set by the trainer)."""

    keep: float = 0.5
    budget: BudgetScope = "total"  # keep is a fraction of all parameters (the paper's), or of branch parameters
    update_every: int = 1000
    alpha: float = 0.5
    tau: float = 0.1
    m_ref: float = 0.9
    smoothing: float = 10.0
    ema_momentum: float = 0.2
    lr_model: float = 5e-4
    lr_bpi: float = 5e-4
    weight_decay: float = 0.05
    frozen: bool = False  # Appendix G: model lr 1e-8, so Taylor scores still get gradients
    empty_blocks: EmptyBlocks = "disable"  # an emptied branch stays empty, or may regrow (prune.allocation)
    bpi_class_head: ClassHead = "linear"  # the paper's Linear, or LayerNorm + Linear
    allocation: AllocationName = "p3b"
    keep_ratios: list[float] | None = None  # handcrafted per-branch κ (ablations)
    target_ms: float | None = None  # latency budget (needs a LatencyTable; `keep` is then unused …
    keep_too: bool = False  # … unless this is set: the parameter budget `keep` holds as well (prune.pruner)
    gate_factors: dict[str, float] = field(default_factory=lambda: dict(GATE_FACTORS))
    remove_below: float = 0.05  # remove a branch whose share would be below this fraction of its full cost
    removal_patience: int = 2  # ... for this many consecutive mask updates
    bpi_fraction: float = 0.125  # the share of each batch the indicators see (ΔΨ is an average anyway)
    head_weight: float = 1.0  # how much more a kept fraction of head importance counts than one of head-dim importance
    # heads are scored as if their mask were at least this (models.gates.Gate): ½ lets a pruned head come
    # back once its gradient is twice a kept one's, but lost 0.4–0.8 points at 90% on digits (5 seeds:
    # benchmarks/results/accuracy_digits_decisions.md); 0, the paper's (m·∂L/∂m)², won there
    head_score_floor: float = 0.0
