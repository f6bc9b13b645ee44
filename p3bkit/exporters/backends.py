"""The built-in backends: torch, onnxruntime, OpenVINO and TensorRT (see `registry` for the interface).

INT8 goes through each runtime's own post-training quantiser on the user's calibration images,
behind the accuracy gate of `p3bkit.exporters.quantize`: onnxruntime static QDQ with per-channel
weights, NNCF's transformer preset for OpenVINO, and for TensorRT the same QDQ graph built with
the INT8 flag (TensorRT's explicit quantization; GPU only).
"""
from __future__ import annotations

from p3bkit.errors import BackendUnavailable
from p3bkit.exporters.registry import Backend, PrecisionError, Runner, register, require


@register
class TorchBackend(Backend):
    name, packages, extra = "torch", ("torch",), ""
    precisions = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

    def run_precisions(self, artefact_precision: str) -> tuple[str, ...]:
        return tuple(self.precisions)

    def runner(self, path, precision=None, threads=None, device: str = "cpu") -> Runner:
        """A model reference (pruned folder, preset, timm name) run eagerly on `device`, autocast to
        `precision`."""
        import torch

        from p3bkit.models.factory import create_model
        from p3bkit.train.loop import logits_of

        model = create_model(str(path)).to(device).eval()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision(precision))

        @torch.inference_mode()
        def run(x) -> dict:
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                return {"logits": logits_of(model(torch.from_numpy(x).to(device))).float().cpu().numpy()}
        run.input_shape = [None, model.patch_embed.proj.in_channels, *model.patch_embed.img_size]
        return run


@register
class OnnxRuntimeBackend(Backend):
    name, format, packages, extra = "onnxruntime", "onnx", ("onnxruntime", "onnx", "onnxscript"), "onnx"
    artefact, suffixes, write_op = "model.onnx", (".onnx",), "scatter"  # ScatterND(add) is fastest in onnxruntime
    precisions = {"fp32": "float32", "fp16": "float16", "int8": "int8"}

    def check_dependencies(self, precision: str = "fp32") -> None:
        super().check_dependencies(precision)
        if precision == "int8":
            require("onnxruntime.quantization", "onnx", "INT8 (onnxruntime.quantization)")

    def export(self, model, tmp, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.exporters.onnx import export_onnx, op_types

        if precision == "int8":
            from p3bkit.exporters.quantize import quantize_onnxruntime

            export_onnx(model, tmp / "fp32.onnx", sample, static_batch)
            info = quantize_onnxruntime(tmp / "fp32.onnx", tmp / "model.onnx", opts["int8"])
            (tmp / "fp32.onnx").unlink()
            return ["model.onnx"], {"op_types": op_types(tmp / "model.onnx"), "extra": info}
        export_onnx(model, tmp / "model.onnx", sample, static_batch, fp16=precision == "fp16")
        return ["model.onnx"], {"op_types": op_types(tmp / "model.onnx")}

    def runner(self, path, precision=None, threads=None) -> Runner:
        import numpy as np

        from p3bkit.exporters.runtimes import ort_session

        sess = ort_session(path, threads, spin=False)  # idle pools must not take cores from other models timed
        inp = sess.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32  # fp16 graphs take fp16 pixels
        outputs = [o.name for o in sess.get_outputs()]

        def run(x) -> dict:
            return {n: np.asarray(v, dtype=np.float32) for n, v in
                    zip(outputs, sess.run(None, {inp.name: x.astype(dtype, copy=False)}))}
        run.input_shape, run.input_dtype = list(inp.shape), dtype
        return run


@register
class OpenVinoBackend(Backend):
    name = format = "openvino"
    packages, extra = ("openvino", "onnx", "onnxscript"), "openvino"
    artefact, suffixes = "model.xml", (".xml",)
    # fp16: weights stored in f16, inference in f32; bf16: f32 weights, bf16 inference hint
    precisions = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "i8"}

    def check_dependencies(self, precision: str = "fp32") -> None:
        super().check_dependencies(precision)
        if precision == "int8":
            require("nncf", "openvino", "INT8 (nncf)")

    def export(self, model, tmp, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.exporters.onnx import export_onnx, op_types
        from p3bkit.exporters.openvino import export_openvino

        export_onnx(model, tmp / "graph.onnx", sample, static_batch)
        ops = op_types(tmp / "graph.onnx")
        if precision == "int8":
            from p3bkit.exporters.quantize import quantize_openvino

            info = quantize_openvino(tmp / "graph.onnx", tmp / "model.xml", opts["int8"])
        else:
            export_openvino(tmp / "graph.onnx", tmp / "model.xml", self.precisions[precision])
            info = {"inference_precision_hint": "bf16" if precision == "bf16" else "f32"}
        (tmp / "graph.onnx").unlink()
        return ["model.xml", "model.bin"], {"op_types": ops, "extra": info}

    def run_precisions(self, artefact_precision: str) -> tuple[str, ...]:
        if artefact_precision == "int8":
            return ("int8",)
        return (artefact_precision, *(p for p in ("fp32", "bf16") if p != artefact_precision))

    def run_precision(self, artefact_precision: str, asked: str | None = None) -> str:
        run = super().run_precision(artefact_precision, asked)
        self.inference_hint(run)  # refuses bf16 on a CPU without it
        return run

    def runner(self, path, precision=None, threads=None) -> Runner:
        from p3bkit.exporters.runtimes import ov_runner

        return ov_runner(path, self.inference_hint(precision or "fp32"), threads)

    def inference_hint(self, precision: str) -> str:
        """OpenVINO's INFERENCE_PRECISION_HINT for a run precision; bf16 only where the CPU has it
        (elsewhere OpenVINO would silently run f32)."""
        if precision != "bf16":
            return "f32"
        from p3bkit.exporters.runtimes import import_backend

        if "BF16" not in import_backend("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise PrecisionError("this CPU has no bf16 units, so OpenVINO would run bf16 as f32: use fp32")
        return "bf16"


@register
class TensorRTBackend(Backend):
    name, format, packages, extra = "tensorrt", "trt", ("tensorrt",), "tensorrt"
    artefact, suffixes, device = "model.plan", (".plan", ".engine"), "cuda"
    precisions = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8"}

    def check_dependencies(self, precision: str = "fp32") -> None:
        from p3bkit.exporters.tensorrt import check_trt_available, precision_plan

        precision_plan(precision)
        if precision == "int8":
            require("onnxruntime.quantization", "onnx", "INT8 (onnxruntime.quantization)")  # the QDQ graph TensorRT builds from
        check_trt_available()

    def status(self) -> tuple[bool, str]:
        import importlib.util

        import torch

        if importlib.util.find_spec("tensorrt") is None:
            return False, "not importable: no module named tensorrt"

        return (True, "GPU") if torch.cuda.is_available() else (False, "installed, but no CUDA GPU visible")

    def export(self, model, tmp, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.exporters.onnx import export_onnx
        from p3bkit.exporters.tensorrt import TrtProfile, build_trt_engine
        from p3bkit.exporters.trt_ops import check_trt_ops

        export_onnx(model, tmp / "model.onnx", sample, static_batch)
        info: dict = {}
        if precision == "int8":  # explicit quantization: calibrated, symmetric Q/DQ scales in the graph itself
            from p3bkit.exporters.quantize import quantize_onnxruntime

            info = quantize_onnxruntime(tmp / "model.onnx", tmp / "model.qdq.onnx", opts["int8"], symmetric=True)
            (tmp / "model.qdq.onnx").replace(tmp / "model.onnx")
        ops = check_trt_ops(str(tmp / "model.onnx"))
        prof = TrtProfile(*(opts["trt_profile"] if not static_batch else (static_batch,) * 3))
        build_trt_engine(tmp / "model.onnx", tmp / "model.plan", sample, prof, precision, opts.get("timing_cache"))
        if precision == "int8":  # the gate again, on the engine itself (it may run layers in fp16)
            info = _engine_gate(tmp / "model.plan", opts["int8"], info["int8"], prof.max_batch)
        return ["model.plan", "model.onnx"], {"op_types": ops, "extra": {"profile": list(prof.__dict__.values()), **info}}

    def runner(self, path, precision=None, threads=None) -> Runner:
        import torch

        from p3bkit.exporters.tensorrt import TrtRunner

        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT engines run on a CUDA GPU; none is visible here")
        return TrtRunner(path)


def _engine_gate(plan, data, first: dict, max_batch: int) -> dict:
    from p3bkit.exporters.quantize import gate, top1
    from p3bkit.exporters.tensorrt import TrtRunner

    engine = top1(TrtRunner(plan), data, batch=min(64, max_batch))
    return gate(first["fp32_top1"], engine, data, first["kept_in_fp32"], first["remedy"] + "; measured on the engine",
                first["attempts"] + [{"method": "TensorRT engine", "int8_top1": engine}])


__all__ = ["OnnxRuntimeBackend", "OpenVinoBackend", "TensorRTBackend", "TorchBackend"]
