"""Surgery: hard masks → a dense, smaller model that computes exactly the hard-masked function.

A gate element is kept when its mask is ≥ 0.5. `round_to=k` rounds every kept
width up to a multiple of k (hardware-friendly GEMMs) by also keeping the next most important
elements, ranked by mask value, then by weight magnitude. Each branch reads and writes residual
channels either with index ops (gather / index_add) or, where a cost model says so, by folding
the channel selection into zero weight columns/rows (`io_mode`): backends run a Gather or
ScatterND on the residual stream slower than the few extra GEMM columns when most channels are kept.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch

from p3bkit.errors import SurgeryError
from p3bkit.models.adapter import TimmModule
from p3bkit.models.arch import ModelSource, PrunedArch, apply_arch, versions
from p3bkit.models.gates import GatedAttention, GatedMlp, GatedViT

IoMode = Literal["auto", "index", "dense"]
# 'auto': fold a read/write into dense weights when at least this fraction of the residual
# channels is kept — the saved GEMM work is then smaller than the cost of a Gather/ScatterND.
FOLD_MIN_KEEP = 0.75


def kept_indices(mask: torch.Tensor, magnitude: torch.Tensor, round_to: int = 1) -> list[int]:
    """Indices with mask ≥ 0.5, padded up to a multiple of `round_to` with the next best ones."""
    n, k = mask.numel(), int((mask >= 0.5).sum())
    if k == 0:
        return []
    k = min(n, math.ceil(k / round_to) * round_to)
    # lexicographic (mask desc, magnitude desc): sort by magnitude, then stable-sort by mask
    order = torch.argsort(magnitude.float().cpu(), descending=True, stable=True)
    order = order[torch.argsort(mask.float().cpu()[order], descending=True, stable=True)]
    return sorted(order[:k].tolist())


def _io_mode(kept: int, dim: int, io_mode: IoMode, index_name: str) -> str:
    if io_mode == "index" or (io_mode == "auto" and kept < FOLD_MIN_KEEP * dim):
        return index_name
    return "dense"


def _branch_arch(branch: GatedAttention | GatedMlp, dim: int, round_to: int, io_mode: IoMode) -> dict | None:
    inner = "head_dim" if isinstance(branch, GatedAttention) else "hidden"
    mags, gates = branch.magnitudes(), branch.gates()
    out: dict = {}
    for key in ("in", inner, "out"):
        gate = gates.get(key)
        out[key] = kept_indices(gate.mask, mags[key], round_to) if gate is not None else list(range(dim))
        if not out[key]:
            return None  # nothing kept on one axis: the whole branch is an identity residual
    if "heads" in gates:  # whole heads: a count, not a GEMM width, so never rounded up
        out["heads"] = kept_indices(gates["heads"].mask, mags["heads"])
        if not out["heads"]:
            return None
    out["read"] = _io_mode(len(out["in"]), dim, io_mode, "gather")
    out["write"] = _io_mode(len(out["out"]), dim, io_mode, "scatter")
    return out


def masks_to_arch(gated: GatedViT, round_to: int = 1, io_mode: IoMode = "auto") -> PrunedArch:
    """Read the hard masks of `gated` into a `PrunedArch` (kept indices per layer)."""
    if round_to < 1:
        raise SurgeryError(f"round_to must be ≥ 1, got {round_to}")
    if io_mode not in ("auto", "index", "dense"):
        raise SurgeryError(f"io_mode must be auto, index or dense, got {io_mode!r}")
    dim = gated.spec.dim
    layers = [
        {"attn": _branch_arch(blk.attn, dim, round_to, io_mode), "mlp": _branch_arch(blk.mlp, dim, round_to, io_mode)}
        for blk in gated.model.blocks
    ]
    source = gated.source or ModelSource(name=type(gated.model).__name__)
    return PrunedArch(source=source, layers=layers, structure=gated.structure, round_to=round_to, versions=versions())


def harden_masks(gated: GatedViT, arch: PrunedArch) -> None:
    """Set every mask of `gated` to the 0/1 mask of `arch` (what the pruned model computes)."""
    for i, layer in enumerate(arch.layers):
        blk = gated.model.blocks[i]
        for kind, branch in (("attn", blk.attn), ("mlp", blk.mlp)):
            spec = layer[kind]
            for key, gate in branch.gates().items():
                gate.mask.zero_()
                if spec is not None:
                    gate.mask[spec[key]] = 1.0


def apply_surgery(gated: GatedViT, round_to: int = 1, io_mode: IoMode = "auto") -> TimmModule:
    """Build the dense pruned model from `gated`'s hard masks (the gated model is left intact).

    The result is a plain timm ViT whose blocks are `PrunedLayer`s, in eval mode, carrying its
    `PrunedArch` as `p3b_arch` so that `p3bkit.save` can write it.
    """
    arch = masks_to_arch(gated, round_to, io_mode)
    device = next(gated.parameters()).device
    model = copy.deepcopy(gated.model).cpu()  # index bookkeeping on the CPU, then back to the device
    apply_arch(model, arch, spec=gated.spec)
    model.p3b_source = arch.source
    return model.to(device).eval()


@torch.no_grad()
def check_surgery(gated: GatedViT, pruned: TimmModule, atol: float = 1e-5, batch: int = 2) -> float:
    """Max abs diff between `pruned` and the hard-masked `gated` on a seeded input.

    Raises:
        SurgeryError: when the difference exceeds `atol`.
    """
    reference = copy.deepcopy(gated).eval()
    harden_masks(reference, pruned.p3b_arch)
    img = reference.model.patch_embed.img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, reference.model.patch_embed.proj.in_channels, *img, generator=gen)
    device = next(pruned.parameters()).device
    diff = (reference.to(device)(x.to(device)) - pruned.eval()(x.to(device))).abs().max().item()
    if not diff <= atol:
        raise SurgeryError(f"pruned model differs from the hard-masked model by {diff:.3g} > {atol:g}")
    return diff
