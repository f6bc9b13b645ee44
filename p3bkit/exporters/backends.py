"""A small registry of export backends sharing one interface (check, export, verify, tolerance)."""
from __future__ import annotations

from pathlib import Path

from p3bkit.errors import ExportError
from p3bkit.exporters.onnx import export_onnx, op_types
from p3bkit.exporters.tolerances import Tolerance, tolerance_for
from p3bkit.exporters.verify import verify_runner


class OnnxBackend:
    name, precisions = "onnx", ("fp32", "fp16")

    def check(self, precision: str) -> None:
        from p3bkit.exporters.runtimes import import_backend

        if precision not in self.precisions:
            raise ExportError(f"{self.name} precision must be one of {self.precisions}, got {precision!r}")
        import_backend("onnxruntime")

    def tolerance(self, precision: str) -> Tolerance:
        return tolerance_for(self.name, precision)

    def export(self, model, tmp: Path, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        export_onnx(model, tmp / "model.onnx", sample, static_batch, fp16=precision == "fp16")
        return ["model.onnx"], {"op_types": op_types(tmp / "model.onnx")}

    def verify(self, model, tmp: Path, sample, precision, static_batch) -> dict:
        from p3bkit.exporters.runtimes import ort_runner

        run = ort_runner(tmp / "model.onnx")
        half = precision == "fp16"
        return verify_runner(model, lambda x: run(x.astype("float16") if half else x), sample,
                             self.tolerance(precision), _batches(static_batch))


class OpenVinoBackend(OnnxBackend):
    name, precisions = "openvino", ("f32", "f16", "bf16")

    def check(self, precision: str) -> None:
        from p3bkit.exporters.runtimes import import_backend

        if precision not in self.precisions:
            raise ExportError(f"{self.name} precision must be one of {self.precisions}, got {precision!r}")
        import_backend("openvino")
        import_backend("onnxruntime")

    def export(self, model, tmp: Path, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.exporters.openvino import export_openvino

        export_onnx(model, tmp / "graph.onnx", sample, static_batch)
        export_openvino(tmp / "graph.onnx", tmp / "model.xml", precision)
        return ["model.xml", "model.bin"], {"op_types": op_types(tmp / "graph.onnx"),
                                           "extra": {"inference_precision_hint": "bf16" if precision == "bf16" else "f32"}}

    def verify(self, model, tmp: Path, sample, precision, static_batch) -> dict:
        from p3bkit.exporters.runtimes import ov_runner

        return verify_runner(model, ov_runner(tmp / "model.xml", precision), sample, self.tolerance(precision),
                             _batches(static_batch))


class TrtBackend(OnnxBackend):
    name, precisions = "trt", ("fp32", "fp16", "bf16")

    def check(self, precision: str) -> None:
        from p3bkit.exporters.tensorrt import check_trt_available, precision_plan

        precision_plan(precision)
        check_trt_available()

    def export(self, model, tmp: Path, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.exporters.tensorrt import TrtProfile, build_trt_engine
        from p3bkit.exporters.trt_ops import check_trt_ops

        export_onnx(model, tmp / "model.onnx", sample, static_batch)
        ops = check_trt_ops(str(tmp / "model.onnx"))
        prof = TrtProfile(*(opts["trt_profile"] if not static_batch else (static_batch,) * 3))
        build_trt_engine(tmp / "model.onnx", tmp / "model.plan", sample, prof, precision, opts.get("timing_cache"))
        return ["model.plan", "model.onnx"], {"op_types": ops, "extra": {"profile": list(prof.__dict__.values())}}

    def verify(self, model, tmp: Path, sample, precision, static_batch) -> dict:
        from p3bkit.exporters.tensorrt import TrtRunner

        return verify_runner(model.cuda(), TrtRunner(tmp / "model.plan"), sample, self.tolerance(precision),
                             _batches(static_batch), device="cuda")


def _batches(static_batch: int | None) -> tuple[int, ...]:
    return (static_batch,) if static_batch else (1, 4)


BACKENDS = {"onnx": OnnxBackend(), "openvino": OpenVinoBackend(), "trt": TrtBackend()}
