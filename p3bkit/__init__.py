"""p3bkit: prune timm Vision Transformers with P3B (Pruning by Block Benefit) and ship them."""

from __future__ import annotations

from p3bkit.version import __version__

__all__ = ["add_gates", "apply_surgery", "load", "save", "create_model", "__version__"]


def __getattr__(name: str):
    # lazy: `import p3bkit` and `p3bkit --help` stay fast (torch/timm load on first use)
    if name in ("add_gates", "load", "save"):
        from p3bkit import models

        return getattr(models, name)
    if name == "apply_surgery":
        from p3bkit.surgery import apply_surgery

        return apply_surgery
    if name == "create_model":
        from p3bkit.models.factory import create_model

        return create_model
    raise AttributeError(f"module 'p3bkit' has no attribute {name!r}")
