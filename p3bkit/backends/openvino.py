"""OpenVINO: IRs (.xml/.bin) converted from the ONNX graph, run on the CPU.

Precisions: f32 (default); f16 (weights stored in f16, inference in f32); bf16 (f32 weights, the
bf16 inference hint — only where the CPU has bf16 units, elsewhere OpenVINO would silently run
f32); INT8 by NNCF's post-training quantisation with the transformer preset; above the gate's
limit the remedy keeps the 1, 2, 4 … layers that add the most quantisation error in fp32 (NNCF's
ignored scope), as onnxruntime's does. (NNCF's own accuracy-controlled quantisation returned, on a
90%-pruned DeiT-S, a graph with no quantiser left and outputs unlike the fp32 graph's.) On CPUs with bf16 units
OpenVINO infers in bf16 by default, so every runner pins its precision hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from p3bkit.backends.quantization import Int8Data, QuantResult, keep_worst_in_fp32, op_profile, quiet, remedy_name
from p3bkit.backends.registry import (
    BF16,
    FP16,
    FP32,
    INT8,
    Backend,
    FnRunner,
    PrecisionError,
    Runner,
    register,
    require,
)
from p3bkit.backends.timing import Timed
from p3bkit.errors import ExportError, first_line


def _ov():
    return require("openvino", OpenVinoBackend.extra)


def ov_compile(model, hint: str = "f32", threads: int | None = None, profile: bool = False):
    """Compile an IR (path or in-memory model) for the CPU at the inference precision `hint`."""
    ov = _ov()
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    if profile:
        cfg["PERF_COUNT"] = True
    return ov.Core().compile_model(model if isinstance(model, ov.Model) else str(model), "CPU", cfg)


def ov_runner(model, hint: str = "f32", threads: int | None = None) -> FnRunner:
    compiled = ov_compile(model, hint, threads)
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        res = request.infer({0: x})
        return {n: np.array(res[o]) for n, o in zip(names, compiled.outputs)}

    return FnRunner(run, [d.get_length() if d.is_static else None for d in compiled.inputs[0].get_partial_shape()])


def convert_onnx(onnx_path: Path, xml_path: Path, compress_to_fp16: bool = False) -> Path:
    """OpenVINO IR from an ONNX graph (`openvino.convert_model` + `save_model`)."""
    ov = _ov()
    try:
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=compress_to_fp16)
    except Exception as exc:  # openvino raises its own RuntimeError subclasses
        raise ExportError(f"OpenVINO conversion failed: {first_line(exc)}") from exc
    return Path(xml_path)


@register
class OpenVinoBackend(Backend):
    name = format = "openvino"
    packages, extra = ("openvino", "onnx", "onnxscript"), "openvino"
    artefact, suffixes = "model.xml", (".xml",)
    # fp16: weights stored in f16, inference in f32; bf16: f32 weights, bf16 inference hint
    precisions = {FP32: "f32", FP16: "f16", BF16: "bf16", INT8: "i8"}
    table_preference = 2  # the fastest CPU runtime measured here

    def check_dependencies(self, precision: str = FP32) -> None:
        super().check_dependencies(precision)
        if precision == INT8:
            require("nncf", self.extra, "INT8 (nncf)")

    def detect_precision(self, path) -> str:
        text = Path(path).read_text(errors="replace")
        if "FakeQuantize" in text:
            return INT8
        return FP16 if 'element_type="f16"' in text else FP32

    def export(self, model, tmp, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.backends.onnx import export_onnx, op_types

        export_onnx(model, tmp / "graph.onnx", sample, static_batch)
        ops = op_types(tmp / "graph.onnx")
        if precision == INT8:
            info: dict[str, Any] = {"int8": self.quantize(tmp / "graph.onnx", tmp / "model.xml", opts["int8"])}
        else:
            convert_onnx(tmp / "graph.onnx", tmp / "model.xml", compress_to_fp16=precision == FP16)
            info = {"extra": {"inference_precision_hint": "bf16" if precision == BF16 else "f32"}}
        (tmp / "graph.onnx").unlink()
        return ["model.xml", "model.bin"], {"op_types": ops, **info}

    def run_precisions(self, artefact_precision: str) -> tuple[str, ...]:
        if artefact_precision == INT8:
            return (INT8,)
        return (artefact_precision, *(p for p in (FP32, BF16) if p != artefact_precision))

    def run_precision(self, artefact_precision: str, asked: str | None = None) -> str:
        run = super().run_precision(artefact_precision, asked)
        self.inference_hint(run)  # refuses bf16 on a CPU without it
        return run

    def inference_hint(self, precision: str) -> str:
        """OpenVINO's INFERENCE_PRECISION_HINT for a run precision; bf16 only where the CPU has it."""
        if precision != BF16:
            return "f32"
        if "BF16" not in _ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise PrecisionError("this CPU has no bf16 units, so OpenVINO would run bf16 as f32: use fp32")
        return "bf16"

    def runner(self, path, precision=None, threads=None, device=None) -> Runner:
        self.check_device(device)
        return ov_runner(path, self.inference_hint(precision or FP32), threads)

    def timer(self, ref, batch, precision, threads=None, device=None, compile=False) -> Timed:
        self.check_device(device)
        hint = self.inference_hint(precision)
        run = ov_runner(ref, hint, threads)
        x = np.random.default_rng(0).standard_normal((batch, *run.input_shape[1:])).astype(np.float32)

        def profile(runs: int) -> dict[str, float]:
            req = ov_compile(ref, hint, threads, profile=True).create_infer_request()
            totals: dict[str, float] = {}
            for _ in range(runs):
                req.infer({0: x})
                for p in req.get_profiling_info():  # the kernel says which precision an op ran at
                    key = f"{p.node_type} ({p.exec_type})"
                    totals[key] = totals.get(key, 0.0) + p.real_time.total_seconds() * 1e3 / runs
            return totals

        return Timed(str(ref), self.name, lambda: run(x), source=str(ref), profile=profile, precision=precision)

    def onnx_artefact(self, onnx_path, workdir, batch) -> Path:
        return convert_onnx(onnx_path, onnx_path.with_suffix(".xml"))

    # ---- INT8: NNCF post-training quantisation, transformer preset ---------------------------

    def quantize(self, src_onnx, out, data: Int8Data) -> QuantResult:
        """NNCF INT8 of the ONNX graph into an OpenVINO IR `out`; above the limit, the remedy keeps
        the layers that add the most quantisation error in fp32 (NNCF's ignored scope)."""
        import nncf

        ov = _ov()
        fp32_model = ov.convert_model(str(src_onnx))
        fp32 = data.top1(ov_runner(fp32_model))
        items = data.chunks(data.calib, 1)
        calib = nncf.Dataset(items)

        def quantize(kept: list[str]):
            scope = nncf.IgnoredScope(names=kept, validate=False) if kept else None
            with quiet():
                return nncf.quantize(
                    fp32_model,
                    calib,
                    subset_size=len(items),
                    model_type=nncf.ModelType.TRANSFORMER,
                    **({"ignored_scope": scope} if scope else {}),
                )

        q = quantize([])
        int8 = data.top1(ov_runner(q))
        ranked: list[str] = []
        if fp32 - int8 > data.max_drop:
            errors = layer_errors(fp32_model, q, data.chunks(data.val_x[:16], 16)[0])
            ranked = sorted(errors, key=lambda name: -errors[name])

        def keeping(kept: list[str]) -> float:
            nonlocal q
            q = quantize(kept)
            return data.top1(ov_runner(q))

        int8, kept, attempts = keep_worst_in_fp32(fp32, int8, ranked, data.max_drop, keeping)
        ov.save_model(q, str(out), compress_to_fp16=False)
        batch = data.static_batch or 1
        profile = op_profile(self.timer(src_onnx, batch, FP32), self.timer(out, batch, INT8))
        return QuantResult(fp32, int8, kept, remedy_name(attempts), attempts, profile)


def layer_errors(fp32_model, q, x: np.ndarray) -> dict[str, float]:
    """Quantisation error each quantised layer (MatMul/Convolution fed by a FakeQuantize) of `q`
    adds: relative error of its output minus that of the fp32 activation feeding it (found by
    walking up past NNCF's FakeQuantize and smoothing nodes), fp32 model vs `q` on images `x`."""
    known = {op.get_friendly_name() for op in fp32_model.get_ordered_ops()}
    pairs = {}
    for op in q.get_ordered_ops():
        if op.get_type_name() not in ("MatMul", "Convolution") or op.get_friendly_name() not in known:
            continue
        src = op.input_value(0).get_node()
        if src.get_type_name() != "FakeQuantize":
            continue
        while src.get_friendly_name() not in known and src.get_input_size():
            src = src.input_value(0).get_node()
        pairs[op.get_friendly_name()] = src.get_friendly_name()
    names = sorted(set(pairs) | set(pairs.values()))
    acts = []
    for model in (fp32_model, q):
        probe = model.clone()
        ops = {op.get_friendly_name(): op for op in probe.get_ordered_ops()}
        ports = probe.add_outputs([ops[n].output(0) for n in names])  # a model output already is one: returned as is
        for i, port in enumerate(ports):  # a tensor OpenVINO split out of a fused op may have no name
            port.get_tensor().add_names({f"p3bkit_probe_{i}"})
        res = ov_compile(probe)({0: x})
        acts.append({n: np.asarray(res[f"p3bkit_probe_{i}"]) for i, n in enumerate(names)})
    ref, qa = acts

    def err(n: str) -> float:
        return float(np.linalg.norm(ref[n] - qa[n]) / (np.linalg.norm(ref[n]) + 1e-12))

    return {layer: err(layer) - err(src) for layer, src in pairs.items()}
