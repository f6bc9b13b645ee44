"""The dense model a pruned folder was pruned from, recorded beside it as `teacher.json`.

`p3bkit prune` writes `pruned/teacher.json` so the pruned folder alone says which dense model it
was cut from: `build_user_model`'s arguments (`model`, `model_kwargs`, `pretrained`,
`pretrained_file`, `weights`, paths absolute), or `null` and why when there is no useful one
(random initialisation, or a classifier re-initialised for another class count). `finetune`
distils from that model (Hinton et al. 2015 logit distillation, `train/fit.py`). `p3bkit.load`
reads only `arch.json` and `model.safetensors`, so the file never changes what a folder loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from p3bkit.errors import ArchError
from p3bkit.models.arch import ARCH_FILE, ModelSource

TEACHER_FILE = "teacher.json"
TEACHER_SCHEMA = 1


@dataclass
class DenseRef:
    """How to rebuild a dense model: the arguments of `build_user_model` (paths absolute)."""

    model: str  # a preset, a timm name or a dense model folder
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    pretrained_file: str | None = None
    weights: str | None = None

    def missing(self) -> list[str]:
        """The files and folders it names that are not here (any of them: it cannot be rebuilt)."""
        named = [self.pretrained_file, self.weights, self.model if Path(self.model).is_absolute() else None]
        return [p for p in named if p and not Path(p).exists()]


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def dense_origin(
    model: nn.Module,
    name: str,
    kwargs: dict,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    weights: str | None = None,
) -> dict:
    """The `teacher.json` of a model built by `build_user_model(name, ...)` before anything trained it:
    its reference, or none and why (no weights loaded, or a classifier that started from random weights)."""
    from p3bkit.models.factory import loads_weights

    origin = {"schema": TEACHER_SCHEMA, "dense": None, "why": None}
    if not loads_weights(name, pretrained, pretrained_file, weights):
        return {**origin, "why": "it was pruned from randomly initialised weights"}
    rows = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if (pretrained or pretrained_file) and not weights and rows and rows != model.num_classes:
        return {
            **origin,
            "why": f"its dense model's {model.num_classes}-class classifier started from random weights "
            f"(the pretrained weights have {rows} classes)",
        }
    folder = (Path(name) / ARCH_FILE).is_file()
    ref = DenseRef(
        str(Path(name).resolve()) if folder else name,
        dict(kwargs),
        pretrained,
        _absolute(pretrained_file),
        _absolute(weights),
    )
    return {**origin, "dense": asdict(ref)}


def write_origin(folder: str | os.PathLike, origin: dict) -> None:
    """Write `folder/teacher.json` atomically."""
    from p3bkit.fileio import write_json_atomic

    write_json_atomic(Path(folder) / TEACHER_FILE, origin)


def read_origin(folder: str | os.PathLike) -> tuple[DenseRef | None, str]:
    """A pruned folder's dense model, or None and why there is none."""
    path = Path(folder) / TEACHER_FILE
    if not path.is_file():
        return None, f"{folder} records no dense model it was pruned from (no {TEACHER_FILE})"
    try:
        data = json.loads(path.read_text())
        dense = data["dense"]
        return (DenseRef(**dense), "") if dense is not None else (None, f"{folder}: {data['why']}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ArchError(f"{path}: malformed ({type(exc).__name__}: {exc})") from exc


def build_dense(ref: DenseRef, source: ModelSource) -> nn.Module:
    """Rebuild `ref` and check it is a dense model of the architecture `source` names (a pruned
    model's source): same timm architecture, sizes, tokens, pooling and classes. In eval mode,
    without gradients."""
    from p3bkit.models.arch import create_stock_model, read_arch
    from p3bkit.models.factory import build_user_model
    from p3bkit.models.source import infer_source

    if (Path(ref.model) / ARCH_FILE).is_file() and read_arch(ref.model).layers:
        raise ArchError(f"{ref.model} is a pruned model; a teacher is a dense one (arch.json with no layers)")
    model = build_user_model(ref.model, ref.pretrained, ref.pretrained_file, ref.weights, ref.model_kwargs)
    with torch.device("meta"):  # only its shape is read: no memory, no initialisation
        stock = create_stock_model(source)
    have, want = infer_source(model), infer_source(stock)
    keys = sorted(set(have.kwargs) | set(want.kwargs))
    differ = [
        f"{k} {have.kwargs.get(k)!r} vs {want.kwargs.get(k)!r}"
        for k in keys
        if have.kwargs.get(k) != want.kwargs.get(k)
    ]
    if have.name != want.name or differ:
        what = f"{have.name} vs {want.name}" if have.name != want.name else ", ".join(differ)
        raise ArchError(f"{ref.weights or ref.model} is not a dense model of the pruned model's architecture ({what})")
    return model.eval().requires_grad_(False)
