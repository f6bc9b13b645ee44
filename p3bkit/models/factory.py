"""One entry point for every model a command accepts: preset, timm name, pruned folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from p3bkit.errors import ArchError, first_line
from p3bkit.models.adapter import TimmModule
from p3bkit.models.arch import ARCH_FILE, ModelSource, create_stock_model, load
from p3bkit.models.presets import MODEL_PRESETS

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".xml", ".plan", ".engine")
VIT_MODULES = ("vision_transformer", "deit")  # the timm modules whose models `inspect_vit` can accept


def check_model_kwargs(kwargs: dict) -> None:
    """Refuse constructor arguments timm's VisionTransformer does not take (typos, other families)."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer

    known = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ArchError(
            f"unknown timm VisionTransformer argument(s) {', '.join(unknown)} (it takes e.g. img_size, "
            "num_classes, drop_path_rate, global_pool, reg_tokens, init_values)"
        )


def resolve_source(name: str, **kwargs) -> ModelSource:
    """A preset name or a timm model name (checked against timm's registry)."""
    import timm

    check_model_kwargs(kwargs)
    if name in MODEL_PRESETS:
        base = MODEL_PRESETS[name]
        return ModelSource(base.name, {**base.kwargs, **kwargs})
    if not timm.is_model(name):
        raise ArchError(
            f"unknown model {name!r}: not a p3bkit preset ({', '.join(MODEL_PRESETS)}), "
            "a timm model name or a pruned model folder"
        )
    if not timm.models.is_model_in_modules(name, VIT_MODULES):  # before its constructor sees ViT arguments
        raise ArchError(
            f"model {name!r} is not a timm VisionTransformer (p3bkit prunes the ViTs of timm's "
            f"{' and '.join(VIT_MODULES)} modules)"
        )
    return ModelSource(name, dict(kwargs))


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file strictly (.safetensors, or a torch file read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ArchError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(path)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ArchError(
                f"weights file {path} is unreadable as safetensors ({type(exc).__name__}: {first_line(exc)})"
            ) from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe files
            raise ArchError(
                f"weights file {path} is unreadable: not a .safetensors file nor a torch state dict "
                f"that loads with weights_only=True ({type(exc).__name__})"
            ) from exc
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ArchError(f"weights file {path} does not fit the model: {first_line(exc)}") from exc


def _classifier_rows(path: Path) -> int | None:
    """Rows of `head.weight` in a weights file (the class count it was trained for), if present."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return f.get_slice("head.weight").get_shape()[0] if "head.weight" in f.keys() else None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, unsafe or foreign files raise many types
        raise ArchError(
            f"pretrained file {path} is unreadable: not a .safetensors file nor a torch state dict that "
            f"loads with weights_only=True ({type(exc).__name__})"
        ) from exc
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else {}
    head = state.get("head.weight") if isinstance(state, dict) else None
    return int(head.shape[0]) if head is not None else None


def pretrained_overlay(pretrained_file: str | os.PathLike) -> dict:
    """timm's `pretrained_cfg_overlay` for a local weights file (its own class count included)."""
    path = Path(pretrained_file)
    if not path.is_file():
        raise ArchError(f"pretrained file {path} does not exist")
    rows = _classifier_rows(path)
    return {"file": str(path), **({"num_classes": rows} if rows else {})}


def create_model(
    name: str, pretrained: bool = False, weights: str | None = None, pretrained_file: str | None = None, **kwargs
) -> TimmModule:
    """Build a model from a pruned folder, a preset or a timm name (+ optional local weights).

    `pretrained=True` uses timm's own loader (hub or local cache); `pretrained_file` loads a local
    file through the same loader (position embeddings resampled; a classifier for another class
    count is dropped and re-initialised); `weights` loads a state dict strictly.
    """
    from p3bkit.models.adapter import inspect_vit

    if (Path(name) / ARCH_FILE).is_file():
        return load(name)
    if Path(name).is_dir():
        hint = f"; did you mean {Path(name) / 'pruned'}?" if (Path(name) / "pruned" / ARCH_FILE).is_file() else ""
        raise ArchError(f"{name} is a folder but not a pruned model (no {ARCH_FILE}){hint}")
    looks_like_path = ("/" in name and not name.startswith(("hf-hub:", "timm/"))) or Path(name).suffix in FILE_SUFFIXES
    if looks_like_path and not Path(name).exists():
        raise ArchError(f"{name}: no such file or folder (nor a preset or timm model name)")
    overlay = pretrained_overlay(pretrained_file) if pretrained_file else None
    model = create_stock_model(
        resolve_source(name, **kwargs), pretrained=pretrained or overlay is not None, overlay=overlay
    )
    inspect_vit(model)  # refuse what p3bkit cannot prune, export or measure, before any work
    _check_patch_grid(model, name)
    if weights:
        load_weights(model, weights)
    return model


def _check_patch_grid(model: TimmModule, name: str) -> None:
    """Refuse an input size the patches do not tile: the rest of every row and column would be dropped."""
    pe = model.patch_embed
    size, patch = tuple(pe.img_size), tuple(pe.patch_size)
    if any(s % p for s, p in zip(size, patch)):
        fit = patch[0] * max(1, round(size[0] / patch[0]))
        raise ArchError(
            f"{name}: image size {size[0] if size[0] == size[1] else size} is not a multiple of the patch "
            f"size {patch[0] if patch[0] == patch[1] else patch}; use e.g. --img-size {fit}"
        )


def source_of(ref: str) -> ModelSource | None:
    """What a model reference was built from, without building it: a model folder's source, a preset's
    or timm name's own; None for anything else (an artefact, a file)."""
    if (Path(ref) / ARCH_FILE).is_file():
        from p3bkit.models.arch import read_arch

        return read_arch(ref).source
    if Path(ref).exists():
        return None
    try:
        return resolve_source(ref)
    except ArchError:
        return None


def loads_weights(
    name: str, pretrained: bool = False, pretrained_file: str | None = None, weights: str | None = None
) -> bool:
    """Whether `build_user_model` with these options loads trained weights (else: random init)."""
    return bool(pretrained or pretrained_file or weights) or (Path(name) / ARCH_FILE).is_file()


def build_user_model(
    name: str,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    weights: str | None = None,
    kwargs: dict | None = None,
    say=None,
) -> TimmModule:
    """`create_model` for a command's --model and its options, saying (through `say`) when a
    pretrained classifier was dropped for another class count."""
    kwargs = kwargs or {}
    if (Path(name) / ARCH_FILE).is_file() and kwargs:
        raise ArchError(f"{name} is a saved model: its constructor arguments are fixed ({', '.join(kwargs)} given)")
    model = create_model(name, pretrained=pretrained, weights=weights, pretrained_file=pretrained_file, **kwargs)
    rows = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if say is not None and pretrained_file and rows and rows != model.num_classes:
        say(
            f"note: {pretrained_file} has a {rows}-class classifier; the model's {model.num_classes}-class "
            "classifier starts from random weights (everything else is loaded)"
        )
    return model
