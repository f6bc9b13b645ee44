"""Data: the embedded digits set (scikit-learn), ImageFolder trees, CIFAR-100, synthetic images.

`digits` is sklearn's `load_digits` (1,797 real 8×8 handwritten digits): a fixed stratified
80/20 split (seed 0), upsampled to 16×16, normalised. It ships with scikit-learn, so demos and
accuracy tests run offline.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from p3bkit.data.transforms import eval_transform, resolve_augment, train_transform
from p3bkit.errors import DataError


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    img_size: int
    in_chans: int
    mixup: object | None = None  # timm Mixup for ImageFolder training


class ShiftAugment(Dataset):
    """Random ±1 pixel translation of a tensor data set (train-time augmentation for digits)."""

    def __init__(self, base: TensorDataset, max_shift: int = 1) -> None:
        self.base, self.max_shift = base, max_shift

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        dx, dy = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(1, 2)), y


def load_digits_data(img_size: int = 16, augment: bool = True, in_chans: int = 1) -> DataBundle:
    """The digits split at `img_size`; the gray channel is repeated for `in_chans` = 3 models."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, in_chans, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, va = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    train = TensorDataset(x[tr], y[tr])
    return DataBundle(ShiftAugment(train) if augment else train, TensorDataset(x[va], y[va]), 10, img_size, in_chans)


def load_synthetic_data(num_classes: int, img_size: int, in_chans: int = 3, n: int = 256) -> DataBundle:
    """Random images with random labels: for throughput and smoke runs only."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, in_chans, img_size, img_size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return DataBundle(TensorDataset(x, y), TensorDataset(x[: n // 4], y[: n // 4]), num_classes, img_size, in_chans)


def load_image_folder(
    root: Path, img_size: int, num_classes: int | None, augment: str = "deit", in_chans: int = 3
) -> DataBundle:
    """ImageFolder train/ and val/, checked first (`data.folders`), read with `in_chans` channels;
    with `augment="deit"` also Mixup/CutMix (0.8 / 1.0) + smoothing 0.1."""
    from torchvision.datasets import ImageFolder

    from p3bkit.data.folders import check_image_folder, image_loader

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: expected an ImageFolder tree with {split}/ inside")
    loader = image_loader("L" if in_chans == 1 else "RGB")
    try:
        train = ImageFolder(root / "train", train_transform(img_size, augment, in_chans), loader=loader)
        val = ImageFolder(root / "val", eval_transform(img_size, in_chans), loader=loader)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{root}: {exc}") from exc
    check_image_folder(root, train, val, in_chans)
    k = len(train.classes)
    if num_classes is not None and num_classes != k:
        raise DataError(f"{root}: {k} classes but the model has {num_classes} (set --num-classes {k})")
    return DataBundle(train, val, k, img_size, in_chans, deit_mixup(k) if augment == "deit" else None)


def deit_mixup(num_classes: int):
    """The DeiT recipe's Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 (applied to each training batch)."""
    from timm.data import Mixup

    return Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)


def load_cifar100(root: Path, img_size: int, augment: str = "deit") -> DataBundle:
    """CIFAR-100 from its standard `cifar-100-python` folder (no download); with `augment="deit"` also
    Mixup/CutMix, as for an ImageFolder."""
    from torchvision.datasets import CIFAR100

    try:
        train = CIFAR100(str(root), train=True, download=False, transform=train_transform(img_size, augment))
        val = CIFAR100(str(root), train=False, download=False, transform=eval_transform(img_size))
    except RuntimeError as exc:
        raise DataError(f"{root}: no readable cifar-100-python folder ({exc})") from exc
    return DataBundle(train, val, 100, img_size, 3, deit_mixup(100) if augment == "deit" else None)


def load_data(
    name: str,
    img_size: int | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    augment: str = "deit",
) -> DataBundle:
    """'digits' (default, embedded), 'synthetic', or a path (ImageFolder or CIFAR-100 folder).

    Raises:
        DataError: when the data cannot be read or does not fit the model's input channels.
    """
    bundle = _load(name, img_size, num_classes, in_chans, augment)
    if in_chans is not None and bundle.in_chans != in_chans:
        raise DataError(f"{name}: {bundle.in_chans}-channel images, but the model takes {in_chans} channel(s)")
    return bundle


def _load(name: str, img_size: int | None, num_classes: int | None, in_chans: int | None, augment: str) -> DataBundle:
    if name == "digits":
        if in_chans not in (None, 1, 3):
            raise DataError(f"digits are gray images: the model must take 1 or 3 channels, not {in_chans}")
        return load_digits_data(img_size or 16, in_chans=in_chans or 1)
    if name == "synthetic":
        return load_synthetic_data(num_classes or 10, img_size or 224, in_chans or 3)
    root = Path(name)
    if not root.is_dir():
        raise DataError(f"data {name!r} is neither 'digits', 'synthetic' nor an existing folder")
    if (root / "cifar-100-python").is_dir():
        return load_cifar100(root, img_size or 224, augment)
    return load_image_folder(root, img_size or 224, num_classes, augment, in_chans or 3)


def check_batch(bundle: DataBundle, batch_size: int, world: int = 1, mixup: bool = False) -> int:
    """Training batches per epoch and rank; refuses a batch larger than the data (nothing would train)
    and an odd per-rank batch under Mixup/CutMix (they pair images up)."""
    local = batch_size // world
    n = len(cast(Sized, bundle.train))
    steps = (n // world) // local if local else 0
    if steps == 0:
        raise DataError(f"the training set has {n} images, fewer than one batch of {batch_size}: lower --batch-size")
    if mixup and local % 2:
        raise DataError(f"Mixup/CutMix pair up images: the per-rank batch ({local}) must be even")
    return steps


def load_data_for(model, name: str, augment: str, pretrained: bool, say=None) -> DataBundle:
    """The data at `model`'s input size, channels and classes, with the augmentation that fits.

    `say` (e.g. `p3bkit.console.notify`) is told which augmentation was chosen and why.
    """
    size = model.patch_embed.img_size[0]
    chosen = resolve_augment(augment, pretrained, size)
    bundle = load_data(
        name, img_size=size, num_classes=model.num_classes, in_chans=model.patch_embed.proj.in_channels, augment=chosen
    )
    if say is not None and name not in ("digits", "synthetic"):
        why = (
            ""
            if augment != "auto"
            else (
                " (fine-tuning a pretrained model on images ≥ 128 px)"
                if chosen == "deit"
                else " (training from scratch or images < 128 px; --augment deit for the DeiT recipe)"
            )
        )
        say(f"augmentation: {chosen}{why}")
    return bundle
