"""OpenVINO IR (.xml/.bin) from the ONNX graph via `openvino.convert_model` + `save_model`.

Precision: f32 (default), f16 (weights compressed to f16, f32 inference), bf16 (f32 weights,
bf16 inference hint recorded for the runtime). On CPUs with bf16 units OpenVINO infers in bf16
by default; verification pins f32 unless bf16 is asked for.
"""
from __future__ import annotations

from pathlib import Path

from p3bkit.errors import ExportError
from p3bkit.exporters.runtimes import import_backend


def export_openvino(onnx_path: str | Path, xml_path: str | Path, precision: str = "f32") -> Path:
    ov = import_backend("openvino")
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml_path), compress_to_fp16=precision == "f16")
    except Exception as exc:  # openvino raises its own RuntimeError subclasses
        raise ExportError(f"OpenVINO conversion failed: {str(exc).splitlines()[0][:300]}") from exc
    return Path(xml_path)
