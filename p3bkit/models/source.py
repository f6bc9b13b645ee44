"""What a saved model needs to be rebuilt: the timm architecture name and constructor arguments.

A model made by `timm.create_model(name, **kwargs)` carries its architecture name in
`pretrained_cfg["architecture"]`, but not its keyword arguments. They are read back from the
module itself (image and patch size, channels, classes, width, depth, heads, MLP ratio, biases,
class/register tokens, pooling, LayerScale, norms), so `p3bkit.save` can write a folder that
`p3bkit.load` rebuilds; `save` then rebuilds it and compares outputs before moving it into place.
"""

from __future__ import annotations

from typing import Literal, overload

import torch.nn as nn

from p3bkit.errors import ArchError
from p3bkit.models.adapter import TimmModule
from p3bkit.models.arch import ModelSource


def _size(v) -> int | list[int]:
    v = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v, v)))
    return v[0] if v[0] == v[1] else list(v)


def _layer_scale(blk: TimmModule) -> float | None:
    ls = getattr(blk, "ls1", None)
    gamma = getattr(ls, "gamma", None)
    return None if gamma is None else 1.0  # the value is a weight, loaded afterwards; only its presence counts


def infer_source(model: TimmModule) -> ModelSource:
    """The `ModelSource` that rebuilds `model`'s architecture with timm (weights not included).

    Raises:
        ArchError: when the model does not name its timm architecture.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ArchError(
            f"cannot tell which timm architecture this {type(model).__name__} is (no "
            "pretrained_cfg['architecture']): build it with timm.create_model or p3bkit.create_model"
        )
    blk, pe = model.blocks[0], model.patch_embed
    attn = getattr(blk.attn, "fn", blk.attn)
    kwargs = {
        "img_size": _size(pe.img_size),
        "patch_size": _size(pe.patch_size),
        "in_chans": pe.proj.in_channels,
        "num_classes": model.num_classes,
        "global_pool": model.global_pool,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": attn.num_heads,
        "mlp_ratio": _mlp_ratio(model),
        "qkv_bias": attn.qkv.bias is not None,
        "class_token": getattr(model, "cls_token", None) is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(model.no_embed_class),
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "init_values": _layer_scale(blk),
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }
    if "distilled" in name:  # the distilled DeiT constructor fixes its tokens and pooling itself
        for key in ("class_token", "global_pool", "fc_norm", "no_embed_class"):
            kwargs.pop(key)
    return ModelSource(name, kwargs)


SourceFallback = Literal["infer", "infer-or-none", "arch"]


@overload
def model_source(model: TimmModule, *, fallback: Literal["infer"]) -> ModelSource: ...
@overload
def model_source(model: TimmModule, *, fallback: Literal["infer-or-none", "arch"]) -> ModelSource | None: ...
def model_source(model: TimmModule, *, fallback: SourceFallback) -> ModelSource | None:
    """What `model` was built from: the source p3bkit recorded on it (`p3b_source`: set by
    `create_stock_model`, `load` and surgery), or else, by `fallback`:

    - "infer": read back from its modules (`infer_source`), for a model made outside p3bkit;
    - "infer-or-none": the same, None when it cannot be told (`save` refuses such a model later);
    - "arch": the source of the architecture file applied to it (`p3b_arch`), else None; nothing is inferred.

    Raises:
        ArchError: with "infer", when the model does not name its timm architecture.
    """
    recorded = getattr(model, "p3b_source", None)
    if recorded:
        return recorded
    if fallback == "arch":
        arch = getattr(model, "p3b_arch", None)
        return arch.source if arch is not None else None
    try:
        return infer_source(model)
    except ArchError:
        if fallback == "infer":
            raise
        return None


def _mlp_ratio(model: TimmModule) -> float:
    return model.blocks[0].mlp.fc1.out_features / model.embed_dim
