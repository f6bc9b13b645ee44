"""One entry point for every model a command accepts: preset, timm name, pruned folder."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from p3bkit.errors import ArchError
from p3bkit.models.arch import ARCH_FILE, ModelSource, create_stock_model, load
from p3bkit.models.presets import PRESETS

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".xml", ".plan", ".engine")


def resolve_source(name: str, **kwargs) -> ModelSource:
    """A preset name or a timm model name (checked against timm's registry)."""
    import timm

    if name in PRESETS:
        base = PRESETS[name]
        return ModelSource(base.name, {**base.kwargs, **kwargs})
    if not timm.is_model(name):
        raise ArchError(f"unknown model {name!r}: not a p3bkit preset ({', '.join(PRESETS)}), "
                        "a timm model name or a pruned model folder")
    return ModelSource(name, dict(kwargs))


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local checkpoint (.safetensors, or a torch file read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ArchError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe files
            raise ArchError(f"checkpoint {path} is unreadable or not a weights-only torch file "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from exc
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise ArchError(f"checkpoint {path} does not fit the model: {str(exc).splitlines()[0][:300]}") from exc


def create_model(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Build a model from a pruned folder, a preset or a timm name (+ optional local checkpoint).

    `pretrained=True` uses timm's own loader (hub or local cache); no network is needed otherwise.
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
    model = create_stock_model(resolve_source(name, **kwargs), pretrained=pretrained)
    inspect_vit(model)  # refuse what p3bkit cannot prune, export or measure, before any work
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model
