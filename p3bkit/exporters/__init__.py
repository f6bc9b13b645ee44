"""Exporters: ONNX, OpenVINO IR and TensorRT engines, each verified against PyTorch.

`export_model` writes into a temporary folder beside the output, verifies the artefact, and
only then moves it into place with its JSON record: a failed export leaves nothing behind and
never overwrites a previous good artefact.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from p3bkit.errors import ExportError, P3BError
from p3bkit.exporters.registry import formats, get_backend
from p3bkit.fileio import write_json_atomic

if TYPE_CHECKING:
    from p3bkit.exporters.quantize import Int8Config

Format = Literal["onnx", "openvino", "trt"]  # the registry's export formats (`formats()`), for type checkers


def artefact_name(fmt: str) -> str:
    """The file an export of this format writes (model.onnx, model.xml, model.plan)."""
    return get_backend(fmt).artefact


@dataclass
class ExportRecord:
    """What was exported, how, and how closely it matches PyTorch (written next to the artefact)."""

    format: str
    files: list[str]
    source: str
    opset: int
    precision: str
    input_name: str
    input_shape: list
    write_op: str
    verified: bool
    parity: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)
    op_types: dict = field(default_factory=dict)
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    native_precision: str = ""
    parity_inputs: str = "seeded noise"


def _versions(backend) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for n in dict.fromkeys(["torch", "timm", "onnx", "onnxruntime", "onnxscript", *backend.packages]):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "missing"
    return out


def _parity_images(model, precision: str, static_batch: int | None, data) -> tuple[list | None, str]:
    """Inputs for the parity check: fp32 keeps seeded noise (max abs diff); reduced precision is
    judged on real images — the INT8 validation split, else sklearn's digits at the model's input
    size (real pixels, if not the user's domain), else noise for other channel counts."""
    from p3bkit.exporters.runtimes import fixed_batches

    n = static_batch or 64
    if data is not None:
        return [data.chunks(data.val_x[:n], n)[0]], \
            f"{min(n, len(data.val_x))} validation images of {data.config.val_data or data.config.calib_data}"
    c, (h, w) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    if precision == "fp32" or c not in (1, 3) or h != w:
        return None, "seeded noise"
    from p3bkit.train.data import load_digits_data

    val = load_digits_data(h, augment=False, in_chans=c).val.tensors[0][:n].numpy()
    if static_batch:  # a fixed batch takes exactly n images
        val = fixed_batches(val, n)[0]
    return [val], f"{min(n, 360)} images of sklearn's digits"


def export_model(model_ref: str, fmt: Format, out_dir: str | Path, precision: str | None = None,
                 static_batch: int | None = None, verify: bool = True, write_op: str | None = None,
                 trt_profile: tuple[int, int, int] = (1, 1024, 1024), timing_cache: str | None = None,
                 int8: Int8Config | None = None) -> ExportRecord:
    """Export a pruned folder / timm name / preset to `out_dir` and verify it (see module doc).

    INT8 needs `int8` (calibration data and the accuracy gate); its parity check runs on real
    validation images, since quantisation error on noise says little about images.
    """
    from p3bkit.exporters.quantize import load_int8_data
    from p3bkit.exporters.verify import verify_runner
    from p3bkit.models.factory import create_model
    from p3bkit.models.pruned import set_write_op

    if fmt not in formats():
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(formats())}")
    backend = get_backend(fmt)
    precision = backend.precision(precision)
    if precision == "int8" and int8 is None:
        raise ExportError("INT8 export needs calibration images: give --calib-data (digits, an ImageFolder, ...)")
    if precision != "int8" and int8 is not None:
        raise ExportError(f"calibration data is for --precision int8, not {precision}")
    backend.check_dependencies(precision)  # fail fast: nothing is built and nothing written on a machine that can't
    if verify:
        backend.run_precision(precision)  # e.g. OpenVINO bf16 on a CPU without bf16 units: before any work
    write_op = write_op or backend.write_op
    model = set_write_op(create_model(model_ref).eval(), write_op)
    sample = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    data = load_int8_data(int8, model, static_batch) if int8 else None  # bad data fails here, before any export work
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    t0 = time.time()
    try:
        try:
            files, info = backend.export(model, tmp, sample, precision, static_batch,
                                         {"trt_profile": trt_profile, "timing_cache": timing_cache, "int8": data})
        except P3BError:
            raise
        except Exception as exc:  # the runtimes' own converters and quantisers raise many types
            raise ExportError(f"{backend.name} {precision} export failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
        parity, seen = {}, "seeded noise"
        if verify:
            inputs, seen = _parity_images(model, precision, static_batch, data)
            parity = verify_runner(model.to(backend.device), backend.runner(tmp / files[0], precision), sample,
                                   backend.tolerance(precision), (static_batch,) if static_batch else (1, 4),
                                   device=backend.device, inputs=inputs)
        record = ExportRecord(format=backend.format, files=files, source=str(model_ref), opset=18, precision=precision,
                              input_name="pixel_values", input_shape=[static_batch or "batch", *sample],
                              write_op=write_op, verified=verify, parity=parity,
                              tolerance=asdict(backend.tolerance(precision)), op_types=info.get("op_types", {}),
                              seconds=time.time() - t0, versions=_versions(backend), extra=info.get("extra", {}),
                              native_precision=backend.precisions[precision], parity_inputs=seen)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.replace(tmp / f, out_dir / f)
        write_json_atomic(out_dir / f"{backend.artefact}.json", asdict(record))
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
