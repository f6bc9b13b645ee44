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
from typing import Literal

from p3bkit.errors import ExportError
from p3bkit.fileio import write_json_atomic

Format = Literal["onnx", "openvino", "trt"]
DEFAULT_PRECISION = {"onnx": "fp32", "openvino": "f32", "trt": "fp32"}
# residual writes: ScatterND(add) is fastest in onnxruntime; OpenVINO and TensorRT get Concat+Gather
DEFAULT_WRITE_OP = {"onnx": "scatter", "openvino": "gather", "trt": "gather"}
ARTEFACT = {"onnx": "model.onnx", "openvino": "model.xml", "trt": "model.plan"}


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


def _versions(fmt: str) -> dict[str, str]:
    import importlib.metadata as md

    names = ["torch", "timm", "onnx", "onnxruntime", "onnxscript"] + (["openvino"] if fmt == "openvino" else []) + \
        (["tensorrt"] if fmt == "trt" else [])
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "missing"
    return out


def export_model(model_ref: str, fmt: Format, out_dir: str | Path, precision: str | None = None,
                 static_batch: int | None = None, verify: bool = True, write_op: str | None = None,
                 trt_profile: tuple[int, int, int] = (1, 1024, 1024), timing_cache: str | None = None) -> ExportRecord:
    """Export a pruned folder / timm name / preset to `out_dir` and verify it (see module doc)."""
    from p3bkit.exporters.backends import BACKENDS
    from p3bkit.models.factory import create_model
    from p3bkit.models.pruned import set_write_op

    if fmt not in BACKENDS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[fmt]
    precision = precision or DEFAULT_PRECISION[fmt]
    backend.check(precision)  # fail fast: nothing is built and nothing written on a machine that can't
    model = set_write_op(create_model(model_ref).eval(), write_op or DEFAULT_WRITE_OP[fmt])
    sample = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    t0 = time.time()
    try:
        files, info = backend.export(model, tmp, sample, precision, static_batch,
                                     {"trt_profile": trt_profile, "timing_cache": timing_cache})
        parity = backend.verify(model, tmp, sample, precision, static_batch) if verify else {}
        record = ExportRecord(format=fmt, files=files, source=str(model_ref), opset=18, precision=precision,
                              input_name="pixel_values", input_shape=[static_batch or "batch", *sample],
                              write_op=write_op or DEFAULT_WRITE_OP[fmt], verified=verify, parity=parity,
                              tolerance=asdict(backend.tolerance(precision)), op_types=info.get("op_types", {}),
                              seconds=time.time() - t0, versions=_versions(fmt), extra=info.get("extra", {}))
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.replace(tmp / f, out_dir / f)
        write_json_atomic(out_dir / f"{ARTEFACT[fmt]}.json", asdict(record))
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
