"""Named model presets (a table): small timm ViT configs for the embedded digits data set."""
from __future__ import annotations

from p3bkit.models.arch import ModelSource

MODEL_PRESETS: dict[str, ModelSource] = {
    # 16×16 grayscale digits, 4×4 patches → 16 tokens, avg pool, ~0.2M parameters
    "digits-vit": ModelSource("vit_tiny_patch16_224", {
        "img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
        "depth": 6, "num_heads": 4, "mlp_ratio": 4.0, "global_pool": "avg", "class_token": False}),
    # the same with a class token (class-token BPI heads, DeiT-like)
    "digits-vit-cls": ModelSource("vit_tiny_patch16_224", {
        "img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
        "depth": 6, "num_heads": 4, "mlp_ratio": 4.0}),
    # DeiT-style distilled variant (class + distillation token), for the KD path
    "digits-deit-distilled": ModelSource("deit_tiny_distilled_patch16_224", {
        "img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
        "depth": 6, "num_heads": 4}),
}
