"""Pruning settings as plain data, the one place they are declared: `PruneJob` (a `p3bkit prune`
run) holding `P3BConfig` (the engine's; defaults: the paper's Table 5), their choices and the gate
factors. `p3bkit prune` builds its options' defaults and choices from here; a recipe
(`prune.recipes`) fills the schedule settings the user leaves unset.

Kept free of torch so the command line can show these defaults without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from p3bkit.train.distill import AUTO, KD_TEMPERATURE, KD_WEIGHT

# upstream defaults: favour keeping residual writes, prune MLP hidden units first
GATE_FACTORS: dict[str, float] = {"in": 1.0, "heads": 1.0, "head_dim": 1.0, "out": 1.5, "hidden": 0.75}

ClassHead = Literal["linear", "norm-linear"]
AllocationName = Literal["p3b", "uniform", "global-magnitude"]  # prune.allocation.ALLOCATIONS registers each
BudgetScope = Literal["total", "blocks"]
EmptyBlocks = Literal["disable", "regrow"]
StructureName = Literal["full", "inner", "heads"]  # models.gates.Structure
IoModeName = Literal["auto", "index", "dense"]  # surgery.IoMode


def choices(kind) -> list[str]:
    """The values a Literal setting takes, for the command line's choices."""
    return list(get_args(kind))


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
    # back once its gradient is twice a kept one's; at 90% on digits (5 seeds) it gained 0.33 points in
    # benchmarks/results/accuracy_digits.md and lost 0.72 under an earlier recipe, so the paper's
    # (m·∂L/∂m)², 0, which prunes more whole heads (faster models), stays
    head_score_floor: float = 0.0


@dataclass
class PruneJob:
    """Everything a `p3bkit prune` run needs (plain data, stored in summary.json)."""

    out: str
    recipe: str = "quick"  # recorded; the CLI fills unset settings from it (prune.recipes)
    model: str = "digits-vit"
    model_kwargs: dict = field(default_factory=dict)  # timm constructor arguments (img_size, num_classes, …)
    pretrained: bool = False
    pretrained_file: str | None = None  # local weights through timm's loader (classifier re-initialised if needed)
    weights: str | None = None  # a weights file of exactly this model, loaded strictly
    data: str | None = None  # None: the embedded digits set, for the digits presets only
    augment: str = "auto"  # deit | light | none | auto (data.transforms.resolve_augment)
    epochs: tuple[int, int, int] = (1, 4, 4)  # warm-up, sparsify, sharpen
    batch_size: int = 64
    structure: StructureName = "heads"  # whole heads + head dims + MLP hidden (with branch removal): README, results
    round_to: int = 1
    io_mode: IoModeName = "auto"
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    distill_teacher: str | None = None
    teacher_weights: str | None = None
    teacher: str = AUTO  # logit distillation while pruning (train.distill): auto (the starting model), none or a path
    kd_weight: float = KD_WEIGHT
    kd_temperature: float = KD_TEMPERATURE
    progress: bool = True
    keep_checkpoint: bool = False  # a finished run removes checkpoint.pt unless asked to keep it
    latency_table: str | None = None  # latency budget: the table (p3bkit latency-table) and p3b.target_ms …
    workers: int = 0  # data-loading processes
    accept_table_error: bool = False  # use a table whose checked median error is above MAX_CHECK_ERROR
    target_speedup: float | None = None  # … or a speedup over the table's measured dense model
    speed_checks: int = 3  # a latency target's architecture timed during sparsify, the target corrected (prune.speed)
    stop_after_epoch: int | None = None  # testing hook: end the run early, as a crash would
    train_images: int | None = None  # prune on the first N training images only (a quick allocation search)
    p3b: P3BConfig = field(default_factory=P3BConfig)
