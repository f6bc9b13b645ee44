"""Export: a pruned folder, timm name or preset → an artefact of a registered backend, verified
against PyTorch, with its record (format, precision, input shape, parity, tolerances, versions).

`export_model` writes into a temporary folder beside the output, verifies the artefact (and, for
INT8, gates its accuracy), and only then moves it into place with its JSON record: a failed
export leaves nothing behind and never overwrites a previous good artefact. The output folder
follows the rule of every writer: new or empty, or `force` (then only this export's own files are
replaced), never the model it exports, and locked while the export writes into it. Runtime-agnostic:
everything runtime-specific is the backend's (`p3bkit.backends`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from p3bkit.backends import FP32, INT8, formats, get_backend
from p3bkit.backends.onnx import OPSET
from p3bkit.errors import ExportError, P3BError, ToleranceError, first_line
from p3bkit.export.int8 import Int8Config, Int8Images
from p3bkit.export.records import record_path
from p3bkit.fileio import check_output_folder, folder_lock, write_json_atomic

if TYPE_CHECKING:
    from p3bkit.models.adapter import TimmModule


def artefact_name(fmt: str) -> str:
    """The file an export of this format writes (model.onnx, model.xml, model.plan)."""
    return get_backend(fmt).exported_as()[1]


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
    from p3bkit.backends.registry import runtime_packages
    from p3bkit.version import package_versions

    return package_versions(*backend.packages, *runtime_packages())


def _parity_images(
    model, precision: str, static_batch: int | None, images: Int8Images | None
) -> tuple[list | None, str]:
    """Inputs for the parity check: fp32 keeps seeded noise (max abs diff); reduced precision is
    judged on real images — the INT8 validation split (unless synthetic), else sklearn's digits at
    the model's input size (real pixels, if not the user's domain), else noise for other channel counts."""
    from p3bkit.backends.quantization import fixed_batches
    from p3bkit.data.arrays import digits_images

    n = static_batch or 64
    if images is not None and images.config.gated:
        data = images.data
        return [
            data.chunks(data.val_x[:n], n)[0]
        ], f"{min(n, len(data.val_x))} validation images of {images.config.val_name}"
    c, (h, w) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    val = digits_images(h, c, n) if precision != FP32 and h == w else None
    if val is None:
        return None, "seeded noise"
    seen = f"{len(val)} images of sklearn's digits"
    if static_batch:  # a fixed batch takes exactly n images (repeated to fill it)
        val = fixed_batches(val, n)[0]
    return [val], seen


def export_model(
    model_ref: str,
    fmt: str,
    out_dir: str | Path,
    precision: str | None = None,
    static_batch: int | None = None,
    verify: bool = True,
    write_op: str | None = None,
    trt_profile: tuple[int, int, int] = (1, 1024, 1024),
    timing_cache: str | None = None,
    int8: Int8Config | None = None,
    force: bool = False,
) -> ExportRecord:
    """Export a pruned folder / timm name / preset to `out_dir` and verify it (see module doc).

    INT8 needs `int8` (calibration data and the accuracy gate); its parity check runs on real
    validation images, since quantisation error on noise says little about images.
    """
    from p3bkit.export.int8 import gate, load_int8_data
    from p3bkit.export.verify import verify_runner
    from p3bkit.models.factory import create_model
    from p3bkit.models.pruned import set_write_op

    if fmt not in formats():
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(formats())}")
    backend = get_backend(fmt)
    fmt, artefact = backend.exported_as()
    precision = backend.precision(precision)
    if precision == INT8 and int8 is None:
        raise ExportError("INT8 export needs calibration images: give --calib-data (digits, an ImageFolder, ...)")
    if precision != INT8 and int8 is not None:
        raise ExportError(f"calibration data is for --precision int8, not {precision}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, "export", (model_ref,) if Path(model_ref).exists() else (), force=force)
    backend.check_dependencies(precision)  # fail fast: nothing is built and nothing written on a machine that can't
    if verify:
        backend.run_precision(precision)  # e.g. OpenVINO bf16 on a CPU without bf16 units: before any work
    write_op = write_op or backend.write_op
    model: TimmModule = set_write_op(create_model(model_ref).eval(), write_op)
    sample = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    images = load_int8_data(int8, model, static_batch) if int8 else None  # bad data fails here, before any export work
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    t0 = time.time()
    try:
        try:
            files, info = backend.export(
                model,
                tmp,
                sample,
                precision,
                static_batch,
                {"trt_profile": trt_profile, "timing_cache": timing_cache, "int8": images.data if images else None},
            )
        except P3BError:
            raise
        except Exception as exc:  # the runtimes' own converters and quantisers raise many types
            raise ExportError(
                f"{backend.name} {precision} export failed: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        extra = dict(info.get("extra", {}))
        if (
            "int8" in info and images is not None
        ):  # the gate judges the artefact as written: the number its record and `eval` show
            written = images.data.top1(backend.runner(tmp / files[0], precision))
            extra["int8"] = gate(replace(info["int8"], int8_top1=written), images)
        parity, seen = {}, "seeded noise"
        if verify:
            inputs, seen = _parity_images(model, precision, static_batch, images)
            try:
                parity = verify_runner(
                    model.to(backend.device),
                    backend.runner(tmp / files[0], precision),
                    sample,
                    backend.tolerance(precision),
                    (static_batch,) if static_batch else (1, 4),
                    device=backend.device,
                    inputs=inputs,
                )
            except ToleranceError as exc:
                if int8 is None or int8.calib_data != "synthetic":
                    raise
                raise ToleranceError(
                    f"{exc} (on {seen}; INT8 ranges calibrated on synthetic noise: calibrate on "
                    "real images with --calib-data, or --no-verify to keep them)"
                ) from exc
        record = ExportRecord(
            format=fmt,
            files=files,
            source=str(model_ref),
            opset=OPSET,
            precision=precision,
            input_name="pixel_values",
            input_shape=[static_batch or "batch", *sample],
            write_op=write_op,
            verified=verify,
            parity=parity,
            tolerance=asdict(backend.tolerance(precision)),
            op_types=info.get("op_types", {}),
            seconds=time.time() - t0,
            versions=_versions(backend),
            extra=extra,
            native_precision=backend.precisions[precision],
            parity_inputs=seen,
        )
        with folder_lock(out_dir):  # another export or run writing here is refused, not interleaved
            for f in files:
                os.replace(tmp / f, out_dir / f)
            write_json_atomic(record_path(out_dir / artefact), asdict(record))
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
