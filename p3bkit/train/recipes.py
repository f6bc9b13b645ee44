"""Training recipes for `train` and `finetune`: from scratch or from loaded weights.

A recipe fills the learning rate the user did not give. Its base lr is the rate at batch 512,
scaled by batch/512 as in DeiT, and capped at `max_lr` so a large batch cannot scale a small-data
rate into divergence (an lr given with `--lr` is scaled, never capped: it is the user's).

- `scratch` (no weights loaded): base 1.6e-2, 2e-3 at batch 64 — what a small ViT needs to learn
  a few thousand images on a CPU in tens of epochs (DeiT's 5e-4 is sized for ImageNet's 300
  epochs and learns nothing here in 10).
- `finetune` (weights loaded: a pretrained model, a model folder, a pruned model): base 4e-3,
  5e-4 at batch 64, the rate `prune --recipe quick` trains with.

`auto` picks `finetune` when weights were loaded and `scratch` otherwise. Warm-up is a tenth of
the epochs, at most 5.
"""

from __future__ import annotations

from dataclasses import dataclass

from p3bkit.errors import P3BError


@dataclass(frozen=True)
class TrainRecipe:
    name: str
    lr: float  # base lr at batch 512
    max_lr: float  # the scaled default never exceeds this
    when: str  # which runs it is for (printed)


TRAIN_RECIPES: dict[str, TrainRecipe] = {
    "scratch": TrainRecipe("scratch", 1.6e-2, 2e-3, "no weights loaded"),
    "finetune": TrainRecipe("finetune", 4e-3, 5e-4, "weights loaded"),
}
RECIPE_CHOICES = ("auto", *TRAIN_RECIPES)


def choose_recipe(name: str, weights_loaded: bool) -> TrainRecipe:
    """The recipe `name` names, or for `auto` the one that fits whether weights were loaded."""
    if name == "auto":
        return TRAIN_RECIPES["finetune" if weights_loaded else "scratch"]
    if name not in TRAIN_RECIPES:
        raise P3BError(f"unknown training recipe {name!r}: choose one of {', '.join(RECIPE_CHOICES)}")
    return TRAIN_RECIPES[name]


def warmup_epochs(epochs: int) -> int:
    return min(5, epochs // 10)


@dataclass(frozen=True)
class LearningRate:
    """The lr a run trains with and where it came from (for the line printed at start)."""

    value: float  # the peak lr the optimizer uses
    source: str

    def __str__(self) -> str:
        return f"lr {self.value:.2e} ({self.source})"


def learning_rate(recipe: TrainRecipe, batch_size: int, base_lr: float | None = None) -> LearningRate:
    """`base_lr` (the user's, scaled by batch/512) or the recipe's scaled and capped rate."""
    if base_lr is not None:
        return LearningRate(base_lr * batch_size / 512, f"--lr {base_lr:g} × {batch_size}/512")
    scaled = recipe.lr * batch_size / 512
    if scaled > recipe.max_lr:
        return LearningRate(recipe.max_lr, f"recipe {recipe.name}: {recipe.lr:g} × {batch_size}/512, capped")
    return LearningRate(scaled, f"recipe {recipe.name}: {recipe.lr:g} × {batch_size}/512")
