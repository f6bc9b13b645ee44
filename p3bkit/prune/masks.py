"""Soft masks inside one branch (Appendix B, Eq. 8–9).

The branch's elements are sorted by local importance (I_cat, `prune.importance`); the threshold
index t is found so that the cost of what is kept meets κ·cost (`threshold_count` on the branch's
cost curve, `prune.costs`), and the mask is M_k = σ(ln(M_ref/(1−M_ref))·(k − t)/(τ·N)) over sorted
positions k: element t gets 0.5, element t+τN gets M_ref, τ = 0 gives the hard mask 1[k ≥ t].
"""

from __future__ import annotations

import math

import torch


def threshold_count(cost: torch.Tensor, target: float) -> int:
    """The number of kept elements whose cost is closest to `target` (never above by > one step);
    of counts that cost the same (a latency curve's flat runs), the largest."""
    below = int(torch.searchsorted(cost, torch.tensor(target, dtype=cost.dtype), right=True)) - 1
    below = max(below, 0)
    if below + 1 < cost.numel() and abs(cost[below + 1] - target) < abs(cost[below] - target):
        return int(torch.searchsorted(cost, cost[below + 1], right=True)) - 1
    return below


def soft_mask_values(n: int, t: int, tau: float, m_ref: float = 0.9, between: bool = False) -> torch.Tensor:
    """Mask over sorted positions 0..n−1 (ascending importance) with threshold index t.

    `between`: the 0.5 point lies half an element below t, between the last pruned and the first
    kept element. For a gate of a few elements (heads) the paper's placement would run the least
    important kept head at half strength through the whole soft phase (a one-head branch at half
    its output) and leave the first pruned one at ~σ(−ln 9/(τN)), a few percent.
    """
    k = torch.arange(n, dtype=torch.float32)
    if tau <= 0:
        return (k >= t).float()
    return torch.sigmoid(math.log(m_ref / (1 - m_ref)) * (k - t + (0.5 if between else 0.0)) / (tau * n))
