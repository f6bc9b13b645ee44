"""Parameter and FLOP counts of Attention and MLP branches as functions of their kept widths.

The P3B budget (Appendix A) is measured in branch ("block" in the paper) parameters |w_i|; the
same formulas give the ideal speedup (FLOP ratio) the bench compares against. FLOPs follow the
fvcore convention used by DeiT and the paper: one multiply-add counts as one FLOP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:
    import torch

BranchKind = Literal["attn", "mlp"]
Width = Union[int, "torch.Tensor"]  # a width, or integer tensor of widths (a cost curve over many at once)


@dataclass(frozen=True)
class BranchWidths:
    """Kept widths of one branch: input channels, inner width, output channels."""

    kind: BranchKind
    c_in: Width
    inner: Width  # head dims (per head) for attention, hidden units for the MLP
    c_out: Width
    heads: Width | None = None  # attention heads kept (None: the model's head count)

    @property
    def empty(self) -> bool:
        return bool(min(self.c_in, self.inner, self.c_out, 1 if self.heads is None else self.heads) == 0)  # ints only


def branch_params(w: BranchWidths, num_heads: int, bias_in: bool, bias_out: bool):
    """Parameters of the branch's Linear layers (an emptied branch has none); `num_heads` is the
    model's head count, used when `w.heads` is None.

    Works elementwise when the widths are integer tensors (a cost curve over many k at once).
    """
    heads = num_heads if w.heads is None else w.heads
    inner = 3 * heads * w.inner if w.kind == "attn" else w.inner
    mid = heads * w.inner if w.kind == "attn" else w.inner
    params = w.c_in * inner + inner * int(bias_in) + mid * w.c_out + w.c_out * int(bias_out)
    return params * (w.c_in > 0) * (w.inner > 0) * (w.c_out > 0) * (heads > 0)


def branch_flops(w: BranchWidths, num_heads: int, num_tokens: int) -> int:
    """Multiply-adds of one branch for one image (linear layers + attention matmuls); integer widths."""
    if w.empty:
        return 0
    n = num_tokens
    if w.kind == "attn":
        hd = (num_heads if w.heads is None else w.heads) * w.inner
        return int(n * w.c_in * 3 * hd + 2 * n * n * hd + n * hd * w.c_out)
    return int(n * w.c_in * w.inner + n * w.inner * w.c_out)
