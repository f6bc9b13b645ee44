"""Training augmentation that fits the task: the DeiT recipe, light shifts/crops/flips, or none.

`auto` picks the DeiT recipe (RandAugment, random erasing; Mixup/CutMix come with the data) to
fine-tune a pretrained model on images of 128 px or more, and light augmentation to train from
scratch or on small images, where the DeiT recipe was measured far off (benchmarks/augment_digits.py).
"""

from __future__ import annotations

from p3bkit.errors import DataError

AUGMENTS = ("auto", "deit", "light", "none")
# RandAugment m9 with increasing severity, its magnitude capped at 9: at 10, PosterizeIncreasing asks
# Pillow ≥ 13 for 0 bits and raises (the magnitude noise, mstd 0.5, reaches 10 within an epoch)
DEIT_RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"


def resolve_augment(augment: str, pretrained: bool, img_size: int) -> str:
    """`auto`: the DeiT recipe to fine-tune a pretrained model on images ≥ 128 px, else light."""
    if augment not in AUGMENTS:
        raise DataError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment != "auto":
        return augment
    return "deit" if pretrained and img_size >= 128 else "light"


def normalisation(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean/std for colour images; 0.5/0.5 for one channel (as the embedded digits)."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)


def eval_transform(img_size: int, in_chans: int = 3):
    """Resize, centre crop (timm's evaluation transform), tensor, normalisation."""
    from timm.data import create_transform

    mean, std = normalisation(in_chans)
    return create_transform(img_size, is_training=False, interpolation="bicubic", mean=mean, std=std)


def train_transform(img_size: int, augment: str, in_chans: int = 3):
    """deit: RandomResizedCrop + RandAugment + random erasing (Mixup/CutMix come with the data);
    light: resize, ±10% shifts, small crops and flips; none: the evaluation transform."""
    from timm.data import create_transform
    from torchvision import transforms as T

    mean, std = normalisation(in_chans)
    if augment == "deit":
        return create_transform(
            img_size,
            is_training=True,
            auto_augment=DEIT_RAND_AUGMENT,
            re_prob=0.25,
            interpolation="bicubic",
            mean=mean,
            std=std,
        )
    if augment == "none":
        return eval_transform(img_size, in_chans)
    return T.Compose(
        [
            T.Resize((img_size, img_size)),
            T.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
