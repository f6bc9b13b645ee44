"""Dense pruned blocks: timm `Attention`/`Mlp` of smaller widths between channel read/write ops.

A pruned branch reads the kept residual channels (`ChannelGather`, or the full stream when the
selection is folded into zero weight columns), runs a stock timm `Attention(dim, num_heads,
attn_head_dim, dim_out)` or `Mlp(in, hidden, out)` and writes its output back into the kept
residual channels (`IndexAddWrite`, or a plain residual add when folded). A transformer layer of
pruned branches is a `PrunedLayer`; an emptied branch is `nn.Identity`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention

from p3bkit.models.adapter import TimmModule


class ChannelGather(nn.Module):
    """Selects the kept channels of the last axis (one Gather in ONNX)."""

    index: torch.Tensor

    def __init__(self, index: list[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)


class ResidualAdd(nn.Module):
    """x + y: the branch writes every residual channel."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class IndexAddWrite(nn.Module):
    """Adds y into the kept residual channels of x; the others pass through unchanged."""

    index: torch.Tensor

    def __init__(self, index: list[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.index_add(-1, self.index, y)


class PadGatherWrite(nn.Module):
    """Same function as `IndexAddWrite`, as Concat + Gather + Add (no ScatterND).

    y gets one zero channel appended; every residual channel gathers its update from y (or from
    that zero). TensorRT's ONNX parser and OpenVINO handle this better than ScatterND(add).
    """

    source: torch.Tensor

    def __init__(self, index: list[int], dim: int) -> None:
        super().__init__()
        src = torch.full((dim,), len(index), dtype=torch.long)
        src[torch.tensor(index, dtype=torch.long)] = torch.arange(len(index))
        self.register_buffer("source", src, persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([y, y.new_zeros(*y.shape[:-1], 1)], dim=-1)
        return x + padded.index_select(-1, self.source)


def set_write_op(model: nn.Module, op: str) -> nn.Module:
    """Swap every residual write between 'scatter' (ScatterND add) and 'gather' (pad + Gather), in place.

    Both compute the same function; backends differ in which one they run faster.
    """
    if op not in ("scatter", "gather"):
        raise ValueError(f"write op must be 'scatter' or 'gather', got {op!r}")
    for branch in [m for m in model.modules() if isinstance(m, PrunedBranch)]:
        w = branch.write
        if isinstance(w, IndexAddWrite) and op == "gather":
            dim = branch.norm.normalized_shape[0]
            branch.write = PadGatherWrite(w.index.tolist(), dim).to(w.index.device)
        elif isinstance(w, PadGatherWrite) and op == "scatter":
            index = torch.argsort(w.source)[: int((w.source < w.source.max()).sum())]
            branch.write = IndexAddWrite(index.tolist()).to(w.source.device)
    return model


class PrunedBranch(nn.Module):
    """norm → read → Attention/Mlp → LayerScale → DropPath → write (one residual branch)."""

    norm: TimmModule  # the timm block's norm layer (LayerNorm: normalized_shape)

    def __init__(
        self, norm: nn.Module, read: nn.Module, fn: nn.Module, ls: nn.Module, drop_path: nn.Module, write: nn.Module
    ) -> None:
        super().__init__()
        self.norm, self.read, self.fn, self.ls, self.drop_path, self.write = norm, read, fn, ls, drop_path, write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.write(x, self.drop_path(self.ls(self.fn(self.read(self.norm(x))))))


class PrunedLayer(nn.Module):
    """A transformer layer (timm Block) whose branches were pruned; an emptied branch is `nn.Identity`."""

    def __init__(self, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self.mlp(self.attn(x))


def _sliced_layerscale(ls: nn.Module, out_idx: torch.Tensor) -> nn.Module:
    if not isinstance(ls, LayerScale):
        return nn.Identity()
    new = LayerScale(len(out_idx), init_values=1.0)
    new.gamma.data.copy_(ls.gamma.data[out_idx])
    return new


def _reader(in_idx: list[int], dim: int, mode: str) -> nn.Module:
    return ChannelGather(in_idx) if mode == "gather" and len(in_idx) < dim else nn.Identity()


def _writer(out_idx: list[int], dim: int, mode: str) -> nn.Module:
    return IndexAddWrite(out_idx) if mode == "scatter" and len(out_idx) < dim else ResidualAdd()


@dataclass(frozen=True)
class _IoPlan:
    """Where a branch's kept input/output channels come from and go to in its new Linear layers."""

    src_in: torch.Tensor
    dst_in: torch.Tensor
    src_out: torch.Tensor
    dst_out: torch.Tensor
    c_in: int
    c_out: int


def _io_plan(arch: dict, dim: int) -> _IoPlan:
    """Folded ('dense') or complete reads/writes keep all `dim` channels (zeros where not kept);
    indexed ones keep only the kept channels, in order."""

    def side(idx: list[int], mode: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        kept = torch.tensor(idx, dtype=torch.long)
        if mode == "dense" or len(idx) == dim:
            return kept, kept, dim
        return kept, torch.arange(len(idx)), len(idx)

    src_in, dst_in, c_in = side(arch["in"], arch["read"])
    src_out, dst_out, c_out = side(arch["out"], arch["write"])
    return _IoPlan(src_in, dst_in, src_out, dst_out, c_in, c_out)


def _copy_output_layer(new: nn.Linear, old: nn.Linear, io: _IoPlan, cols: torch.Tensor) -> None:
    """Kept rows (residual channels written) × kept columns (inner units) of an output Linear."""
    new.weight.zero_()
    new.weight[io.dst_out] = old.weight[io.src_out][:, cols]
    if old.bias is not None:
        new.bias.zero_()
        new.bias[io.dst_out] = old.bias[io.src_out]


def build_attn_branch(blk: TimmModule, attn: Attention, arch: dict, dim: int) -> nn.Module:
    """A PrunedBranch for `blk`'s attention with kept indices `arch` (see `PrunedArch`)."""
    H, d = attn.num_heads, attn.head_dim
    io = _io_plan(arch, dim)
    hd = torch.tensor(arch["head_dim"], dtype=torch.long)
    heads = torch.tensor(arch.get("heads", range(H)), dtype=torch.long)  # kept heads (all, schema 1)
    dp, hp = len(hd), len(heads)
    qkv_heads = (torch.arange(3).unsqueeze(1) * H + heads.unsqueeze(0)).reshape(-1)  # (q|k|v, kept head)
    rows = (qkv_heads.unsqueeze(1) * d + hd.unsqueeze(0)).reshape(-1)  # (q|k|v, kept head, kept dim)
    new = Attention(
        io.c_in,
        num_heads=hp,
        attn_head_dim=dp,
        dim_out=io.c_out,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
    )
    new.attn_drop, new.proj_drop = copy.deepcopy(attn.attn_drop), copy.deepcopy(attn.proj_drop)
    # keep the original 1/sqrt(d_h) attention scale: SDPA uses 1/sqrt(d'), so scale q by sqrt(d'/d_h)
    q_scale = torch.ones(3 * hp * dp)
    q_scale[: hp * dp] = (dp / d) ** 0.5
    with torch.no_grad():
        new.qkv.weight.zero_()
        new.qkv.weight[:, io.dst_in] = attn.qkv.weight[rows][:, io.src_in] * q_scale[:, None]
        if attn.qkv.bias is not None:
            new.qkv.bias.copy_(attn.qkv.bias[rows] * q_scale)
        proj_cols = (heads.unsqueeze(1) * d + hd.unsqueeze(0)).reshape(-1)
        _copy_output_layer(new.proj, attn.proj, io, proj_cols)
    ls = _sliced_layerscale(blk.ls1, torch.arange(dim) if io.c_out == dim else io.src_out)
    return PrunedBranch(
        blk.norm1,
        _reader(arch["in"], dim, arch["read"]),
        new,
        ls,
        blk.drop_path1,
        _writer(arch["out"], dim, arch["write"]),
    )


def build_mlp_branch(blk: TimmModule, mlp: Mlp, arch: dict, dim: int) -> nn.Module:
    """A PrunedBranch for `blk`'s MLP with kept indices `arch` (see `PrunedArch`)."""
    io = _io_plan(arch, dim)
    hid = torch.tensor(arch["hidden"], dtype=torch.long)
    act = mlp.act
    # timm calls act_layer() for the activation (typed as a class there; any factory works)
    new: TimmModule = Mlp(
        io.c_in,
        hidden_features=len(hid),
        out_features=io.c_out,
        act_layer=lambda: copy.deepcopy(act),  # type: ignore[arg-type]
        bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None),
    )
    new.drop1, new.drop2 = copy.deepcopy(mlp.drop1), copy.deepcopy(mlp.drop2)
    with torch.no_grad():
        new.fc1.weight.zero_()
        new.fc1.weight[:, io.dst_in] = mlp.fc1.weight[hid][:, io.src_in]
        if mlp.fc1.bias is not None:
            new.fc1.bias.copy_(mlp.fc1.bias[hid])
        _copy_output_layer(new.fc2, cast(nn.Linear, mlp.fc2), io, hid)  # inspect_vit accepts Linear only
    ls = _sliced_layerscale(blk.ls2, torch.arange(dim) if io.c_out == dim else io.src_out)
    return PrunedBranch(
        blk.norm2,
        _reader(arch["in"], dim, arch["read"]),
        new,
        ls,
        blk.drop_path2,
        _writer(arch["out"], dim, arch["write"]),
    )
