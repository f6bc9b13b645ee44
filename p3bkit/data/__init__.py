"""Data: datasets (embedded digits, ImageFolder, CIFAR-100, synthetic), augmentation, resumable
loaders, and images as arrays for calibration, validation and parity checks. Used by train,
prune, export and eval; imports nothing from them."""

from __future__ import annotations

_EXPORTS = {
    "DataBundle": "datasets",
    "load_data": "datasets",
    "load_data_for": "datasets",
    "EpochSampler": "loaders",
    "make_loader": "loaders",
    "AUGMENTS": "transforms",
    "resolve_augment": "transforms",
    "train_transform": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy: the CLI reads the augmentation choices without importing torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"p3bkit.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'p3bkit.data' has no attribute {name!r}")
