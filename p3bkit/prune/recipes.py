"""Pruning recipes: the paper's Table 5 (Appendix C) and a quick one sized for small data.

A recipe fills every pruning setting the user did not give. Learning rates are *base* rates at
batch 512 and are scaled by batch / 512 (the DeiT rule the paper and the authors' code use).

- `paper`: Table 5 exactly — warm-up 3, sparsify 22, sharpen 25 epochs, a mask update every
  1000 iterations (ImageNet-1K; the paper uses 50 / 100 / 500 for CIFAR-100 / IFOOD / iNat19),
  lr 5e-4 for the model and the BPI, τ 0.1, batch 512.
- `quick`: 1 / 4 / 4 epochs, a mask update every 10 iterations, batch 64, base lr 4e-3 (5e-4
  effective at batch 64): for the embedded digits set and other data of a few thousand images.
  A model pruned without loaded weights (random init, trained while it is pruned) takes the
  `scratch` training recipe's model lr instead (`train.recipes`: 2e-3 at batch 64).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from p3bkit.errors import P3BError
from p3bkit.train.recipes import TRAIN_RECIPES


@dataclass(frozen=True)
class Recipe:
    epochs: tuple[int, int, int]  # warm-up, sparsify, sharpen
    update_every: int
    batch_size: int
    lr: float  # base lr at batch 512 (model)
    lr_bpi: float  # base lr at batch 512 (BPI heads)
    tau: float


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(epochs=(3, 22, 25), update_every=1000, batch_size=512, lr=5e-4, lr_bpi=5e-4, tau=0.1),
    "quick": Recipe(epochs=(1, 4, 4), update_every=10, batch_size=64, lr=4e-3, lr_bpi=4e-3, tau=0.1),
}


SCRATCH_LR = TRAIN_RECIPES["scratch"].lr  # quick's base model lr without loaded weights: `train`'s scratch recipe
SCRATCH_MAX_LR = TRAIN_RECIPES["scratch"].max_lr  # ... and its cap once scaled by batch/512


def resolve_recipe(name: str, scratch: bool = False, **overrides) -> dict:
    """The recipe's settings with every non-None override applied (`scratch`: no weights loaded)."""
    if name not in RECIPES:
        raise P3BError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    values = asdict(RECIPES[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if scratch and name == "quick" and overrides.get("lr") is None:  # a base lr, scaled by batch/512 later
        values["lr"] = min(SCRATCH_LR, SCRATCH_MAX_LR * 512 / values["batch_size"])
    values["epochs"] = tuple(values["epochs"])
    return values
