"""Option types, option groups and the error boundary shared by every command."""

from __future__ import annotations

import json
import re
import sys
from functools import wraps

import click

from p3bkit.data.transforms import AUGMENTS
from p3bkit.errors import P3BError, message_of


class Device(click.ParamType):
    """cpu, cuda, cuda:N or gpu (= cuda): one spelling for every command."""

    name = "cpu|cuda[:N]|gpu"

    def convert(self, value, param, ctx):
        v = str(value).lower()
        if v == "gpu":
            v = "cuda"
        if v == "cpu" or v == "cuda" or re.fullmatch(r"cuda:\d+", v):
            return v
        self.fail(f"{value!r} is not a device: use cpu, cuda, cuda:N or gpu", param, ctx)


DEVICE = Device()
POSITIVE = click.IntRange(min=1)
RATE = click.FloatRange(0.0, 1.0)


data_option = click.option(
    "--data",
    help="Your data: an ImageFolder (train/ and val/ with one folder per class) or a CIFAR-100 folder; "
    "`digits` is the embedded set, the default for the digits presets and models made from them.",
)


def train_recipe_options(fn):
    """--recipe and --lr of `train` and `finetune`."""
    from p3bkit.train.recipes import RECIPE_CHOICES

    fn = click.option(
        "--lr",
        type=click.FloatRange(min=0, min_open=True),
        help="Base lr at batch 512, scaled by batch/512 [the recipe's: scratch 1.6e-2, finetune 4e-3, "
        "i.e. 2e-3 / 5e-4 at batch 64].",
    )(fn)
    return click.option(
        "--recipe",
        type=click.Choice(RECIPE_CHOICES),
        default="auto",
        show_default=True,
        help="Learning-rate defaults: scratch (no weights loaded) or finetune (weights loaded); "
        "auto picks by whether weights were loaded. The settings are printed at start.",
    )(fn)


TEACHER_HELP = {  # what auto means for each command, and what the teacher measured (its default)
    "finetune": "auto, the one the pruned folder was pruned from (recorded in its teacher.json) when it can be "
    "rebuilt here; none; or a dense model folder or weights file of the pruned model's architecture. "
    "Off by default: on digits it added nothing measurable (README, Results).",
    "prune": "auto, the model being pruned as loaded (a frozen copy, when weights were loaded: a dense folder, "
    "--weights or pretrained weights with their classifier); none; or a dense model folder or weights file "
    "of the model's architecture. The default: after fine-tuning it added +1.25 / +0.65 points at 75 / 90% "
    "pruned on MNIST and +0.00 / +0.06 on digits (5 paired seeds each), for a teacher forward pass per step "
    "(README). From random weights there is no teacher, and prune says so.",
}


def distill_options(command: str, default: str):
    """--teacher, --kd-weight and --kd-temperature of `finetune` or `prune` (defaults: `train.distill`;
    `default`: the command's --teacher default)."""
    from p3bkit.train.distill import KD_TEMPERATURE, KD_WEIGHT

    def add(fn):
        for option in reversed(
            [
                click.option(
                    "--teacher",
                    default=default,
                    show_default=True,
                    metavar="auto|none|PATH",
                    help="Distil from a dense model (logit distillation): " + TEACHER_HELP[command],
                ),
                click.option(
                    "--kd-weight",
                    type=RATE,
                    default=KD_WEIGHT,
                    show_default=True,
                    help="Share w of the distillation term: (1 - w)·CE + w·T²·KL(teacher ‖ student).",
                ),
                click.option(
                    "--kd-temperature",
                    type=click.FloatRange(min=0, min_open=True),
                    default=KD_TEMPERATURE,
                    show_default=True,
                    help="Softmax temperature T of the distillation term.",
                ),
            ]
        ):
            fn = option(fn)
        return fn

    return add


workers_option = click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Data-loading processes beside training. 0 loads in the training process: on 2 cores a loader process "
    "competes with the model for them (benchmarks/training_cost.py measures both); with cores to spare and "
    "large images (ImageFolder decoding, augmentation) 2-8 hide the loading time.",
)


augment_option = click.option(
    "--augment",
    type=click.Choice(list(AUGMENTS)),
    default="auto",
    show_default=True,
    help="Training augmentation for ImageFolder/CIFAR data. deit: RandAugment, random erasing, Mixup/CutMix; light: "
    "shifts, small crops, flips; auto: deit to fine-tune a pretrained model on images ≥ 128 px (and always "
    "under prune --recipe paper), else light.",
)


def architecture_options(fn):
    """The timm constructor arguments: --num-classes, --img-size, --model-kwargs."""
    for option in reversed(
        [
            click.option("--num-classes", type=POSITIVE, help="Classes of your data (timm num_classes)."),
            click.option("--img-size", type=POSITIVE, help="Input resolution (timm img_size)."),
            click.option(
                "--model-kwargs", help="More timm constructor arguments as JSON, e.g. '{\"drop_path_rate\": 0.1}'."
            ),
        ]
    ):
        fn = option(fn)
    return fn


def model_options(fn):
    """--pretrained/--pretrained-file/--weights and the timm constructor arguments."""
    for option in reversed(
        [
            click.option(
                "--pretrained/--no-pretrained",
                default=False,
                show_default=True,
                help="timm pretrained weights (hub or local cache).",
            ),
            click.option(
                "--pretrained-file",
                type=click.Path(dir_okay=False),
                help="Local pretrained weights loaded through timm (position embeddings resampled; a "
                "classifier for another class count is re-initialised).",
            ),
            click.option(
                "--weights",
                "--checkpoint",
                "weights",
                type=click.Path(dir_okay=False),
                help="Local weights of exactly this model (.safetensors or torch state dict), loaded strictly "
                "(--checkpoint is the older spelling).",
            ),
        ]
    ):
        fn = option(fn)
    return architecture_options(fn)


def parse_model_kwargs(kw: dict) -> dict:
    """--num-classes, --img-size and --model-kwargs as one dict of timm constructor arguments."""
    extra = {}
    if kw.get("model_kwargs"):
        try:
            extra = json.loads(kw["model_kwargs"])
        except json.JSONDecodeError as exc:
            raise click.UsageError(f"--model-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise click.UsageError("--model-kwargs must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'")
    for key in ("num_classes", "img_size"):
        if kw.get(key) is not None:
            extra[key] = kw[key]
    return extra


def boundary(fn):
    """The one error boundary: a `P3BError` becomes `error: ...` on stderr and exit code 1
    (`p3bkit --debug COMMAND` re-raises it with its full traceback)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except P3BError as exc:
            root = click.get_current_context().find_root()
            if (root.obj or {}).get("debug"):
                raise
            click.echo(f"error: {message_of(exc)}", err=True)
            sys.exit(1)

    return wrapper
