"""ImageFolder trees checked before any work: readable images, matching class sets, channels that fit.

Every file's header is read once (a few seconds for tens of thousands of images; a seeded sample of
`CHECK_AT_MOST` for larger trees): an unreadable file is named with its path before training
starts, train/ and val/ must have the same classes (otherwise the labels of one split mean other
classes in the other), and the images' colour mode must fit the model: grayscale images are read as
one channel for a one-channel model, and colour images for a one-channel model are refused with
what to pass instead. A file that becomes unreadable later is still named, never a traceback.
"""

from __future__ import annotations

import random
from pathlib import Path

from p3bkit.errors import DataError

CHECK_AT_MOST = 50_000
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def image_loader(mode: str):
    """A loader that reads an image in `mode` ("L" or "RGB") and names the file it cannot read."""

    def load(path: str):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                return img.convert(mode)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc

    return load


def check_image_folder(root: Path, train, val, in_chans: int) -> None:
    """Refuse what would fail or mislead during training: see the module doc."""
    from PIL import Image, UnidentifiedImageError

    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"{root}: train/ and val/ have different classes (only in train/: "
            f"{', '.join(only_train[:5]) or '-'}; only in val/: {', '.join(only_val[:5]) or '-'}): "
            "labels would mean different classes in the two splits"
        )
    paths = [p for p, _ in train.samples + val.samples]
    if len(paths) > CHECK_AT_MOST:
        paths = random.Random(0).sample(paths, CHECK_AT_MOST)
    color = None
    for path in paths:
        try:
            with Image.open(path) as img:
                mode = img.mode
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: unreadable image ({type(exc).__name__})") from exc
        if mode not in GRAY_MODES and color is None:
            color = path
    if in_chans == 1 and color is not None:
        raise DataError(
            f"{root}: 3-channel images, but the model takes 1 channel (a colour image: {color}): convert "
            "them to grayscale, or build the model for colour (--model-kwargs '{\"in_chans\": 3}')"
        )
    if in_chans not in (1, 3):
        raise DataError(f"{root}: images have 1 or 3 channels, but the model takes {in_chans}")
