"""onnxruntime: ONNX graphs on the CPU (fp32, fp16, INT8 by static QDQ quantisation).

INT8 quantises per-channel int8 weights on every *weighted* MatMul/Gemm/Conv: the attention
matmuls (activation × activation) stay fp32, because quantising them too made a 90%-pruned
DeiT-S (P3B-inner) slower than fp32 in onnxruntime (10.32 vs 6.76 ms; weighted only 6.46) and the
dense one 20% slower than weighted-only (20.75 vs 17.31 ms), `benchmarks/int8_why.py`. Above the gate's
limit the remedy keeps the 1, 2, 4 … layers that add the most quantisation error in fp32.
Sessions do not spin (`session.intra_op.allow_spinning=0`): an idle spinning pool takes a core
from whatever else is being timed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from p3bkit.backends.quantization import Int8Data, QuantResult, keep_worst_in_fp32, op_profile, quiet, remedy_name
from p3bkit.backends.registry import FP16, FP32, INT8, Backend, FnRunner, register, require
from p3bkit.backends.timing import Timed, int8_saturates, this_cpu
from p3bkit.errors import ExportError, P3BError

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")  # only those with a weight (see `weighted_nodes`)
TRANSFORMER_TAG = "ort-transformers"  # bench name suffix of the transformer-optimised graph


def ort_session(path: str | Path | bytes, threads: int | None = None, profile: bool = False, spin: bool = False):
    """An onnxruntime CPU session; idle worker threads do not busy-wait unless `spin`."""
    ort = require("onnxruntime", OnnxRuntimeBackend.extra)
    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.enable_profiling = profile
    return ort.InferenceSession(
        path if isinstance(path, bytes) else str(path), opts, providers=["CPUExecutionProvider"]
    )


def _input_dtype(sess):
    return np.float16 if "float16" in sess.get_inputs()[0].type else np.float32  # fp16 graphs take fp16 pixels


@register
class OnnxRuntimeBackend(Backend):
    name, format, packages, extra = "onnxruntime", "onnx", ("onnxruntime", "onnx", "onnxscript"), "onnx"
    artefact, suffixes, write_op = "model.onnx", (".onnx",), "scatter"  # ScatterND(add) is fastest in onnxruntime
    precisions = {FP32: "float32", FP16: "float16", INT8: "int8"}
    table_preference = 1

    def check_dependencies(self, precision: str = FP32) -> None:
        super().check_dependencies(precision)
        if precision == INT8:
            require("onnxruntime.quantization", self.extra, "INT8 (onnxruntime.quantization)")

    def detect_precision(self, path) -> str:
        import onnx

        from p3bkit.backends.onnx import op_types

        ops = op_types(path)
        if ops.get("QuantizeLinear") or ops.get("DequantizeLinear"):
            return INT8
        graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
        return FP16 if graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else FP32

    def export(self, model, tmp, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.backends.onnx import export_onnx, op_types

        if precision == INT8:
            export_onnx(model, tmp / "fp32.onnx", sample, static_batch)
            result = self.quantize(tmp / "fp32.onnx", tmp / "model.onnx", opts["int8"])
            (tmp / "fp32.onnx").unlink()
            return ["model.onnx"], {"op_types": op_types(tmp / "model.onnx"), "int8": result}
        export_onnx(model, tmp / "model.onnx", sample, static_batch, fp16=precision == FP16)
        return ["model.onnx"], {"op_types": op_types(tmp / "model.onnx")}

    def runner(self, path, precision=None, threads=None, device=None) -> FnRunner:
        self.check_device(device)
        sess = ort_session(path, threads)
        inp = sess.get_inputs()[0]
        dtype = _input_dtype(sess)
        outputs = [o.name for o in sess.get_outputs()]

        def run(x) -> dict:
            return {
                n: np.asarray(v, dtype=np.float32)
                for n, v in zip(outputs, sess.run(None, {inp.name: x.astype(dtype, copy=False)}))
            }

        return FnRunner(run, list(inp.shape), dtype, inp.name)

    def timer(self, ref, batch, precision, threads=None, device=None, compile=False) -> Timed:
        run = self.runner(ref, precision, threads, device)
        x = np.random.default_rng(0).standard_normal((batch, *run.input_shape[1:])).astype(run.input_dtype)

        def profile(runs: int) -> dict[str, float]:
            return _profile(ref, threads, run.input_name, x, runs)

        return Timed(str(ref), self.name, lambda: run(x), source=str(ref), profile=profile, precision=precision)

    def variants(self, artefact, workdir, num_heads, dim) -> list[tuple[str, str, Path]]:
        """onnxruntime's transformer optimiser (model_type "vit": fused LayerNorm, GELU, attention),
        the usual way a dense ViT is deployed with onnxruntime; refused if it changes the outputs."""
        import contextlib
        import io

        from onnxruntime.transformers import optimizer

        out = workdir / f"{Path(artefact).stem}.{TRANSFORMER_TAG}.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            opt = optimizer.optimize_model(
                str(artefact), model_type="vit", num_heads=num_heads, hidden_size=dim, opt_level=0
            )
        opt.save_model_to_file(str(out))
        plain, fused = self.runner(artefact), self.runner(out)
        batch = plain.input_shape[0] if isinstance(plain.input_shape[0], int) else 2  # a fixed axis takes its own
        x = np.random.default_rng(0).standard_normal((batch, *plain.input_shape[1:])).astype(np.float32)
        a, b = plain(x), fused(x)
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        if diff > 1e-3:
            raise P3BError(
                f"onnxruntime's transformer optimiser changed the outputs of {artefact} (max abs diff {diff:.2e})"
            )
        return [(TRANSFORMER_TAG, "transformer-optimised", out)]

    # ---- INT8: static QDQ, per-channel weights ----------------------------------------------

    def quantize(self, src_onnx, out, data: Int8Data, symmetric: bool = False) -> QuantResult:
        """Static QDQ INT8 of the fp32 graph `src_onnx` into `out`, with the remedy above the limit.
        `symmetric`: zero points of 0 (TensorRT); the accuracy is then measured on onnxruntime."""
        fp32 = data.top1(self.runner(src_onnx))
        calib = data.chunks(data.calib, 16)
        quantize_static_qdq(src_onnx, out, calib, [], symmetric)
        int8 = data.top1(self.runner(out))
        ranked: list[str] = []
        if fp32 - int8 > data.max_drop:
            errors = layer_errors(src_onnx, out, data.chunks(data.val_x[:32], 32)[0])
            ranked = sorted(errors, key=lambda name: -errors[name])

        def keeping(kept: list[str]) -> float:
            quantize_static_qdq(src_onnx, out, calib, kept, symmetric)
            return data.top1(self.runner(out))

        int8, kept, attempts = keep_worst_in_fp32(fp32, int8, ranked, data.max_drop, keeping)
        batch = data.static_batch or 1
        profile = op_profile(self.timer(src_onnx, batch, FP32), self.timer(out, batch, INT8))
        return QuantResult(fp32, int8, kept, remedy_name(attempts), attempts, profile)


def _profile(path, threads: int | None, name: str, x: np.ndarray, runs: int) -> dict[str, float]:
    """ms per op type per run, from onnxruntime's profiler (its trace file is always removed)."""
    sess = ort_session(path, threads, profile=True)
    trace = None
    try:
        for _ in range(runs):
            sess.run(None, {name: x})
        trace = Path(sess.end_profiling())
        totals: dict[str, float] = {}
        for ev in json.loads(trace.read_text()):
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + ev["dur"] / 1e3 / runs
        return totals
    finally:
        if trace is None:
            trace = Path(sess.end_profiling())
        trace.unlink(missing_ok=True)


def weighted_nodes(path: Path) -> list:
    """MatMul/Gemm/Conv nodes with a weight initializer (the ones p3bkit quantises)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [n for n in graph.node if n.op_type in QUANTIZED_OPS and any(i in inits for i in n.input)]


def quantize_static_qdq(
    src: Path,
    out: Path,
    calib: list[np.ndarray],
    exclude: list[str],
    symmetric: bool = False,
    nodes: list[str] | None = None,
) -> None:
    """onnxruntime's static QDQ quantisation (per-channel S8S8) of the weighted layers of `src`
    (or of `nodes`), except `exclude`, calibrated on `calib` batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixel_values": b} for b in calib])

        def get_next(self):
            return next(self.batches, None)

    chosen = [n.name for n in weighted_nodes(src)] if nodes is None else nodes
    chosen = [n for n in chosen if n not in exclude]
    if not chosen:  # an empty list would mean "quantise everything" to onnxruntime
        raise ExportError(f"{Path(src).name}: no weighted layer left to quantise")
    # symmetric: zero points of 0, which TensorRT's explicit quantization requires
    options = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    # 7-bit weights where the CPU's INT8 kernels saturate (no VNNI): on a 2-core AVX2-only EPYC the
    # full-range graph of a tiny ViT gave logits at cosine 0.77 to fp32
    reduce_range = int8_saturates(this_cpu()["isa"])
    with quiet():
        quantize_static(
            str(src),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=chosen,
            reduce_range=reduce_range,
            extra_options=options,
        )


def layer_errors(fp32: Path, int8: Path, x: np.ndarray) -> dict[str, float]:
    """Quantisation error each quantised node adds: relative error of its output minus that of
    its input, fp32 graph vs QDQ graph on the same images (both keep the fp32 tensor names)."""
    import onnx

    graph = onnx.load(str(fp32)).graph
    nodes = weighted_nodes(fp32)
    names = sorted({t for n in nodes for t in (n.input[0], n.output[0])} - {i.name for i in graph.input})
    acts = []
    for path in (fp32, int8):
        model = onnx.load(str(path))
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(
            onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names if t not in have
        )
        sess = ort_session(model.SerializeToString())
        acts.append(dict(zip(names, sess.run(names, {"pixel_values": x}))))
    ref, q = acts

    def err(t: str) -> float:
        if t not in ref:
            return 0.0
        return float(np.linalg.norm(ref[t] - q[t]) / (np.linalg.norm(ref[t]) + 1e-12))

    return {n.name: err(n.output[0]) - err(n.input[0]) for n in nodes}
