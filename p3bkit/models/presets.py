"""Named model presets (a table): small timm ViT configs for the embedded digits data set."""

from __future__ import annotations

from p3bkit.models.arch import ModelSource

MODEL_PRESETS: dict[str, ModelSource] = {
    # 16×16 grayscale digits, 4×4 patches → 16 tokens, avg pool, ~0.2M parameters
    "digits-vit": ModelSource(
        "vit_tiny_patch16_224",
        {
            "img_size": 16,
            "patch_size": 4,
            "in_chans": 1,
            "num_classes": 10,
            "embed_dim": 64,
            "depth": 6,
            "num_heads": 4,
            "mlp_ratio": 4.0,
            "global_pool": "avg",
            "class_token": False,
        },
    ),
    # the same with a class token (class-token BPI heads, DeiT-like)
    "digits-vit-cls": ModelSource(
        "vit_tiny_patch16_224",
        {
            "img_size": 16,
            "patch_size": 4,
            "in_chans": 1,
            "num_classes": 10,
            "embed_dim": 64,
            "depth": 6,
            "num_heads": 4,
            "mlp_ratio": 4.0,
        },
    ),
    # DeiT-style distilled variant (class + distillation token), for the KD path
    "digits-deit-distilled": ModelSource(
        "deit_tiny_distilled_patch16_224",
        {
            "img_size": 16,
            "patch_size": 4,
            "in_chans": 1,
            "num_classes": 10,
            "embed_dim": 64,
            "depth": 6,
            "num_heads": 4,
        },
    ),
}


def preset_of(source: ModelSource | None) -> str | None:
    """The preset a model was built from (its architecture name and every preset argument match)."""
    if source is None:
        return None
    for name, preset in MODEL_PRESETS.items():
        if source.name == preset.name and all(source.kwargs.get(k) == v for k, v in preset.kwargs.items()):
            return name
    return None


def default_data(source: ModelSource | None, say=None) -> str:
    """The data a command uses when none is given: the embedded digits set, for the digits presets and the
    models made from them (said through `say`); anything else needs its data named.

    Raises:
        DataError: for a model that is not a digits preset.
    """
    from p3bkit.errors import DataError

    if preset_of(source) is None:
        raise DataError(
            "give --data (an ImageFolder with train/ and val/, or a CIFAR-100 folder): the embedded digits "
            "set fits only the digits presets and the models made from them (--data digits uses it anyway)"
        )
    if say is not None:
        say("data: the embedded digits set (1,797 sklearn digits); --data for your own")
    return "digits"
