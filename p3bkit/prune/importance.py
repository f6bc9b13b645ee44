"""Importance criteria: block importance from the BPI (Appendix A) and local importance from
Taylor scores (Appendix B, Eq. 7), separate from the pruner that uses them.

Block importance: Iᵗᵢ = γ(ΔΨᵗᵢ / max ΔΨᵗ) / (|wᵢ| + ε) per token type t ∈ {class, patch} (Eq. 2
and 8), each normalised by its mean over branches, merged Iᵢ = α·Iᶜᵢ + (1−α)·Iᵖᵢ (Eq. 3) and
smoothed across mask updates by an EMA. |wᵢ| is floored at the cost of one unit of the branch (a
head dim or a hidden unit): the appendix leaves |wᵢ| = 0 undefined, and γ/(0+ε) would be ~10¹²
times everyone else's importance.

Local importance: per gate element the Taylor score (m·∂L/∂m)² becomes a normalised rank
(rank+1)/n within its gate, times a per-gate factor; equal scores (hard-pruned elements score 0)
are ordered by their mask gradient, never by index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def gamma(x: torch.Tensor, s: float = 10.0) -> torch.Tensor:
    """γ(x) = SP(1.4·s·x) − SP(1.4·s·x − s): ~0 for x ≤ 0, ~linear in between, capped near s."""
    return F.softplus(1.4 * s * x) - F.softplus(1.4 * s * x - s)


def token_importance(
    delta: torch.Tensor,
    kept_params: torch.Tensor,
    unit_cost: torch.Tensor | None = None,
    s: float = 10.0,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """γ(ΔΨ / max ΔΨ) / max(|w|, one unit), divided by its mean over the active branches.

    Inactive (disabled) branches get 0 and take no part in the max or the mean.
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


def block_importance(
    delta_cls: torch.Tensor,
    delta_patch: torch.Tensor,
    kept_params: torch.Tensor,
    alpha: float = 0.5,
    s: float = 10.0,
    unit_cost: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Iᵢ = α·Iᶜᵢ + (1−α)·Iᵖᵢ."""
    c = token_importance(delta_cls, kept_params, unit_cost, s, active)
    p = token_importance(delta_patch, kept_params, unit_cost, s, active)
    return alpha * c + (1 - alpha) * p


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


def normalised_ranks(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """(rank+1)/n with rank 0 for the smallest score; equal scores are ordered by `tiebreak`.

    Sorting by the tie-break first and then (stably) by the score gives the lexicographic order,
    so elements whose Taylor score is exactly 0 (hard-pruned) are ranked by their mask gradient
    instead of by index.
    """
    n = scores.numel()
    idx = torch.arange(n)
    if tiebreak is not None:
        idx = torch.argsort(tiebreak.float().cpu(), stable=True)
    order = idx[torch.argsort(scores.float().cpu()[idx], stable=True)]
    ranks = torch.empty(n, dtype=torch.float32)
    ranks[order] = torch.arange(n, dtype=torch.float32)
    return (ranks + 1) / n


def taylor_scores(gates: dict, factors: dict[str, float]) -> torch.Tensor:
    """I_cat of a branch: every gate's Taylor scores as normalised ranks × its factor, concatenated."""
    return torch.cat([normalised_ranks(g.scores(), g.tiebreak()) * factors[k] for k, g in gates.items()])


def magnitude_scores(branch, gates: dict) -> torch.Tensor:
    """Mean-square weight magnitude of every gate element (the global-magnitude baseline's score)."""
    mags = branch.magnitudes(mean=True)
    return torch.cat([mags[k].float().cpu() for k in gates])
