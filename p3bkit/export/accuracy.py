"""`p3bkit eval`: top-1 / top-5 of what you deploy, on your validation images, through its runtime.

A model reference is a pruned or dense model folder, a preset or timm name (run in torch), an
exported artefact (`.onnx` → onnxruntime, `.xml` → OpenVINO, `.plan` → TensorRT) or an export
folder holding one. The validation split is read at the artefact's own input size and channels
and scored with the same batched logits and hit count as the INT8 gate (`run_logits`, `top_hits`), so
the two agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p3bkit.backends import FP32, backend_for_artefact, eager_backend, get_backend
from p3bkit.backends.quantization import run_logits, top_hits
from p3bkit.errors import P3BError
from p3bkit.export.records import artefact_in_folder, artefact_precision, read_record, record_path


def _input_dims(path: str, run) -> tuple[int | None, tuple[int, ...]]:
    """(fixed batch or None, (C, H, W)) from the export record, else from the runtime."""
    dims = read_record(path).get("input_shape") or getattr(run, "input_shape", None)
    if not dims or not all(isinstance(d, int) for d in dims[1:]):
        raise P3BError(f"{path}: no export record ({Path(path).name}.json) next to it; export with p3bkit export")
    fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    return fixed, tuple(int(d) for d in dims[1:])


def _resolve(ref: str, backend: str | None, precision: str | None) -> tuple[str, str, str]:
    """(artefact or model reference, backend name, precision it runs at); refuses mismatches."""
    ref = artefact_in_folder(ref, backend)
    owner = backend_for_artefact(ref)
    inferred = owner.name if owner else None
    if backend and inferred and backend != inferred:
        raise P3BError(f"{ref} is a {Path(ref).suffix} artefact, which {backend} cannot run (use {inferred})")
    name = backend or inferred or eager_backend().name
    if owner is None:
        if get_backend(name).format:
            raise P3BError(f"--backend {name} runs exported artefacts: export {ref} first (p3bkit export)")
        if precision not in (None, FP32):
            raise P3BError("eval runs torch models in fp32; export the model to run it at another precision")
        return ref, name, FP32
    return ref, name, get_backend(name).run_precision(artefact_precision(ref), precision)


def run_eval(
    ref: str,
    data: str | None = None,
    backend: str | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
    precision: str | None = None,
) -> dict:
    """Top-1 (and top-5 with ≥ 5 classes) in percent on the validation split of `data`.

    `precision`: run an artefact at another precision its runtime honours (an fp32 OpenVINO IR at
    bf16); default its own. Refused where the runtime would ignore it."""
    from p3bkit.console import progress as bar
    from p3bkit.data import load_data, make_loader

    ref, backend, precision = _resolve(ref, backend, precision)
    be = get_backend(backend)
    run = be.runner(ref, precision, threads, device)  # a model that is not a ViT is refused here, before data
    if data is None:
        from p3bkit.console import notify
        from p3bkit.export.records import exported_from
        from p3bkit.models.factory import source_of
        from p3bkit.models.presets import default_data

        data = default_data(source_of(exported_from(ref)), notify)
    fixed, (c, h, w) = _input_dims(ref, run)
    num_classes = run_logits(run, np.zeros((1, c, h, w), dtype=np.float32), 1, fixed).shape[-1]
    val = load_data(data, img_size=h, num_classes=num_classes, in_chans=c).val
    hits = np.zeros(2, dtype=np.int64)
    total = 0
    for x, y in bar(make_loader(val, batch_size, shuffle=False), desc=f"eval {backend}", enabled=progress):
        logits = run_logits(run, x.numpy().astype(np.float32), batch_size, fixed)
        hits += top_hits(logits, y.numpy())
        total += len(y)
    out = {
        "model": ref,
        "backend": backend,
        "precision": precision,
        "data": data,
        "images": total,
        "top1": 100.0 * hits[0] / max(total, 1),
    }
    if num_classes >= 5:
        out["top5"] = 100.0 * hits[1] / max(total, 1)
    return out


def record_accuracy(artefact: str | Path, data: str, progress: bool = True) -> dict:
    """Measure an exported artefact on `data` and store the result in its export record."""
    from p3bkit.fileio import write_json_atomic

    result = run_eval(str(artefact), data, progress=progress)
    write_json_atomic(record_path(artefact), {**read_record(artefact), "accuracy": result})
    return result
