"""Block budgets: γ smoothing, importance per parameter, keep-ratio allocation (Appendix A).

Iᵗᵢ = γ(ΔΨᵗᵢ / max ΔΨᵗ) / (|wᵢ| + ε) per token type t ∈ {class, patch} (Eq. 2 and 8), each
normalised by its mean over blocks, merged Iᵢ = α·Iᶜᵢ + (1−α)·Iᵖᵢ (Eq. 3), smoothed across mask
updates by an EMA, and turned into keep ratios κᵢ = clip(λ·Iᵢ, 0, 1) with λ solved so that
Σᵢ κᵢ|Wᵢ| meets the model budget; blocks saturated at 1 are fixed and the rest re-solved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def gamma(x: torch.Tensor, s: float = 10.0) -> torch.Tensor:
    """γ(x) = SP(1.4·s·x) − SP(1.4·s·x − s): ~0 for x ≤ 0, ~linear in between, capped near s."""
    return F.softplus(1.4 * s * x) - F.softplus(1.4 * s * x - s)


def token_importance(delta: torch.Tensor, kept_params: torch.Tensor, s: float = 10.0) -> torch.Tensor:
    """γ(ΔΨ / max ΔΨ) / (|w| + ε), divided by its mean over blocks."""
    peak = delta.max()
    scaled = delta / peak if peak > 0 else torch.zeros_like(delta)
    imp = gamma(scaled, s) / (kept_params.float() + EPS)
    return imp / imp.mean().clamp(min=EPS)


def block_importance(delta_cls: torch.Tensor, delta_patch: torch.Tensor, kept_params: torch.Tensor,
                     alpha: float = 0.5, s: float = 10.0) -> torch.Tensor:
    """Iᵢ = α·Iᶜᵢ + (1−α)·Iᵖᵢ."""
    return alpha * token_importance(delta_cls, kept_params, s) + (1 - alpha) * token_importance(delta_patch, kept_params, s)


def allocate_keep_ratios(importance: torch.Tensor, sizes: torch.Tensor, keep: float) -> torch.Tensor:
    """κ = clip(λ·I, 0, 1) with Σ κ·|W| = keep·Σ|W|; saturated blocks fixed at 1, the rest re-solved."""
    importance, sizes = importance.double().clamp(min=0), sizes.double()
    budget = keep * sizes.sum()
    kappa = torch.zeros_like(importance)
    free = sizes > 0
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


def ramp(target: torch.Tensor, progress: float) -> torch.Tensor:
    """Keep ratios during sparsify: linear from 1 (progress 0) to the target (progress 1)."""
    p = min(max(progress, 0.0), 1.0)
    return 1.0 - p * (1.0 - target)


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
