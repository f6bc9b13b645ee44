"""Gates: multiplicative masks on every prunable axis of a timm ViT.

A gate multiplies an activation by its `mask` buffer along the last axis. The six gates of a
layer are placed so that a hard mask is exactly equivalent to deleting rows/columns of the
block's Linear layers, which is what makes the surgery exact. Each gate can also accumulate
the first-order Taylor score (m · ∂L/∂m)² of its elements (Molchanov et al. 2019), used by the
P3B local importance (paper Eq. 7); masks are buffers and never receive gradients.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.attention import Attention

from p3bkit.models.adapter import TimmModule, ViTSpec, inspect_vit
from p3bkit.models.cost import BranchWidths

Structure = Literal["full", "inner", "heads"]
STRUCTURE_GATES: dict[str, dict[str, tuple[str, ...]]] = {
    # full: all six gates; inner: only head dims and MLP hidden units (no residual-channel pruning);
    # heads: inner plus whole heads (a head's q/k/v rows and proj columns leave together)
    "full": {"attn": ("in", "head_dim", "out"), "mlp": ("in", "hidden", "out")},
    "inner": {"attn": ("head_dim",), "mlp": ("hidden",)},
    "heads": {"attn": ("heads", "head_dim"), "mlp": ("hidden",)},
}


HEAD_SCORE_FLOOR = 0.0  # the head gate's `score_floor` (P3BConfig.head_score_floor sets it per run)


class Gate(nn.Module):
    """Multiplies one axis (the last by default) by `mask`; optionally accumulates Taylor scores.

    `score_floor` f: score each element as if its mask were at least f, (max(m, f)·∂L/∂m)² (0: the
    paper's (m·∂L/∂m)²; 1: what it would bring fully on). For a gate of a few elements (heads) a
    pruned element sits at a small soft-mask value for the whole soft phase; its (m·∂L/∂m)² shrinks
    with m² and it could never come back, although ∂L/∂m (the activation times the gradient behind
    the gate, whatever the mask) still measures what it would bring. At f = ½ (the threshold's mask
    value) a pruned head returns once its gradient is twice a kept one's; the head gate's default is
    0 all the same, because it won on accuracy (`P3BConfig.head_score_floor`).
    """

    mask: torch.Tensor  # buffers (registered below)
    score_sum: torch.Tensor
    grad_sum: torch.Tensor
    score_count: torch.Tensor

    def __init__(self, size: int, axis: int = -1, score_floor: float = 0.0) -> None:
        super().__init__()
        self.size, self.axis, self.score_floor = size, axis, score_floor
        self.register_buffer("mask", torch.ones(size))
        self.register_buffer("score_sum", torch.zeros(size))
        self.register_buffer("grad_sum", torch.zeros(size))
        self.register_buffer("score_count", torch.zeros((), dtype=torch.long))
        self.track = False

    def kept(self) -> int:
        return int((self.mask >= 0.5).sum())

    def reset_scores(self) -> None:
        self.score_sum.zero_()
        self.grad_sum.zero_()
        self.score_count.zero_()

    def scores(self) -> torch.Tensor:
        """Mean Taylor score (m·∂L/∂m)² since the last reset; (max(m, f)·∂L/∂m)² with a score floor f
        (masks change only at mask updates, so m is constant over the window)."""
        if self.score_floor > 0:
            return self.mask.clamp(min=self.score_floor).pow(2) * self.tiebreak()
        return self.score_sum / self.score_count.clamp(min=1)

    def tiebreak(self) -> torch.Tensor:
        """Mean (∂L/∂m)²: orders elements whose mask (and so Taylor score) is exactly 0.

        A hard-pruned element has score 0 however useful it would be; its mask gradient still
        says how much the loss would change if it came back, so reactivation never falls back to
        index order.
        """
        return self.grad_sum / self.score_count.clamp(min=1)

    def record(self, score: torch.Tensor, grad_sq: torch.Tensor) -> None:
        """Add one step's Taylor scores (m·∂L/∂m)² and squared mask gradients (∂L/∂m)²."""
        self.score_sum += score
        self.grad_sum += grad_sq
        self.score_count += 1

    def _accumulate(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        dl_dm = (grad.float() * x.float()).movedim(self.axis, -1).flatten(0, -2).sum(0)
        self.record((self.mask * dl_dm).pow(2), dl_dm.pow(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.mask.to(x.dtype).view(self.size, *([1] * (-1 - self.axis)))
        if self.track and y.requires_grad:
            y.register_hook(partial(self._accumulate, x.detach()))
        return y


def _alive(gates: dict[str, Gate], dtype: torch.dtype) -> torch.Tensor:
    """1 when every gate has a non-zero mask value, else 0, as a tensor (no host sync on GPU).

    A soft mask whose values are all below 0.5 still passes its tail through: the block keeps
    computing, so its ΔΨ and Taylor scores stay measurable and it can be reactivated. Only a gate
    that is exactly 0 everywhere empties the block (which also silences the output bias). For hard
    masks this equals "keeps at least one element", so surgery stays exact.
    """
    return torch.stack([(g.mask > 0).any() for g in gates.values()]).all().to(dtype)


def _gate_or_identity(names: tuple[str, ...], name: str, size: int) -> nn.Module:
    return Gate(size) if name in names else nn.Identity()


class GatedAttention(nn.Module):
    """timm `Attention` with gates on its input, head dims (shared by q, k, v) and output."""

    def __init__(self, attn: Attention, structure: Structure) -> None:
        super().__init__()
        names = STRUCTURE_GATES[structure]["attn"]
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.fused_attn = attn.fused_attn
        dim, dim_out = attn.qkv.in_features, attn.proj.out_features
        self.qkv, self.attn_drop, self.proj, self.proj_drop = attn.qkv, attn.attn_drop, attn.proj, attn.proj_drop
        self.gate_in = _gate_or_identity(names, "in", dim)
        # whole heads: on each head's attention output (B, N, H, d), so a zero removes the head's
        # q, k, v rows and proj columns together (its softmax no longer matters)
        self.gate_heads = (
            Gate(self.num_heads, axis=-2, score_floor=HEAD_SCORE_FLOOR) if "heads" in names else nn.Identity()
        )
        self.gate_head_dim = Gate(self.head_dim)
        self.gate_out = _gate_or_identity(names, "out", dim_out)

    def gates(self) -> dict[str, Gate]:
        named = {"in": self.gate_in, "heads": self.gate_heads, "head_dim": self.gate_head_dim, "out": self.gate_out}
        return {k: g for k, g in named.items() if isinstance(g, Gate)}

    @torch.no_grad()
    def magnitudes(self, mean: bool = False) -> dict[str, torch.Tensor]:
        """Squared L2 norm (or mean square) of the weights each gate element touches."""
        H, d = self.num_heads, self.head_dim
        q = self.qkv.weight.reshape(3 * H, d, -1).pow(2)
        p = self.proj.weight.reshape(-1, H, d).pow(2)
        red = torch.mean if mean else torch.sum
        head = (red(q, (0, 2)) + red(p, (0, 1))) / (2 if mean else 1)
        heads = (red(q.reshape(3, H, d, -1), (0, 2, 3)) + red(p, (0, 2))) / (2 if mean else 1)
        return {
            "in": red(self.qkv.weight.pow(2), 0),
            "heads": heads,
            "head_dim": head,
            "out": red(self.proj.weight.pow(2), 1),
        }

    def widths(self) -> BranchWidths:
        c_in = self.gate_in.kept() if isinstance(self.gate_in, Gate) else self.qkv.in_features
        c_out = self.gate_out.kept() if isinstance(self.gate_out, Gate) else self.proj.out_features
        heads = self.gate_heads.kept() if isinstance(self.gate_heads, Gate) else self.num_heads
        return BranchWidths("attn", c_in, self.gate_head_dim.kept(), c_out, heads)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        alive = _alive(self.gates(), x.dtype)  # a block with nothing kept on an axis is a no-op
        x = self.gate_in(x)
        qkv = self.gate_head_dim(self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.proj(self.gate_heads(x.transpose(1, 2)).reshape(B, N, self.num_heads * self.head_dim))
        return self.gate_out(self.proj_drop(x)) * alive


class GatedMlp(nn.Module):
    """timm `Mlp` with gates on its input, hidden units (after the activation) and output."""

    fc1: nn.Linear  # inspect_vit accepts Linear layers only
    fc2: nn.Linear

    def __init__(self, mlp: Mlp, structure: Structure) -> None:
        super().__init__()
        names = STRUCTURE_GATES[structure]["mlp"]
        # registered in timm's order (fc1, act, drop1, fc2, drop2): parameter order, and so optimizer
        # state in checkpoints, stays as it was for activations with parameters too
        self.fc1, self.act, self.drop1 = cast(nn.Linear, mlp.fc1), mlp.act, mlp.drop1
        self.fc2, self.drop2 = cast(nn.Linear, mlp.fc2), mlp.drop2
        self.gate_in = _gate_or_identity(names, "in", self.fc1.in_features)
        self.gate_hidden = Gate(self.fc1.out_features)
        self.gate_out = _gate_or_identity(names, "out", self.fc2.out_features)

    def gates(self) -> dict[str, Gate]:
        named = {"in": self.gate_in, "hidden": self.gate_hidden, "out": self.gate_out}
        return {k: g for k, g in named.items() if isinstance(g, Gate)}

    @torch.no_grad()
    def magnitudes(self, mean: bool = False) -> dict[str, torch.Tensor]:
        """Squared L2 norm (or mean square) of the weights each gate element touches."""
        w1, w2 = self.fc1.weight.pow(2), self.fc2.weight.pow(2)
        red = torch.mean if mean else torch.sum
        hidden = (red(w1, 1) + red(w2, 0)) / (2 if mean else 1)
        return {"in": red(w1, 0), "hidden": hidden, "out": red(w2, 1)}

    def widths(self) -> BranchWidths:
        c_in = self.gate_in.kept() if isinstance(self.gate_in, Gate) else self.fc1.in_features
        c_out = self.gate_out.kept() if isinstance(self.gate_out, Gate) else self.fc2.out_features
        return BranchWidths("mlp", c_in, self.gate_hidden.kept(), c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alive = _alive(self.gates(), x.dtype)  # an emptied block adds nothing to the residual
        x = self.drop1(self.gate_hidden(self.act(self.fc1(self.gate_in(x)))))
        return self.gate_out(self.drop2(self.fc2(x))) * alive


class GatedViT(nn.Module):
    """A timm ViT whose Attention and MLP blocks carry gates; `gates` names every one."""

    model: TimmModule

    def __init__(self, model: TimmModule, structure: Structure = "full") -> None:
        from p3bkit.models.source import model_source

        super().__init__()
        if structure not in STRUCTURE_GATES:
            raise ValueError(f"structure must be one of {sorted(STRUCTURE_GATES)}, got {structure!r}")
        self.spec: ViTSpec = inspect_vit(model)
        self.structure = structure
        self.source = model_source(model, fallback="infer-or-none")  # None: `save` refuses it later
        for blk in model.blocks:
            blk.attn = GatedAttention(blk.attn, structure)
            blk.mlp = GatedMlp(blk.mlp, structure)
        self.model = model

    def branches(self) -> list[tuple[str, GatedAttention | GatedMlp]]:
        """The 2·depth prunable blocks in forward order, named `blocks.i.attn` / `blocks.i.mlp`."""
        out: list[tuple[str, GatedAttention | GatedMlp]] = []
        for i, blk in enumerate(self.model.blocks):
            out += [(f"blocks.{i}.attn", blk.attn), (f"blocks.{i}.mlp", blk.mlp)]
        return out

    @property
    def gates(self) -> dict[str, Gate]:
        return {f"{b}.{g}": gate for b, br in self.branches() for g, gate in br.gates().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def add_gates(model: nn.Module, structure: Structure = "full") -> GatedViT:
    """Insert P3B gates into a timm ViT (in place) and return the gated wrapper.

    With all masks at 1 the gated forward equals the original model's.

    Raises:
        ArchError: when the model is not a supported timm ViT.
    """
    return GatedViT(model, structure)
