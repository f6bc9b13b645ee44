"""Training augmentation: the DeiT recipe never crashes at its top magnitude; the default fits the task."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from p3bkit.data.transforms import resolve_augment, train_transform


def test_deit_augmentation_never_crashes_at_its_top_magnitude():
    t = train_transform(32, "deit")
    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    for i in range(2000):  # the magnitude noise reaches the cap in about half of the draws
        random.seed(i)
        torch.manual_seed(i)
        assert t(img).shape == (3, 32, 32)


def test_augmentation_default_fits_the_task():
    assert resolve_augment("auto", pretrained=True, img_size=224) == "deit"
    assert resolve_augment("auto", pretrained=False, img_size=224) == "light"
    assert resolve_augment("auto", pretrained=True, img_size=28) == "light"
    assert resolve_augment("none", pretrained=True, img_size=224) == "none"
