"""`p3bkit eval`: top-1 / top-5 of what you deploy, on your validation images, through its runtime.

A model reference is a pruned or dense model folder, a preset or timm name (run in torch), an
exported artefact (`.onnx` → onnxruntime, `.xml` → OpenVINO, `.plan` → TensorRT) or an export
folder holding one. The validation split is read at the artefact's own input size and channels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from p3bkit.errors import P3BError
from p3bkit.exporters.artefacts import artefact_in_folder

Runner = Callable[[torch.Tensor], np.ndarray]


def _runner(path: str, backend: str, threads: int | None, precision: str,
            device: str) -> tuple[Runner, tuple[int, int, int]]:
    """The registry's runner for `path` (a model for torch, else an artefact), torch-in → logits,
    with the input shape from the export record or the runtime."""
    from p3bkit.exporters.registry import get_backend, read_record
    from p3bkit.exporters.runtimes import fixed_batches

    be = get_backend(backend)
    extra = {"device": device} if backend == "torch" else {}  # torch models run on --device
    run = be.runner(path, precision, threads, **extra)
    dims = read_record(path).get("input_shape") or getattr(run, "input_shape", None)  # a record, else the runtime's
    if not dims or not all(isinstance(d, int) for d in dims[1:]):
        raise P3BError(f"{path}: no export record ({Path(path).name}.json) next to it; export with p3bkit export")
    fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None

    def call(x: torch.Tensor) -> np.ndarray:
        arr = x.numpy().astype(np.float32)
        # a static-batch graph takes exactly `fixed` images: run in chunks, the last one filled
        batches = fixed_batches(arr, fixed) if fixed else [arr]
        outs = [np.asarray(next(iter(run(b).values())), dtype=np.float32) for b in batches]
        return np.concatenate(outs)[:len(arr)]

    return call, tuple(int(d) for d in dims[1:])


def run_eval(ref: str, data: str, backend: str | None = None, batch_size: int = 64, threads: int | None = None,
             device: str = "cpu", progress: bool = True, precision: str | None = None) -> dict:
    """Top-1 (and top-5 with ≥ 5 classes) in percent on the validation split of `data`.

    `precision`: run an artefact at another precision its runtime honours (an fp32 OpenVINO IR at
    bf16); default its own. Refused where the runtime would ignore it."""
    from p3bkit.train.data import load_data
    from p3bkit.train.loop import make_loader

    from p3bkit.exporters.registry import backend_for_artefact

    ref = artefact_in_folder(ref, backend)
    owner = backend_for_artefact(ref)
    inferred = owner.name if owner else None
    if backend and inferred and backend != inferred:
        raise P3BError(f"{ref} is a {Path(ref).suffix} artefact, which {backend} cannot run (use {inferred})")
    backend = backend or inferred or "torch"
    if backend != "torch" and not inferred:
        raise P3BError(f"--backend {backend} runs exported artefacts: export {ref} first (p3bkit export)")
    if backend == "torch":
        if precision not in (None, "fp32"):
            raise P3BError("eval runs torch models in fp32; export the model to run it at another precision")
        precision = "fp32"
    else:
        from p3bkit.exporters.registry import artefact_precision, get_backend

        precision = get_backend(backend).run_precision(artefact_precision(ref), precision)
    run, (c, h, w) = _runner(ref, backend, threads, precision, device)
    num_classes = run(torch.zeros(1, c, h, w)).shape[-1]
    val = load_data(data, img_size=h, num_classes=num_classes, in_chans=c).val
    hits = np.zeros(2, dtype=np.int64)
    total = 0
    for x, y in tqdm(make_loader(val, batch_size, shuffle=False), desc=f"eval {backend}", disable=not progress,
                     leave=False):
        logits = run(x)
        top = np.argsort(-logits, axis=-1)[:, :5]
        hits += [(top[:, 0] == y.numpy()).sum(), (top == y.numpy()[:, None]).any(-1).sum()]
        total += len(y)
    out = {"model": ref, "backend": backend, "precision": precision, "data": data, "images": total,
           "top1": 100.0 * hits[0] / max(total, 1)}
    if num_classes >= 5:
        out["top5"] = 100.0 * hits[1] / max(total, 1)
    return out


def record_accuracy(artefact: str | Path, data: str, progress: bool = True) -> dict:
    """Measure an exported artefact on `data` and store the result in its export record."""
    from p3bkit.fileio import write_json_atomic

    result = run_eval(str(artefact), data, progress=progress)
    record = Path(f"{artefact}.json")
    write_json_atomic(record, {**json.loads(record.read_text()), "accuracy": result})
    return result
