"""Images as numpy arrays at a model's input size: calibration, validation and parity sets.

Calibration images come from a data set's train split with the evaluation transform (the digits
set without its shift augmentation); validation images are a seeded random subset of its
validation split (an ImageFolder is sorted by class, so the first N would be a few classes).
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import cast

import numpy as np


@dataclass
class ImageArrays:
    """Images [N, C, H, W] float32 with their labels, and the class count of their data set."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int


def _pick(n: int, size: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).permutation(n)[:size].tolist())


def _arrays(ds, pick: list[int]) -> tuple[np.ndarray, np.ndarray]:
    items = [ds[i] for i in pick]
    return np.stack([x.numpy() for x, _ in items]).astype(np.float32), np.array([int(y) for _, y in items])


def train_images(
    name: str, img_size: int, in_chans: int, num_classes: int | None, size: int, seed: int = 0
) -> ImageArrays:
    """`size` images of the train split (evaluation transform), a seeded random subset."""
    from p3bkit.data.datasets import ShiftAugment, load_data

    bundle = load_data(name, img_size=img_size, num_classes=num_classes, in_chans=in_chans, augment="none")
    train = bundle.train.base if isinstance(bundle.train, ShiftAugment) else bundle.train
    order = np.random.default_rng(seed).permutation(len(cast(Sized, train)))[:size]
    x, y = _arrays(train, [int(i) for i in order])
    return ImageArrays(x, y, bundle.num_classes)


def val_images(
    name: str, img_size: int, in_chans: int, num_classes: int | None, size: int | None = None, seed: int = 0
) -> ImageArrays:
    """The validation split, or a seeded random subset of `size` images of it."""
    from p3bkit.data.datasets import load_data

    bundle = load_data(name, img_size=img_size, num_classes=num_classes, in_chans=in_chans, augment="none")
    n = len(cast(Sized, bundle.val))
    x, y = _arrays(bundle.val, _pick(n, size, seed) if size is not None and size < n else list(range(n)))
    return ImageArrays(x, y, bundle.num_classes)


def digits_images(img_size: int, in_chans: int, n: int) -> np.ndarray | None:
    """Up to `n` of sklearn's digits validation images at a square `img_size` (real pixels for parity
    checks of reduced precision when the user gave no data); None for other channel counts."""
    from p3bkit.data.datasets import load_digits_data

    if in_chans not in (1, 3):
        return None
    from torch.utils.data import TensorDataset

    val = cast(TensorDataset, load_digits_data(img_size, augment=False, in_chans=in_chans).val)
    return val.tensors[0][:n].numpy()
