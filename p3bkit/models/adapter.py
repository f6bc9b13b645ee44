"""Accept timm Vision Transformers built from stock `Block`/`Attention`/`Mlp`, refuse the rest.

P3B prunes inside the Attention and MLP branches of a ViT's layers; this module checks that a
model has exactly the structure the gates and the surgery assume, and reads its dimensions. An
attention-pool head (`global_pool="map"`, SigLIP-style) sits after the blocks and is kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import torch.nn as nn
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from p3bkit.errors import ArchError

# A timm ViT (stock or pruned) or one of its parts, read by duck typing: `inspect_vit` checks that a
# model has what pruning reads (patch_embed, blocks with attn and mlp, norm, head). nn.Module types
# every attribute as `Tensor | Module`, which no attribute chain into a foreign model survives, so
# code that walks a timm model's parts takes it as this alias.
TimmModule: TypeAlias = Any


@dataclass(frozen=True)
class ViTSpec:
    """The dimensions of a ViT that pruning and cost models need."""

    dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    qkv_bias: bool
    proj_bias: bool
    fc1_bias: bool
    fc2_bias: bool
    num_tokens: int  # patches + prefix tokens (class, distillation, registers)
    num_prefix_tokens: int


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _check_block(name: str, i: int, blk: nn.Module) -> None:
    where = f"model {name!r}, blocks.{i}"
    if type(blk) is not Block:
        raise ArchError(f"{where} is a {type(blk).__name__}; only timm's standard Block is supported")
    attn, mlp = blk.attn, blk.mlp
    if type(attn) is not Attention:
        raise ArchError(f"{where}.attn is a {type(attn).__name__}; only timm's Attention is supported")
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        raise ArchError(f"{where}.attn uses qk_norm, which normalises over the head dims P3B prunes")
    if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
        raise ArchError(f"{where}.attn uses scale_norm or a gated output, which P3B cannot prune exactly")
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.norm, nn.Identity):
        raise ArchError(f"{where}.mlp is not a plain timm Mlp (Linear-act-Linear, no norm)")


def inspect_vit(model: nn.Module) -> ViTSpec:
    """Validate `model` and return its dimensions.

    Raises:
        ArchError: naming the model and the reason when it is not a supported timm ViT.
    """
    name = _model_name(model)
    if not isinstance(model, VisionTransformer):
        raise ArchError(f"model {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    blocks: list[TimmModule] = list(model.blocks)
    if not blocks:
        raise ArchError(f"model {name!r} has no blocks")
    for i, blk in enumerate(blocks):
        _check_block(name, i, blk)
    a, m = blocks[0].attn, blocks[0].mlp
    grid = model.patch_embed.grid_size
    return ViTSpec(
        dim=model.embed_dim,
        depth=len(blocks),
        num_heads=a.num_heads,
        head_dim=a.head_dim,
        mlp_hidden=m.fc1.out_features,
        qkv_bias=a.qkv.bias is not None,
        proj_bias=a.proj.bias is not None,
        fc1_bias=m.fc1.bias is not None,
        fc2_bias=m.fc2.bias is not None,
        num_tokens=grid[0] * grid[1] + model.num_prefix_tokens,
        num_prefix_tokens=model.num_prefix_tokens,
    )
