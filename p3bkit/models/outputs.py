"""What a ViT's forward returns, read the same way everywhere."""

from __future__ import annotations


def logits_of(out):
    """Class logits of a model output (distilled models in train mode return a tuple)."""
    return out[0] if isinstance(out, tuple) else out
