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

from p3bkit.errors import P3BError
from p3bkit.prune.config import GATE_FACTORS
from p3bkit.prune.importance import ImportanceEMA, block_importance, magnitude_scores, taylor_scores


def allocate_keep_ratios(
    importance: torch.Tensor,
    sizes: torch.Tensor,
    keep: float,
    disabled: torch.Tensor | None = None,
    cap: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """κ = clip(λ·I, 0, cap) with Σ κ·|W| = keep·Σ|W|; saturated branches fixed at their cap (1 by
    default), the rest re-solved until valid (Appendix A).

    Disabled branches are fixed at κ = 0; their share goes to the others. `floor` (a cost per
    branch) mirrors the clip at the cap: a branch whose κ·|W| falls below it is fixed at κ = 0 and
    the others are re-solved — it is removed rather than kept at a width too small to be useful.
    When the floor's removals would leave branches that cannot hold the budget, the loop stops: a
    narrow branch beats missing the budget (or an empty model). `minimum` (a κ per branch) is the
    other answer to the same problem, for branches that stay: κ = clip(λ·I, minimum, cap), so the
    narrowest width a kept branch can have is paid for inside the budget (`_clipped`).
    """
    importance, sizes = importance.double().clamp(min=0), sizes.double()
    cap = torch.ones_like(sizes) if cap is None else cap.double()
    budget = keep * sizes.sum()
    kappa = torch.zeros_like(importance)
    free = sizes > 0
    if disabled is not None:
        free &= ~disabled.bool()
    if minimum is not None:
        kappa[free] = _clipped(
            importance[free], sizes[free], float(budget), minimum.double()[free].minimum(cap[free]), cap[free]
        )
        return kappa.float()
    for _ in range(2 * len(importance) + 2):
        rest = budget - (kappa * sizes)[~free].sum()
        weight = (importance * sizes)[free].sum()
        if weight <= 0:  # no signal left: spread the rest uniformly over the free branches
            kappa[free] = (rest / sizes[free].sum()).clamp(0, 1) if free.any() else kappa[free]
            break
        kappa[free] = rest / weight * importance[free]
        over = free & (kappa > cap)
        if over.any():
            kappa[over] = cap[over]
            free &= ~over
            continue
        if floor is None:
            break
        under = free & (kappa * sizes < floor)
        if not under.any():
            break
        smallest = torch.where(under, kappa * sizes / floor.clamp(min=1e-12), torch.full_like(kappa, float("inf")))
        worst = int(torch.argmin(smallest))  # one at a time: removing one frees budget for the others
        others = free.clone()
        others[worst] = False
        if float((cap * sizes)[others].sum()) < float(rest):
            break  # the others could not hold the budget: a narrow branch beats missing it (or an empty model)
        kappa[worst] = 0.0
        free[worst] = False
    return kappa.clamp(min=0).minimum(cap).float()


def _clipped(
    importance: torch.Tensor, sizes: torch.Tensor, budget: float, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """κ = clip(λ·I, low, high) with Σ κ·|W| = budget, λ by bisection (Σ rises with λ). When even
    the lows exceed the budget they are scaled down to it (a narrow branch beats missing it)."""

    def total(lam: float) -> float:
        return float((torch.maximum(torch.minimum(lam * importance, high), low) * sizes).sum())

    if importance.numel() == 0:
        return low
    if float(importance.sum()) <= 0:  # no signal: spread by size, like the loop above
        importance = torch.ones_like(importance)
    floor_cost = float((low * sizes).sum())
    if floor_cost >= budget:
        return low * (budget / floor_cost) if floor_cost > 0 else low
    if float((high * sizes).sum()) <= budget:
        return high
    lo, hi = 0.0, 1.0
    while total(hi) < budget:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < budget else (lo, mid)
    return torch.maximum(torch.minimum(hi * importance, high), low)


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
    useful: torch.Tensor | None = None  # the smallest useful cost of each branch (below it: removed)
    full_window: bool = True  # the measurements average a whole update window
    removals_open: bool = True  # while sparsify runs; after it (sharpen, the last update) removals are settled

    def useful_widths(self) -> torch.Tensor:
        """`useful`, which removal decisions need (they are made only when it is given)."""
        if self.useful is None:
            raise RuntimeError("removal decisions need the branches' smallest useful costs")
        return self.useful


class Allocation:
    """Turns measurements into target keep ratios; ranks elements inside a branch."""

    name: ClassVar[str]
    disables_empty: ClassVar[bool] = True  # emptied branches leave the allocation for good

    def __init__(self, gate_factors: dict[str, float] | None = None) -> None:
        self.gate_factors = dict(gate_factors or GATE_FACTORS)

    @classmethod
    def from_config(cls, cfg) -> Allocation:
        """This allocation with the settings of a `P3BConfig`."""
        return cls(cfg.gate_factors)

    def local_scores(self, branch) -> torch.Tensor:
        """I_cat: the branch's gate elements, higher = keep first (Taylor ranks × gate factors)."""
        return taylor_scores(branch.gates(), self.gate_factors)

    def gate_masses(self, branch) -> dict[str, torch.Tensor]:
        """Each gate element's importance as an additive amount (√ of its mean Taylor score, the
        magnitude of its first-order loss change), to weigh whole heads against head dims."""
        return {k: g.scores().double().cpu().sqrt() for k, g in branch.gates().items()}

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
    """The paper's: γ(ΔΨ) per unit of cost, α-merged, EMA-smoothed, κ solved with clipping.

    With `remove_below` > 0 a branch may be removed (κ = 0): the decision uses γ per *full* cost
    (importance per kept cost rises as a branch shrinks, which keeps every branch alive), solved
    with a floor at each branch's smallest useful cost. A window counts against a branch only when
    both the smoothed importance and this window's own put it below the floor (the EMA alone still
    carries the first window's weight for several updates), and `patience` such windows in a row
    remove it. Removal is reversible while sparsify runs: a removed branch still computes (its
    soft masks ramp down), is measured, and comes back when both put it at `restore_margin` times
    its useful cost or more. Once sparsify is over the set is settled, once: only if the branches
    left could not meet the budget even at their smallest useful widths are the least important
    of them removed (the budget is what the user asked for), and then it is frozen — no decision
    is made in sharpen or at the last, hard update, where no training follows to check it.
    A removed branch ramps down like any other during sparsify. An emptied branch that may regrow
    (`--empty-blocks regrow`) comes back at most at its smallest useful width per update.
    """

    name = "p3b"

    @classmethod
    def from_config(cls, cfg) -> Allocation:
        return cls(cfg.gate_factors, cfg.alpha, cfg.smoothing, cfg.ema_momentum, cfg.remove_below, cfg.removal_patience)

    restore_margin: ClassVar[float] = 2.0  # hysteresis: back at twice the useful cost, removed below it

    def __init__(
        self,
        gate_factors=None,
        alpha: float = 0.5,
        smoothing: float = 10.0,
        ema_momentum: float = 0.2,
        remove_below: float = 0.0,
        patience: int = 2,
    ) -> None:
        super().__init__(gate_factors)
        self.alpha, self.smoothing, self.remove_below, self.patience = alpha, smoothing, remove_below, patience
        self.ema = ImportanceEMA(ema_momentum)
        self.ema_full = ImportanceEMA(ema_momentum)  # γ per full cost: the removal decision
        self.streak: torch.Tensor | None = None  # consecutive updates each branch was below its useful width
        self.removed: torch.Tensor | None = None
        self.settled = False

    def _smoothed(self, ema: ImportanceEMA, imp: torch.Tensor, full_window: bool) -> torch.Tensor:
        """EMA of importance; a partial window (fewer steps than an update) never seeds it."""
        if ema.value is None and not full_window:
            return imp.double()
        return ema.update(imp.double())

    def targets(self, inp: AllocationInput) -> torch.Tensor:
        active = ~inp.disabled
        imp = block_importance(inp.delta_c, inp.delta_p, inp.kept, self.alpha, self.smoothing, inp.unit, active)
        imp = self._smoothed(self.ema, imp, inp.full_window)
        n = len(inp.full)
        if self.removed is None:
            self.streak, self.removed = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        if self.remove_below > 0 and inp.useful is not None:
            if inp.removals_open:
                self._decide_removals(inp, active)
            elif not self.settled:
                self._settle_removals(inp, active)
        regrowing = (inp.kept == 0) & active & ~self.removed
        smallest = (inp.useful if inp.useful is not None else inp.unit) / inp.full
        cap = torch.where(regrowing, smallest, torch.ones_like(inp.full))
        # a branch that stays keeps at least its smallest useful width (the masks round κ·cost up to
        # one unit anyway): paid for here, so the others meet the budget
        minimum = smallest if self.remove_below > 0 else None
        return allocate_keep_ratios(imp, inp.full, inp.budget, inp.disabled | self.removed, cap=cap, minimum=minimum)

    def _decisions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(removed, streak): the removal state `targets` creates at its first call."""
        if self.removed is None or self.streak is None:
            raise RuntimeError("removal decisions before the first allocation")
        return self.removed, self.streak

    def _decide_removals(self, inp: AllocationInput, active: torch.Tensor) -> None:
        """Remove a branch after `patience` windows below its useful cost; restore one well above it.

        Removed branches compete in these two allocations like the others (only disabled ones are
        out), so a branch that became useful again is seen as such.
        """
        removed, streak = self._decisions()
        now = block_importance(inp.delta_c, inp.delta_p, inp.full, self.alpha, self.smoothing, inp.unit, active)
        smooth = self._smoothed(self.ema_full, now, inp.full_window)
        kept = [
            allocate_keep_ratios(imp, inp.full, inp.budget, inp.disabled, floor=inp.useful).double() * inp.full
            for imp in (smooth, now.double())
        ]
        below = (kept[0] == 0) & (kept[1] == 0) & active
        self.streak = streak = torch.where(below & ~removed, streak + 1, torch.zeros_like(streak))
        budget = inp.budget * float(inp.full.sum())
        for i in torch.argsort(smooth, stable=True).tolist():  # least important first
            stays = active & ~removed
            stays[i] = False
            if streak[i] >= self.patience and not removed[i] and float(inp.full[stays].sum()) >= budget:
                removed[i] = True  # never past what the branches left can hold
        restore_at = torch.minimum(self.restore_margin * inp.useful_widths(), inp.full)
        back = removed & active & torch.stack([k >= restore_at for k in kept]).all(0)
        removed &= ~back

    def _settle_removals(self, inp: AllocationInput, active: torch.Tensor) -> None:
        """After sparsify: bring back the most important removed branches while the kept ones could
        not hold the budget even at full width, remove the least important kept ones (γ per full cost,
        smoothed) while they cannot fit it at their smallest useful widths; then no more decisions."""
        self.settled = True
        removed, _ = self._decisions()
        imp = (
            self.ema_full.value
            if self.ema_full.value is not None
            else block_importance(inp.delta_c, inp.delta_p, inp.full, self.alpha, self.smoothing, inp.unit, active)
        )
        kept = active & ~removed
        budget = inp.budget * float(inp.full.sum())
        for i in torch.argsort(imp.double(), descending=True, stable=True).tolist():  # most important first
            if float(inp.full[kept].sum()) >= budget:
                break
            if removed[i] and active[i]:  # removals over several windows left too little to hold the budget
                kept[i], removed[i] = True, False
        for i in torch.argsort(imp.double(), stable=True).tolist():
            if float(inp.useful_widths()[kept].sum()) <= budget or int(kept.sum()) <= 1:
                break
            if kept[i]:
                kept[i] = False
                removed[i] = True

    def state_dict(self) -> dict:
        return {
            "ema": self.ema.state_dict(),
            "ema_full": self.ema_full.state_dict(),
            "streak": self.streak,
            "removed": self.removed,
            "settled": self.settled,
        }

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.ema_full.load_state_dict(state["ema_full"])
        self.streak, self.removed = state["streak"], state["removed"]
        self.settled = state.get("settled", False)


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

    def gate_masses(self, branch) -> dict[str, torch.Tensor]:
        mags = branch.magnitudes()
        return {k: mags[k].double().cpu() for k in branch.gates()}

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
    """The allocation a `P3BConfig` asks for (handcrafted keep ratios take precedence)."""
    if cfg.keep_ratios is not None:
        return FixedAllocation(cfg.keep_ratios, cfg.gate_factors)
    if cfg.allocation not in ALLOCATIONS:
        raise P3BError(f"unknown allocation {cfg.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
    return ALLOCATIONS[cfg.allocation].from_config(cfg)
