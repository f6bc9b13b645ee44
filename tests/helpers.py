"""Shared test helpers (plain functions; the fixtures are in conftest.py): tiny timm ViTs of
several shapes, random gate masks, and a real-digits ImageFolder."""

from __future__ import annotations

import torch

from p3bkit.models.arch import ModelSource, create_stock_model

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "num_classes": 7}
CONFIGS = {
    "cls": ModelSource("vit_tiny_patch16_224", dict(TINY)),
    "avgpool": ModelSource("vit_tiny_patch16_224", {**TINY, "global_pool": "avg", "class_token": False}),
    "registers_ls": ModelSource("vit_tiny_patch16_224", {**TINY, "reg_tokens": 2, "init_values": 0.1}),
    "no_qkv_bias": ModelSource("vit_tiny_patch16_224", {**TINY, "qkv_bias": False}),
    "distilled": ModelSource("deit_tiny_distilled_patch16_224", dict(TINY)),
}


def tiny_model(name: str = "cls", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_stock_model(CONFIGS[name]).eval()
    with torch.no_grad():  # LayerScale/zero-init heads would hide errors: randomise everything
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def random_masks(gated, prune: float, seed: int = 0, empty: tuple[str, ...] = ()) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, gate in gated.gates.items():
        gate.mask.copy_((torch.rand(gate.size, generator=gen) >= prune).float())
        if gate.kept() == 0:
            gate.mask[0] = 1.0
    for name in empty:
        gated.gates[name].mask.zero_()


def digit_image_folder(root, n_per_class=6, classes=3):
    """An ImageFolder (train/ and val/) of real digit images as 32×32 RGB PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            imgs = digits.images[digits.target == c][:n_per_class]
            for i, im in enumerate(imgs):
                arr = (im * 15).astype("uint8").repeat(4, 0).repeat(4, 1)
                Image.fromarray(arr).convert("RGB").save(root / split / f"c{c}" / f"{i}.png")
    return root
