"""TensorRT engines from our ONNX graphs, with the TensorRT Python API (10.x).

Optimization profile over the batch axis (defaults 1 / 1024 / 1024, the paper's GPU protocol),
fp32 (TF32 off, so parity holds at fp32 tolerances), fp16 or bf16 with LayerNorm and Softmax
layers pinned to fp32 (fp16 ViT engines lose accuracy otherwise), INT8 by explicit quantization
(a calibrated Q/DQ graph, the path TensorRT 10 recommends over implicit calibrators), a timing
cache file reused across builds. `check_trt_available` runs first so a machine without TensorRT or CUDA fails
before any work, and `check_trt_ops` checks the graph's operators against the ONNX parser's support
table (onnx-tensorrt's operators.md, TensorRT 10.x, opset 9–20) before any engine build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p3bkit.backends.quantization import Int8Data, QuantResult
from p3bkit.backends.registry import BF16, FP16, FP32, INT8, Backend, register, require
from p3bkit.backends.timing import Timed
from p3bkit.errors import BackendUnavailable, ExportError, P3BError

TRT_SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        "Abs",
        "Add",
        "Cast",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "DequantizeLinear",
        "Div",
        "Erf",
        "Expand",
        "Flatten",
        "Gather",
        "GatherElements",
        "Gemm",
        "Identity",
        "LayerNormalization",
        "MatMul",
        "Mul",
        "Neg",
        "Pow",
        "QuantizeLinear",
        "ReduceMean",
        "Relu",
        "Reshape",
        "ScatterND",
        "ScatterElements",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)
# ScatterND's `reduction` attribute was ignored by older ONNX-parser releases (onnx-tensorrt issue
# 957): our TRT path therefore writes residual channels with Concat + Gather (`set_write_op`).
TRT_FORBIDDEN_ATTRS: dict[str, str] = {"ScatterND": "reduction"}


def check_trt_ops(path: str) -> dict[str, int]:
    """Op counts of an ONNX file; raises ExportError naming every op TensorRT cannot parse."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    bad: set[str] = set()
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type not in TRT_SUPPORTED_OPS:
            bad.add(node.op_type)
        attr = TRT_FORBIDDEN_ATTRS.get(node.op_type)
        if attr and any(a.name == attr and a.s not in (b"", b"none") for a in node.attribute):
            bad.add(f"{node.op_type}({attr})")
    if bad:
        raise ExportError(f"{path}: operators TensorRT's ONNX parser does not support: {', '.join(sorted(bad))}")
    return counts


@dataclass(frozen=True)
class TrtProfile:
    min_batch: int = 1
    opt_batch: int = 1024
    max_batch: int = 1024

    def shapes(self, sample_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(
                f"profile needs 1 ≤ min ≤ opt ≤ max batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        return tuple((b, *sample_shape) for b in (self.min_batch, self.opt_batch, self.max_batch))


def check_trt_available():
    """Return the tensorrt module, or raise BackendUnavailable saying what is missing."""
    import torch

    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            "TensorRT export needs the `tensorrt` Python package (not importable here) "
            "and a CUDA GPU; run it on a GPU machine with pip install 'p3bkit[tensorrt]'"
        ) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT export needs a CUDA GPU, and none is visible here")
    return trt


def precision_plan(precision: str) -> dict:
    """Builder flags and fp32-pinned layer types for a precision (no TensorRT needed)."""
    if precision not in (FP32, FP16, BF16, INT8):
        raise ExportError(f"TensorRT precision must be fp32, fp16, bf16 or int8, got {precision!r}")
    return {
        "fp32": {"flags": [], "clear": ["TF32"], "pin_fp32": []},
        "fp16": {
            "flags": ["FP16", "OBEY_PRECISION_CONSTRAINTS"],
            "clear": [],
            "pin_fp32": ["NORMALIZATION", "SOFTMAX"],
        },
        "bf16": {
            "flags": ["BF16", "OBEY_PRECISION_CONSTRAINTS"],
            "clear": [],
            "pin_fp32": ["NORMALIZATION", "SOFTMAX"],
        },
        # explicit quantization: the Q/DQ scales come with the graph; unquantised layers may run fp16
        "int8": {
            "flags": ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"],
            "clear": [],
            "pin_fp32": ["NORMALIZATION", "SOFTMAX"],
        },
    }[precision]


def build_trt_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    sample_shape: tuple[int, ...],
    profile: TrtProfile = TrtProfile(),
    precision: str = "fp32",
    timing_cache: str | Path | None = None,
    workspace_gib: float = 8.0,
) -> Path:
    """Parse the ONNX file, build and serialise an engine to `engine_path`."""
    trt = check_trt_available()
    plan = precision_plan(precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan["clear"]:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    pinned = {getattr(trt.LayerType, t) for t in plan["pin_fp32"]}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in pinned:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
    prof = builder.create_optimization_profile()
    prof.set_shape(network.get_input(0).name, *profile.shapes(sample_shape))
    config.add_optimization_profile(prof)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT engine build failed (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(engine))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return Path(engine_path)


class TrtRunner:
    """Runs a serialized engine on CUDA tensors (torch owns the device memory)."""

    def __init__(self, engine_path: str | Path) -> None:
        import torch

        trt = check_trt_available()
        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"{engine_path}: not a TensorRT engine for this TensorRT/GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = [n for n in names if n != self.input]
        self.input_shape = list(self.engine.get_tensor_shape(self.input))  # -1: a dynamic batch

    def run_device(self, x):
        """x: a contiguous float32 CUDA tensor; returns {name: CUDA tensor}."""
        torch = self.torch
        self.context.set_input_shape(self.input, tuple(x.shape))
        self.context.set_tensor_address(self.input, x.data_ptr())
        outs = {}
        for name in self.outputs:
            outs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), device=x.device, dtype=torch.float32)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        return outs

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.run_device(self.torch.from_numpy(x).cuda().contiguous())
        self.torch.cuda.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}


@register
class TensorRTBackend(Backend):
    name, format, packages, extra = "tensorrt", "trt", ("tensorrt",), "tensorrt"
    artefact, suffixes, device = "model.plan", (".plan", ".engine"), "cuda"
    precisions = {FP32: "fp32", FP16: "fp16", BF16: "bf16", INT8: "int8"}

    def check_dependencies(self, precision: str = FP32) -> None:
        precision_plan(precision)
        if precision == INT8:  # the QDQ graph TensorRT builds from
            require("onnxruntime.quantization", "onnx", "INT8 (onnxruntime.quantization)")
        check_trt_available()

    def detect_precision(self, path) -> str:
        raise P3BError(
            f"{path} has no export record, and a serialized TensorRT engine does not say its precision: "
            "build engines with p3bkit export --format trt (which writes the record)"
        )

    def status(self) -> tuple[bool, str]:
        import importlib.util

        import torch

        if importlib.util.find_spec("tensorrt") is None:
            return False, "not importable: no module named tensorrt"
        return (True, "GPU") if torch.cuda.is_available() else (False, "installed, but no CUDA GPU visible")

    def export(self, model, tmp, sample, precision, static_batch, opts) -> tuple[list[str], dict]:
        from p3bkit.backends.onnx import export_onnx

        export_onnx(model, tmp / "model.onnx", sample, static_batch)
        info: dict = {}
        if precision == INT8:  # explicit quantization: calibrated, symmetric Q/DQ scales in the graph itself
            info["int8"] = self.quantize(tmp / "model.onnx", tmp / "model.qdq.onnx", opts["int8"])
            info["int8"].check(opts["int8"].max_drop)  # the QDQ graph first: no engine build for a failed gate
            (tmp / "model.qdq.onnx").replace(tmp / "model.onnx")
        ops = check_trt_ops(str(tmp / "model.onnx"))
        prof = TrtProfile(*(opts["trt_profile"] if not static_batch else (static_batch,) * 3))
        build_trt_engine(tmp / "model.onnx", tmp / "model.plan", sample, prof, precision, opts.get("timing_cache"))
        if precision == INT8:  # the accuracy again, on the engine itself (it may run layers in fp16)
            result, data = info["int8"], opts["int8"]
            result.int8_top1 = data.top1(TrtRunner(tmp / "model.plan"), batch=min(64, prof.max_batch))
            result.remedy += "; measured on the engine"
            result.attempts.append({"method": "TensorRT engine", "int8_top1": result.int8_top1})
        return ["model.plan", "model.onnx"], {
            "op_types": ops,
            "extra": {"profile": list(prof.__dict__.values())},
            **info,
        }

    def quantize(self, src_onnx, out, data: Int8Data) -> QuantResult:
        """The same calibrated QDQ graph as onnxruntime's, with symmetric scales (TensorRT requires them)."""
        from p3bkit.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend().quantize(src_onnx, out, data, symmetric=True)

    def runner(self, path, precision=None, threads=None, device=None) -> TrtRunner:
        import torch

        self.check_device(device)
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT engines run on a CUDA GPU; none is visible here")
        return TrtRunner(path)

    def timer(self, ref, batch, precision, threads=None, device=None, compile=False) -> Timed:
        import torch

        device = self.check_device(device)
        torch.cuda.set_device(torch.device(device))  # the engine is deserialized on the current device
        runner = self.runner(ref, precision, threads, device)
        shape = tuple(runner.engine.get_tensor_shape(runner.input))[1:]
        x = torch.randn(batch, *shape, device=device)
        return Timed(
            str(ref), self.name, lambda: runner.run_device(x), torch.cuda.synchronize, str(ref), precision=precision
        )

    def onnx_artefact(self, onnx_path, workdir, batch) -> Path:
        import onnx

        dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        sample = tuple(d.dim_value for d in dims[1:])
        return build_trt_engine(onnx_path, onnx_path.with_suffix(".plan"), sample, TrtProfile(batch, batch, batch))
