"""Block budgets: γ smoothing, importance per parameter, keep-ratio allocation (Appendix A).

Iᵗᵢ = γ(ΔΨᵗᵢ / max ΔΨᵗ) / (|wᵢ| + ε) per token type t ∈ {class, patch} (Eq. 2 and 8), each
normalised by its mean over blocks, merged Iᵢ = α·Iᶜᵢ + (1−α)·Iᵖᵢ (Eq. 3), smoothed across mask
updates by an EMA, and turned into keep ratios κᵢ = clip(λ·Iᵢ, 0, 1) with λ solved so that
Σᵢ κᵢ|Wᵢ| meets the model budget; blocks saturated at 1 are fixed and the rest re-solved.

The budget is a fraction of *all* parameters by default (the paper's Table 7 and the authors'
code): the parameters P3B does not prune (patch embedding, tokens, norms, head) are taken off
the total first and the rest is what the blocks share (`block_keep_ratio`).

Emptied blocks (Appendix A leaves |wᵢ| = 0 undefined): |wᵢ| is floored at the cost of one unit
of the block (a head dim or a hidden unit), so γ/(|w|+ε) cannot explode, and a block that was
emptied at a mask update is disabled — κ = 0 from then on, outside the mean and the
allocation. A disabled block has no kept elements to rank, so letting it regrow would pick its
units without information; measured on digits, disabling beats letting it regrow (README).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from p3bkit.errors import P3BError

EPS = 1e-8


def gamma(x: torch.Tensor, s: float = 10.0) -> torch.Tensor:
    """γ(x) = SP(1.4·s·x) − SP(1.4·s·x − s): ~0 for x ≤ 0, ~linear in between, capped near s."""
    return F.softplus(1.4 * s * x) - F.softplus(1.4 * s * x - s)


def token_importance(delta: torch.Tensor, kept_params: torch.Tensor, unit_cost: torch.Tensor | None = None,
                     s: float = 10.0, active: torch.Tensor | None = None) -> torch.Tensor:
    """γ(ΔΨ / max ΔΨ) / max(|w|, one unit), divided by its mean over the active blocks.

    Inactive (disabled) blocks get 0 and take no part in the max or the mean.
    """
    active = torch.ones_like(delta, dtype=torch.bool) if active is None else active.bool()
    delta = delta.double()
    peak = delta[active].max() if active.any() else delta.new_zeros(())
    scaled = delta / peak if peak > 0 else torch.zeros_like(delta)
    floor = unit_cost.double() if unit_cost is not None else torch.ones_like(delta)
    imp = gamma(scaled, s) / (torch.maximum(kept_params.double(), floor) + EPS)
    imp = torch.where(active, imp, torch.zeros_like(imp))
    mean = imp[active].mean() if active.any() else imp.new_ones(())
    return imp / mean.clamp(min=EPS)


def block_importance(delta_cls: torch.Tensor, delta_patch: torch.Tensor, kept_params: torch.Tensor,
                     alpha: float = 0.5, s: float = 10.0, unit_cost: torch.Tensor | None = None,
                     active: torch.Tensor | None = None) -> torch.Tensor:
    """Iᵢ = α·Iᶜᵢ + (1−α)·Iᵖᵢ."""
    c = token_importance(delta_cls, kept_params, unit_cost, s, active)
    p = token_importance(delta_patch, kept_params, unit_cost, s, active)
    return alpha * c + (1 - alpha) * p


def block_keep_ratio(keep: float, block_params: float, other_params: float, scope: str) -> float:
    """The fraction of block parameters to keep so that `keep` holds for the chosen scope.

    scope "total": keep·(blocks + other) − other over blocks (the paper's definition, where the
    unprunable parameters count against the budget); "blocks": `keep` itself.

    Raises:
        P3BError: when the unprunable parameters alone exceed the total budget.
    """
    if scope == "blocks":
        return keep
    if scope != "total":
        raise P3BError(f"budget scope must be 'total' or 'blocks', got {scope!r}")
    ratio = (keep * (block_params + other_params) - other_params) / block_params
    if ratio <= 0:
        raise P3BError(f"keeping {100 * keep:.1f}% of all {block_params + other_params:,.0f} parameters leaves nothing "
                       f"for the blocks: {other_params:,.0f} parameters (patch embedding, tokens, norms, head) are "
                       f"never pruned; raise --keep or use --budget blocks")
    return min(ratio, 1.0)


def allocate_keep_ratios(importance: torch.Tensor, sizes: torch.Tensor, keep: float,
                         disabled: torch.Tensor | None = None) -> torch.Tensor:
    """κ = clip(λ·I, 0, 1) with Σ κ·|W| = keep·Σ|W|; saturated blocks fixed at 1, the rest re-solved.

    Disabled blocks are fixed at κ = 0; their share goes to the others.
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
        if weight <= 0:  # no signal left: spread the rest uniformly over the free blocks
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

    Disabled blocks stay at 0 (ramping them back up would regrow them without information).
    """
    p = min(max(progress, 0.0), 1.0)
    out = 1.0 - p * (1.0 - target)
    return out if disabled is None else torch.where(disabled.bool(), torch.zeros_like(out), out)


class ImportanceEMA:
    """EMA of block importance across mask updates: I ← (1−m)·I + m·I_new (m = momentum)."""

    def __init__(self, momentum: float = 0.2) -> None:
        self.momentum = momentum
        self.value: torch.Tensor | None = None

    def update(self, new: torch.Tensor) -> torch.Tensor:
        self.value = new.clone() if self.value is None else (1 - self.momentum) * self.value + self.momentum * new
        return self.value

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.value = state["momentum"], state["value"]


class LatencyBudget:
    """Block costs in predicted milliseconds, from a latency table (models/latency.py; issue 12).

    The allocation is P3B's, with |Wᵢ| replaced by the branch's predicted time on the table's
    runtime: importance per millisecond, κᵢ as a fraction of the branch's full-width time, and the
    budget (target − the branch-free model's time) / Σ full-width branch times. Each branch's cost
    curve over kept units is non-decreasing, so the width chosen for a cost is the widest one at
    that cost: widths land at the right edge of the runtime's latency steps.
    """

    def __init__(self, gated, branches: list, table, target_ms: float) -> None:
        from p3bkit.models.gates import GatedAttention
        from p3bkit.models.latency import model_dims

        if table is None:
            raise P3BError("a latency budget needs a latency table (--latency-table, made by p3bkit latency-table)")
        if gated.structure != "inner":
            raise P3BError("latency budgets prune head dims and MLP hidden units: use --structure inner")
        table.check_model(model_dims(gated.spec))
        self.table, self.fixed_ms, self.target_ms = table, table.fixed_ms, target_ms
        self.curves = [torch.from_numpy(table.branch_curve("attn" if isinstance(b, GatedAttention) else "mlp",
                                                           _only_gate(b).size)) for b in branches]
        self.full = torch.stack([c[-1] for c in self.curves]).double()
        self.unit = torch.stack([c[1] for c in self.curves]).double()
        dense = self.fixed_ms + float(self.full.sum())
        if target_ms <= self.fixed_ms:
            raise P3BError(f"a target of {target_ms:.3f} ms is not above the {self.fixed_ms:.3f} ms the model takes on "
                           f"{table.backend} with every block removed (patch embedding, norms, head)")
        if target_ms >= dense:
            raise P3BError(f"a target of {target_ms:.3f} ms is not below the dense model's predicted {dense:.3f} ms "
                           f"on {table.backend}: nothing to prune")
        self.dense_ms = dense
        self.block_keep = (target_ms - self.fixed_ms) / float(self.full.sum())

    def report(self, layers: list[dict]) -> dict:
        """Target and prediction for a pruned architecture, for summary.json."""
        t = self.table
        predicted = t.predict(layers)
        return {"backend": t.backend, "device": t.device, "batch": t.batch, "threads": t.threads, "cpu": t.machine.get("cpu"),
                "target_ms": self.target_ms, "predicted_ms": predicted, "dense_ms_measured": t.dense_ms,
                "predicted_speedup": t.dense_ms / predicted, "target_speedup": t.dense_ms / self.target_ms}

    def kept(self, branches: list) -> torch.Tensor:
        """Predicted ms of every branch at its current kept width (mask ≥ 0.5)."""
        return torch.stack([c[_only_gate(b).kept()] for c, b in zip(self.curves, branches)]).double()


def _only_gate(branch):
    (gate,) = branch.gates().values()  # structure "inner": one gate per branch (head dims or hidden units)
    return gate
