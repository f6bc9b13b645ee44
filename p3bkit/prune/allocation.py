"""Allocations: keep ratios κ per branch from what the pruner measured (Appendix A), one class each.

`p3b` (the paper's): block importance per unit of cost, smoothed by an EMA, κᵢ = clip(λ·Iᵢ, 0, 1)
with λ solved so that Σᵢ κᵢ·costᵢ meets the budget; saturated branches are fixed at 1 and the
rest re-solved. `uniform`: equal κ. `global-magnitude`: one weight-magnitude threshold across all
branches (a baseline). `fixed`: handcrafted κ (ablations). An allocation also says how the
elements inside a branch are ranked (`local_scores`): Taylor ranks, or weight magnitude.

A branch emptied at a mask update is disabled — κ = 0 from then on, outside the mean and the
allocation: it has no kept elements to rank, so regrowing it would pick its units without
information (measured on digits, disabling beats letting it regrow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from p3bkit.prune.importance import GATE_FACTORS, ImportanceEMA, block_importance, magnitude_scores, taylor_scores


def allocate_keep_ratios(importance: torch.Tensor, sizes: torch.Tensor, keep: float,
                         disabled: torch.Tensor | None = None) -> torch.Tensor:
    """κ = clip(λ·I, 0, 1) with Σ κ·|W| = keep·Σ|W|; saturated branches fixed at 1, the rest re-solved.

    Disabled branches are fixed at κ = 0; their share goes to the others.
    """
    importance, sizes = importance.double().clamp(min=0), sizes.double()
    budget = keep * sizes.sum()
    kappa = torch.zeros_like(importance)
    free = sizes > 0
    if disabled is not None:
        free &= ~disabled.bool()
    for _ in range(len(importance) + 1):
        rest = budget - (kappa * sizes)[~free].sum()
        weight = (importance * sizes)[free].sum()
        if weight <= 0:  # no signal left: spread the rest uniformly over the free branches
            kappa[free] = (rest / sizes[free].sum()).clamp(0, 1)
            break
        kappa[free] = rest / weight * importance[free]
        over = free & (kappa > 1)
        if not over.any():
            break
        kappa[over] = 1.0
        free &= ~over
    return kappa.clamp(0, 1).float()


def ramp(target: torch.Tensor, progress: float, disabled: torch.Tensor | None = None) -> torch.Tensor:
    """Keep ratios during sparsify: linear from 1 (progress 0) to the target (progress 1).

    Disabled branches stay at 0 (ramping them back up would regrow them without information).
    """
    p = min(max(progress, 0.0), 1.0)
    out = 1.0 - p * (1.0 - target)
    return out if disabled is None else torch.where(disabled.bool(), torch.zeros_like(out), out)


@dataclass
class AllocationInput:
    """What the pruner measured since the last mask update, and the costs it allocates."""

    delta_c: torch.Tensor  # mean ΔΨᶜ per branch
    delta_p: torch.Tensor  # mean ΔΨᵖ per branch
    kept: torch.Tensor  # cost of every branch at its current kept width
    full: torch.Tensor  # cost at full width
    unit: torch.Tensor  # cost of one unit (head dim / hidden unit) at full width
    disabled: torch.Tensor  # bool: branches out of the allocation for good
    budget: float  # fraction of Σ full to keep
    curves: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]  # per branch: (scores best first, cost of top k)


class Allocation:
    """Turns measurements into target keep ratios; ranks elements inside a branch."""

    name: ClassVar[str]
    disables_empty: ClassVar[bool] = True  # emptied branches leave the allocation for good

    def __init__(self, gate_factors: dict[str, float] | None = None) -> None:
        self.gate_factors = dict(gate_factors or GATE_FACTORS)

    def local_scores(self, branch) -> torch.Tensor:
        """I_cat: the branch's gate elements, higher = keep first (Taylor ranks × gate factors)."""
        return taylor_scores(branch.gates(), self.gate_factors)

    def targets(self, inp: AllocationInput) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


ALLOCATIONS: dict[str, type[Allocation]] = {}


def register(cls: type[Allocation]) -> type[Allocation]:
    ALLOCATIONS[cls.name] = cls
    return cls


@register
class P3BAllocation(Allocation):
    """The paper's: γ(ΔΨ) per unit of cost, α-merged, EMA-smoothed, κ solved with clipping."""

    name = "p3b"

    def __init__(self, gate_factors=None, alpha: float = 0.5, smoothing: float = 10.0, ema_momentum: float = 0.2) -> None:
        super().__init__(gate_factors)
        self.alpha, self.smoothing = alpha, smoothing
        self.ema = ImportanceEMA(ema_momentum)

    def targets(self, inp: AllocationInput) -> torch.Tensor:
        imp = block_importance(inp.delta_c, inp.delta_p, inp.kept, self.alpha, self.smoothing, inp.unit, ~inp.disabled)
        return allocate_keep_ratios(self.ema.update(imp.double()), inp.full, inp.budget, inp.disabled)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])


@register
class UniformAllocation(Allocation):
    """The same κ for every branch (Taylor ranks inside each)."""

    name = "uniform"

    def targets(self, inp: AllocationInput) -> torch.Tensor:
        return allocate_keep_ratios(torch.ones(len(inp.full)), inp.full, inp.budget, inp.disabled)


@register
class GlobalMagnitudeAllocation(Allocation):
    """One threshold θ on mean-square weight magnitude across all branches, meeting the budget."""

    name = "global-magnitude"

    def local_scores(self, branch) -> torch.Tensor:
        return magnitude_scores(branch, branch.gates())

    def targets(self, inp: AllocationInput) -> torch.Tensor:
        curves = inp.curves()
        everything = torch.sort(torch.cat([c[0] for c in curves]), descending=True).values
        budget = inp.budget * float(inp.full.sum())

        def kept_cost(theta: float) -> list[float]:
            return [float(cost[int((sc >= theta).sum())]) for sc, cost in curves]

        lo, hi = 0, len(everything) - 1  # find the largest index whose threshold stays within budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(kept_cost(float(everything[mid]))) <= budget else (lo, mid - 1)
        costs = torch.tensor(kept_cost(float(everything[lo])), dtype=torch.float64)
        return (costs / inp.full).float()


class FixedAllocation(Allocation):
    """Handcrafted κ per branch (ablations and tests); nothing is disabled."""

    name = "fixed"
    disables_empty = False

    def __init__(self, keep_ratios: list[float], gate_factors=None) -> None:
        super().__init__(gate_factors)
        self.keep_ratios = list(keep_ratios)

    def targets(self, inp: AllocationInput) -> torch.Tensor:
        return torch.tensor(self.keep_ratios, dtype=torch.float32)


def make_allocation(cfg) -> Allocation:
    """The allocation a `P3BConfig` asks for."""
    if cfg.keep_ratios is not None:
        return FixedAllocation(cfg.keep_ratios, cfg.gate_factors)
    if cfg.allocation == "p3b":
        return P3BAllocation(cfg.gate_factors, cfg.alpha, cfg.smoothing, cfg.ema_momentum)
    return ALLOCATIONS[cfg.allocation](cfg.gate_factors)
