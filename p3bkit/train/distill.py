"""`finetune --teacher` and `prune --teacher`: learning from the dense model (logit distillation).

`finetune` recovers from the dense model a pruned folder was cut from; `prune` can distil, while it
prunes, from the model it starts from (a frozen copy taken before any gate goes in).

The loss (Hinton et al. 2015, `fit.distillation_loss`) is (1 − w)·CE(student, y) +
w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)). `finetune` runs without a teacher unless asked
(`--teacher auto|PATH`): on digits, 3 paired seeds at 50 / 75 / 90 / 95% pruned, the teacher moved
top-1 by −0.3 to +0.2 points, within the seeds' spread, for one more forward per step
(benchmarks/pareto.py); on MNIST (5 seeds, 75 / 90%) by +0.00 / −0.05. `prune` distils by default
(`--teacher auto`; from random weights there is no teacher): after fine-tuning it added +1.25 / +0.65
points at 75 / 90% pruned on MNIST (every seed at or above) and +0.00 / +0.06 on digits, 5 paired seeds
each, for a teacher forward per step (benchmarks/pareto.py `--name kd_mnist5k`, `kd_digits`). The
weight and temperature:

- `KD_TEMPERATURE = 1`: the teacher is the very model the student was pruned from, so its output
  distribution is the function to recover, not a different model's "dark knowledge" to soften
  out of it.
- `KD_WEIGHT = 0.5`: the labels weigh as much as the teacher, so they still correct it where the
  dense model is wrong on this data (a fine-tune on other data than it was trained on), and the
  label term keeps the recipe's label smoothing or Mixup/CutMix targets.

No module here imports torch at import time: the CLI shows these defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from p3bkit.errors import P3BError, first_line, message_of

if TYPE_CHECKING:
    import torch.nn as nn

    from p3bkit.models.teacher import DenseRef

KD_WEIGHT = 0.5
KD_TEMPERATURE = 1.0
AUTO, NONE = "auto", "none"


def check_kd_settings(weight: float, temperature: float) -> None:
    if not 0 <= weight <= 1:
        raise P3BError(f"the distillation weight must be in [0, 1] (got {weight})")
    if not temperature > 0:
        raise P3BError(f"the distillation temperature must be > 0 (got {temperature})")


def choose_teacher(
    choice: str, pruned: str, weight: float, temperature: float, say: Callable[[str], None]
) -> tuple[nn.Module | None, dict]:
    """The teacher `finetune` distils from, and its record (for finetune.json and the checkpoint's
    settings). `choice`: `auto` (the dense model `pruned/teacher.json` names, when it can be rebuilt
    here; otherwise none, said through `say`), `none`, or a path: a dense model folder or a weights
    file of the pruned model's architecture (anything else is an error)."""
    from p3bkit.models.arch import read_arch
    from p3bkit.models.teacher import build_dense, read_origin

    check_kd_settings(weight, temperature)
    source = read_arch(pruned).source
    if choice == NONE or weight == 0:
        return None, {"teacher": None}
    if choice != AUTO:
        return _teacher_at(choice, source, weight, temperature)
    ref, why = read_origin(pruned)
    if ref is not None and ref.missing():
        why = f"{pruned} was pruned from {', '.join(ref.missing())}, which no longer exists"
        ref = None
    if ref is None:
        say(f"note: fine-tuning without a teacher: {why}")
        return None, {"teacher": None}
    try:
        return build_dense(ref, source), _record(ref, "auto", weight, temperature)
    except (P3BError, OSError) as exc:  # e.g. timm's hub weights not cached here
        say(
            f"note: fine-tuning without a teacher: the dense model {pruned} was pruned from cannot be rebuilt here "
            f"({first_line(exc)})"
        )
        return None, {"teacher": None}


def choose_prune_teacher(
    choice: str, model: nn.Module, origin: dict, weight: float, temperature: float, say: Callable[[str], None]
) -> tuple[nn.Module | None, dict]:
    """The teacher `prune` distils from while it prunes, and its record (for summary.json and the
    checkpoint's settings). `choice`: `auto` (a frozen copy of `model`, the dense model as loaded,
    when weights were loaded into it: `origin` is its `teacher.json`; otherwise none, said through
    `say`), `none`, or a dense model folder or weights file of `model`'s architecture."""
    import copy

    from p3bkit.models.source import infer_source
    from p3bkit.models.teacher import DenseRef

    check_kd_settings(weight, temperature)
    if choice == NONE or weight == 0:
        return None, {"teacher": None}
    if choice != AUTO:
        return _teacher_at(choice, infer_source(model), weight, temperature)
    if origin["dense"] is None:
        say(f"note: pruning without a teacher: {origin['why'].replace('it was pruned from', 'the model has')}")
        return None, {"teacher": None}
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return teacher, _record(DenseRef(**origin["dense"]), "auto", weight, temperature)


def _teacher_at(choice: str, source, weight: float, temperature: float) -> tuple[nn.Module, dict]:
    """`--teacher PATH` of either command: the dense model there, checked against `source` (the
    architecture distilled into), and its record; anything else is a one-line error."""
    from p3bkit.models.teacher import build_dense

    ref = _ref_at(Path(choice), source)
    try:
        return build_dense(ref, source), _record(ref, "path", weight, temperature)
    except (P3BError, OSError) as exc:  # OSError: a file that cannot be read
        raise P3BError(f"teacher {choice}: {message_of(exc)}") from exc


def _ref_at(path: Path, source) -> DenseRef:
    """`--teacher PATH`: a dense model folder, or a weights file of the pruned model's architecture."""
    from p3bkit.models.teacher import DenseRef

    if not path.exists():
        raise P3BError(
            f"teacher {path}: no such file or folder (give a dense model folder, a weights file of "
            f"{source.name}, auto or none)"
        )
    if path.is_dir():
        return DenseRef(str(path.resolve()))
    return DenseRef(source.name, dict(source.kwargs), weights=str(path.resolve()))


def _record(ref: DenseRef, found: str, weight: float, temperature: float) -> dict:
    from dataclasses import asdict

    return {"teacher": {**asdict(ref), "from": found}, "kd_weight": weight, "kd_temperature": temperature}
