"""Dense pruned blocks: timm `Attention`/`Mlp` of smaller widths between channel read/write ops.

A pruned branch reads the kept residual channels (`ChannelGather`, or the full stream when the
selection is folded into zero weight columns), runs a stock timm `Attention(dim, num_heads,
attn_head_dim, dim_out)` or `Mlp(in, hidden, out)` and writes its output back into the kept
residual channels (`IndexAddWrite`, or a plain residual add when folded). DESIGN.md §2 and §6.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention


class ChannelGather(nn.Module):
    """Selects the kept channels of the last axis (one Gather in ONNX)."""

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

    def __init__(self, norm: nn.Module, read: nn.Module, fn: nn.Module, ls: nn.Module,
                 drop_path: nn.Module, write: nn.Module) -> None:
        super().__init__()
        self.norm, self.read, self.fn, self.ls, self.drop_path, self.write = norm, read, fn, ls, drop_path, write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.write(x, self.drop_path(self.ls(self.fn(self.read(self.norm(x))))))


class PrunedBlock(nn.Module):
    """A transformer layer whose branches were pruned; an emptied branch is `nn.Identity`."""

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


def _io_indices(idx: list[int], dim: int, mode: str, dense_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows/cols to copy, and where they go: folded ('dense') layers keep all `dim` channels."""
    kept = torch.tensor(idx, dtype=torch.long)
    if mode == dense_mode or len(idx) == dim:
        return kept, kept  # full width: copy kept rows into their own positions, zeros elsewhere
    return kept, torch.arange(len(idx))


def build_attn_branch(blk: nn.Module, attn: Attention, arch: dict, dim: int) -> nn.Module:
    """A PrunedBranch for `blk`'s attention with kept indices `arch` (see `PrunedArch`)."""
    H, d = attn.num_heads, attn.head_dim
    src_in, dst_in = _io_indices(arch["in"], dim, arch["read"], "dense")
    src_out, dst_out = _io_indices(arch["out"], dim, arch["write"], "dense")
    c_in = dim if arch["read"] == "dense" or len(arch["in"]) == dim else len(arch["in"])
    c_out = dim if arch["write"] == "dense" or len(arch["out"]) == dim else len(arch["out"])
    hd = torch.tensor(arch["head_dim"], dtype=torch.long)
    dp = len(hd)
    rows = (torch.arange(3 * H).unsqueeze(1) * d + hd.unsqueeze(0)).reshape(-1)  # (q|k|v, head, dim)
    new = Attention(c_in, num_heads=H, attn_head_dim=dp, dim_out=c_out,
                    qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None)
    new.attn_drop, new.proj_drop = copy.deepcopy(attn.attn_drop), copy.deepcopy(attn.proj_drop)
    # keep the original 1/sqrt(d_h) attention scale: SDPA uses 1/sqrt(d'), so scale q by sqrt(d'/d_h)
    q_scale = torch.ones(3 * H * dp)
    q_scale[: H * dp] = (dp / d) ** 0.5
    with torch.no_grad():
        new.qkv.weight.zero_()
        new.qkv.weight[:, dst_in] = attn.qkv.weight[rows][:, src_in] * q_scale[:, None]
        if attn.qkv.bias is not None:
            new.qkv.bias.copy_(attn.qkv.bias[rows] * q_scale)
        proj_cols = (torch.arange(H).unsqueeze(1) * d + hd.unsqueeze(0)).reshape(-1)
        new.proj.weight.zero_()
        new.proj.weight[dst_out] = attn.proj.weight[src_out][:, proj_cols]
        if attn.proj.bias is not None:
            new.proj.bias.zero_()
            new.proj.bias[dst_out] = attn.proj.bias[src_out]
    ls = _sliced_layerscale(blk.ls1, _full_or(src_out, dst_out, c_out, dim))
    return PrunedBranch(blk.norm1, _reader(arch["in"], dim, arch["read"]), new, ls, blk.drop_path1,
                        _writer(arch["out"], dim, arch["write"]))


def build_mlp_branch(blk: nn.Module, mlp: Mlp, arch: dict, dim: int) -> nn.Module:
    """A PrunedBranch for `blk`'s MLP with kept indices `arch` (see `PrunedArch`)."""
    src_in, dst_in = _io_indices(arch["in"], dim, arch["read"], "dense")
    src_out, dst_out = _io_indices(arch["out"], dim, arch["write"], "dense")
    c_in = dim if arch["read"] == "dense" or len(arch["in"]) == dim else len(arch["in"])
    c_out = dim if arch["write"] == "dense" or len(arch["out"]) == dim else len(arch["out"])
    hid = torch.tensor(arch["hidden"], dtype=torch.long)
    act = mlp.act
    new = Mlp(c_in, hidden_features=len(hid), out_features=c_out, act_layer=lambda: copy.deepcopy(act),
              bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None))
    new.drop1, new.drop2 = copy.deepcopy(mlp.drop1), copy.deepcopy(mlp.drop2)
    with torch.no_grad():
        new.fc1.weight.zero_()
        new.fc1.weight[:, dst_in] = mlp.fc1.weight[hid][:, src_in]
        if mlp.fc1.bias is not None:
            new.fc1.bias.copy_(mlp.fc1.bias[hid])
        new.fc2.weight.zero_()
        new.fc2.weight[dst_out] = mlp.fc2.weight[src_out][:, hid]
        if mlp.fc2.bias is not None:
            new.fc2.bias.zero_()
            new.fc2.bias[dst_out] = mlp.fc2.bias[src_out]
    ls = _sliced_layerscale(blk.ls2, _full_or(src_out, dst_out, c_out, dim))
    return PrunedBranch(blk.norm2, _reader(arch["in"], dim, arch["read"]), new, ls, blk.drop_path2,
                        _writer(arch["out"], dim, arch["write"]))


def _full_or(src: torch.Tensor, dst: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """LayerScale channels to keep: all of them for a full-width output, else the kept ones."""
    return torch.arange(dim) if width == dim else src
