"""Parameters, FLOPs and per-branch widths (and heads) of stock, gated and pruned ViTs (`p3bkit info`)."""

from __future__ import annotations

import torch.nn as nn

from p3bkit.models.adapter import TimmModule
from p3bkit.models.cost import BranchKind, BranchWidths, branch_flops, branch_params
from p3bkit.models.gates import GatedViT
from p3bkit.models.pruned import PrunedLayer


def _branch_widths(branch: TimmModule, kind: BranchKind) -> BranchWidths:
    """Widths as computed (a folded read/write counts the full residual width)."""
    if isinstance(branch, nn.Identity):
        return BranchWidths(kind, 0, 0, 0)
    fn: TimmModule = getattr(branch, "fn", branch)
    if kind == "attn":
        return BranchWidths(kind, fn.qkv.in_features, fn.head_dim, fn.proj.out_features, fn.num_heads)
    return BranchWidths(kind, fn.fc1.in_features, fn.fc1.out_features, fn.fc2.out_features)


def branch_widths(model: TimmModule) -> list[BranchWidths]:
    """Widths of the 2·depth blocks in forward order (hard-mask counts for a gated model)."""
    if isinstance(model, GatedViT):
        return [b.widths() for _, b in model.branches()]
    out = []
    for blk in model.blocks:
        out += [_branch_widths(blk.attn, "attn"), _branch_widths(blk.mlp, "mlp")]
    return out


def _heads(model: TimmModule) -> int:
    """The most heads any attention branch has (the stock model's head count unless all were pruned)."""
    inner = model.model if isinstance(model, GatedViT) else model
    counts = [
        getattr(
            blk.attn.fn if isinstance(blk, PrunedLayer) and not isinstance(blk.attn, nn.Identity) else blk.attn,
            "num_heads",
            0,
        )
        for blk in inner.blocks
    ]
    return max(counts, default=0) or 1


def _kept_params(model: TimmModule, w: BranchWidths, branch: TimmModule, heads: int) -> int:
    """A branch's Linear parameters: as stored, or (gated model) what its hard masks keep, biases as they exist."""
    if isinstance(model, GatedViT):
        s = model.spec
        bias = (s.qkv_bias, s.proj_bias) if w.kind == "attn" else (s.fc1_bias, s.fc2_bias)
        return int(branch_params(w, heads, *bias))
    return sum(p.numel() for m in branch.modules() if isinstance(m, nn.Linear) for p in m.parameters())


def describe(model: TimmModule) -> dict:
    """Parameter and FLOP counts (one multiply-add = one FLOP, per image) and per-block widths."""
    inner = model.model if isinstance(model, GatedViT) else model
    pe = inner.patch_embed
    num_tokens = pe.num_patches + inner.num_prefix_tokens
    heads = _heads(model)
    widths = branch_widths(model)
    dim = inner.embed_dim
    full_attn = BranchWidths(
        "attn", dim, (inner.blocks[0].attn.head_dim if hasattr(inner.blocks[0].attn, "head_dim") else dim // heads), dim
    )
    blocks_flops = sum(branch_flops(w, heads, num_tokens) for w in widths)
    k = pe.proj.kernel_size
    embed_flops = pe.num_patches * pe.proj.in_channels * k[0] * k[1] * dim
    head_flops = sum(
        m.in_features * m.out_features
        for m in (getattr(inner, "head", None), getattr(inner, "head_dist", None))
        if isinstance(m, nn.Linear)
    )
    branches = [b for blk in inner.blocks for b in (blk.attn, blk.mlp)]
    rows = [
        {
            "block": f"{i // 2}.{w.kind}",
            "c_in": w.c_in,
            "inner": w.inner,
            "c_out": w.c_out,
            "heads": (heads if w.heads is None else w.heads) if w.kind == "attn" and not w.empty else 0,
            "removed": w.empty,
            "params": _kept_params(model, w, br, heads),
        }
        for i, (w, br) in enumerate(zip(widths, branches))
    ]
    return {
        "params": sum(p.numel() for p in inner.parameters()),
        "flops": int(blocks_flops + embed_flops + head_flops),
        "block_flops": int(blocks_flops),
        "num_tokens": num_tokens,
        "num_heads": heads,
        "full_head_dim": full_attn.inner,
        "blocks": rows,
    }


def pruning_rates(pruned: TimmModule, dense: TimmModule) -> dict:
    """Both rates a pruned model can be described by: of all parameters and of block parameters.

    The paper's 75% / 90% are fractions of all parameters; `--budget blocks` counts only the
    Attention/MLP Linear parameters. Both are given wherever p3bkit shows a rate.
    """
    p, d = describe(pruned), describe(dense)
    blocks_p, blocks_d = sum(r["params"] for r in p["blocks"]), sum(r["params"] for r in d["blocks"])
    return {
        "params": p["params"],
        "dense_params": d["params"],
        "prune_rate_total": 1 - p["params"] / d["params"],
        "block_params": blocks_p,
        "dense_block_params": blocks_d,
        "prune_rate_blocks": 1 - blocks_p / blocks_d,
    }
