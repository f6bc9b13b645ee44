"""INT8 post-training quantisation behind an accuracy gate (the runtime-agnostic half).

Calibration images come from the user's data (the train split, evaluation transform); the gate
compares top-1 of the fp32 graph and of the INT8 artefact on the validation split, both through
the runtime (the backend's `quantize` measures them and applies the remedy: the layers that add
the most quantisation error stay in fp32).
Above `max_drop` points the export fails with `ExportError` and writes nothing. What was
calibrated, both accuracies and what stayed in higher precision go into the export record.

Synthetic images carry random labels, so a top-1 on them says nothing about accuracy: with a
synthetic validation set the gate is not applied (no remedy runs, the record says so) rather than
reverting layers to fp32 over label noise. A validation set whose one changed prediction moves
top-1 by more than `max_drop` makes the gate allow no change at all: the record notes the step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from p3bkit.backends.quantization import Int8Data, QuantResult

if TYPE_CHECKING:
    from p3bkit.models.adapter import TimmModule

NOT_GATED = "synthetic images have random labels, so top-1 on them says nothing about accuracy"


@dataclass
class Int8Config:
    """What `p3bkit export --precision int8` calibrates on and how strict its gate is."""

    calib_data: str
    calib_size: int = 300
    val_data: str | None = None  # default: the validation split of calib_data
    max_drop: float = 1.0  # top-1 points
    val_size: int = 2000  # validation images for the gate (a seeded random subset of larger splits)
    seed: int = 0

    @property
    def val_name(self) -> str:
        return self.val_data or self.calib_data

    @property
    def gated(self) -> bool:
        """Whether the gate's images have labels a top-1 can be measured against."""
        return self.val_name != "synthetic"


@dataclass
class Int8Images:
    """The arrays a quantiser works on, and where they came from (for the record)."""

    data: Int8Data
    config: Int8Config
    data_classes: int
    model_classes: int


def load_int8_data(cfg: Int8Config, model: TimmModule, static_batch: int | None = None) -> Int8Images:
    """Calibration and validation images at the model's input size, channels and classes."""
    from p3bkit.data.arrays import train_images, val_images

    c, (h, _) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    k = model.num_classes
    calib = train_images(cfg.calib_data, h, c, k, cfg.calib_size, cfg.seed)
    val = val_images(cfg.val_name, h, c, k, cfg.val_size, cfg.seed)
    max_drop = cfg.max_drop if cfg.gated else math.inf  # no remedy over label noise
    return Int8Images(Int8Data(calib.x, val.x, val.y, max_drop, static_batch), cfg, val.num_classes, k)


def gate(result: QuantResult, images: Int8Images) -> dict:
    """The record of a quantisation; raises when its accuracy drop is above the gate's limit."""
    cfg, data = images.config, images.data
    if cfg.gated:
        result.check(cfg.max_drop)
    drop = result.drop
    step = 100.0 / max(len(data.val_y), 1)
    return {
        "gated": cfg.gated,
        "not_gated_because": None if cfg.gated else NOT_GATED,
        "top1_step": step,
        "calib_data": cfg.calib_data,
        "calib_size": len(data.calib),
        "val_data": cfg.val_name,
        "val_images": len(data.val_x),
        "val_classes": images.data_classes,
        "model_classes": images.model_classes,
        "fp32_top1": result.fp32_top1,
        "int8_top1": result.int8_top1,
        "drop": drop,
        "max_drop": cfg.max_drop,
        **{k: v for k, v in asdict(result).items() if k not in ("fp32_top1", "int8_top1")},
    }
