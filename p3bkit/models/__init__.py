"""Models: the ViT adapter, gates, pruned branches and layers, the architecture file, costs and
reports (shared by every stage)."""

from __future__ import annotations

_EXPORTS = {
    "ViTSpec": "adapter",
    "inspect_vit": "adapter",
    "ModelSource": "arch",
    "PrunedArch": "arch",
    "apply_arch": "arch",
    "create_stock_model": "arch",
    "load": "arch",
    "read_arch": "arch",
    "save": "arch",
    "Gate": "gates",
    "GatedViT": "gates",
    "add_gates": "gates",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy: importing a light module of this package (outputs, presets) does not import timm or torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"p3bkit.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'p3bkit.models' has no attribute {name!r}")
