"""Local importance and soft masks inside one block (Appendix B, Eq. 8–9).

Per gate element j the Taylor score sⱼ = (mⱼ·∂L/∂mⱼ)² becomes a normalised rank (rank+1)/n
within its gate, times a per-gate factor; the block's elements are sorted by that (I_cat). The
threshold index t is found so that the parameter cost of what is kept meets κ·|W|, and the
mask is M_k = σ(ln(M_ref/(1−M_ref))·(k − t)/(τ·N)) over sorted positions k: element t gets 0.5,
element t+τN gets M_ref, τ = 0 gives the hard mask 1[k ≥ t].
"""
from __future__ import annotations

import math

import torch

from p3bkit.models.cost import BlockWidths, block_params

# upstream defaults: favour keeping residual writes, prune MLP hidden units first
GATE_FACTORS: dict[str, float] = {"in": 1.0, "head_dim": 1.0, "out": 1.5, "hidden": 0.75}


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


def kept_cost_curve(order_gate: torch.Tensor, names: list[str], kind: str,
                    num_heads: int, bias: tuple[bool, bool], full: dict[str, int]) -> torch.Tensor:
    """Block parameters when keeping the top-k elements, for every k = 0..n (vectorised).

    `order_gate[p]` is the gate id (index into `names`) of the p-th most important element.
    Gates absent from `names` (not pruned) stay at their `full` width.
    """
    n = order_gate.numel()
    counts = torch.zeros(n + 1, len(names), dtype=torch.long)
    counts[1:] = torch.nn.functional.one_hot(order_gate, len(names)).cumsum(0)
    inner_key = "head_dim" if kind == "attn" else "hidden"
    col = {name: counts[:, names.index(name)] if name in names else torch.full((n + 1,), full[name]) for name in full}
    return block_params(BlockWidths(kind, col["in"], col[inner_key], col["out"]), num_heads, *bias).long()


def threshold_count(cost: torch.Tensor, target: float) -> int:
    """The number of kept elements whose cost is closest to `target` (never above by > one step)."""
    below = int(torch.searchsorted(cost, torch.tensor(target, dtype=cost.dtype), right=True)) - 1
    below = max(below, 0)
    if below + 1 < cost.numel() and abs(cost[below + 1] - target) < abs(cost[below] - target):
        return below + 1
    return below


def soft_mask_values(n: int, t: int, tau: float, m_ref: float = 0.9) -> torch.Tensor:
    """Mask over sorted positions 0..n−1 (ascending importance) with threshold index t."""
    k = torch.arange(n, dtype=torch.float32)
    if tau <= 0:
        return (k >= t).float()
    return torch.sigmoid(math.log(m_ref / (1 - m_ref)) * (k - t) / (tau * n))
