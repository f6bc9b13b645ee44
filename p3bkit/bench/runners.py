"""Benchmark runners behind one interface: torch, onnxruntime, openvino, tensorrt.

A runner is built from a pruned folder, a timm name / preset, or an exported artefact (.onnx,
.xml, .plan); models given to the ONNX/OpenVINO runners are exported on the fly (and verified).
Each returns a `Prepared` with a zero-argument `step()` that runs one batch, and `sync()`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from p3bkit.exporters.artefacts import ARTEFACT_BACKEND, artefact_in_folder
from p3bkit.errors import BackendUnavailable, P3BError



@dataclass
class Prepared:
    name: str
    backend: str
    step: Callable[[], object]
    sync: Callable[[], None] = lambda: None
    source: str = ""
    profile: Callable[[int], dict[str, float]] | None = None
    info: dict = field(default_factory=dict)


def _torch_model(ref: str):
    from p3bkit.models.factory import create_model

    return create_model(ref).eval()


def _source_of(ref: str) -> str:
    """The model an artefact was exported from (its JSON record), for FLOP counts."""
    rec = Path(f"{ref}.json")
    if rec.is_file():
        import json

        return json.loads(rec.read_text()).get("source", ref)
    return ref


def _sample_shape(model) -> tuple[int, ...]:
    return (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


def prepare_torch(ref: str, batch: int, device: str, precision: str, threads: int | None, compile: bool = False) -> Prepared:
    model = _torch_model(ref).to(device)
    x = torch.randn(batch, *_sample_shape(model), device=device)
    fn = torch.compile(model) if compile else model
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    @torch.inference_mode()
    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            return fn(x)

    def profile(runs: int) -> dict[str, float]:
        from torch.profiler import ProfilerActivity, profile as tprof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with tprof(activities=acts) as prof:
            for _ in range(runs):
                step()
        return {e.key: e.self_cpu_time_total / 1e3 / runs for e in prof.key_averages() if e.key.startswith("aten::")}

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return Prepared(ref, "torch", step, sync, ref, profile)


def _exported(ref: str, fmt: str, workdir: Path) -> Path:
    from p3bkit.exporters import ARTEFACT, export_model

    out = workdir / f"{abs(hash(ref))}-{fmt}"
    export_model(ref, fmt, out)
    return out / ARTEFACT[fmt]


ORT_OPTIMIZED = " [ort-transformers]"  # name suffix of a model run through onnxruntime's transformer optimiser


def runtime_label(name: str, backend: str) -> str:
    """The runtime a bench result ran on, telling the transformer-optimised onnxruntime graph apart."""
    return f"{backend} (transformer-optimised)" if name.endswith(ORT_OPTIMIZED) else backend


def _ort_transformer_optimized(path: Path, workdir: Path, ref: str) -> Path:
    """onnxruntime's transformer optimiser (model_type "vit": fused LayerNorm, GELU and attention),
    the usual way a dense ViT is deployed with onnxruntime; refused if it changes the outputs."""
    import contextlib
    import io

    from onnxruntime.transformers import optimizer

    from p3bkit.exporters.runtimes import ort_runner
    from p3bkit.models.adapter import inspect_vit

    model = _torch_model(_source_of(ref) if ref.endswith(".onnx") else ref)
    spec = inspect_vit(model)
    out = workdir / f"{path.stem}.ort-transformers.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        opt = optimizer.optimize_model(str(path), model_type="vit", num_heads=spec.num_heads, hidden_size=spec.dim,
                                       opt_level=0)
    opt.save_model_to_file(str(out))
    x = np.random.default_rng(0).standard_normal((2, *_sample_shape(model))).astype(np.float32)
    ref, opt = ort_runner(path)(x), ort_runner(out)(x)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref.values(), opt.values()))
    if diff > 1e-3:
        raise P3BError(f"onnxruntime's transformer optimiser changed the outputs of {path} (max abs diff {diff:.2e})")
    return out


def prepare_onnxruntime(ref: str, batch: int, threads: int | None, workdir: Path,
                        transformer_optimized: bool = False) -> Prepared:
    from p3bkit.exporters.runtimes import ort_session

    path = Path(ref) if ref.endswith(".onnx") else _exported(ref, "onnx", workdir)
    if transformer_optimized:
        path = _ort_transformer_optimized(path, workdir, ref)
    sess = ort_session(path, threads, spin=False)  # an idle spinning pool would slow the next model timed
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *inp.shape[1:])).astype(np.float32)
    if "16" in inp.type:
        x = x.astype(np.float16)

    def profile(runs: int) -> dict[str, float]:
        return _ort_profile(path, threads, inp.name, x, runs)

    return Prepared(ref + (ORT_OPTIMIZED if transformer_optimized else ""), "onnxruntime",
                    lambda: sess.run(None, {inp.name: x}), source=_source_of(ref) if ref.endswith(".onnx") else ref,
                    profile=profile)


def _ort_profile(path: Path, threads: int | None, name: str, x: np.ndarray, runs: int) -> dict[str, float]:
    import json

    from p3bkit.exporters.runtimes import ort_session

    sess = ort_session(path, threads, profile=True, spin=False)
    for _ in range(runs):
        sess.run(None, {name: x})
    trace = Path(sess.end_profiling())
    totals: dict[str, float] = {}
    for ev in json.loads(trace.read_text()):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + ev["dur"] / 1e3 / runs
    trace.unlink(missing_ok=True)
    return totals


def prepare_openvino(ref: str, batch: int, threads: int | None, precision: str, workdir: Path) -> Prepared:
    from p3bkit.exporters.runtimes import import_backend, ov_compile

    path = Path(ref) if ref.endswith(".xml") else _exported(ref, "openvino", workdir)
    compiled = ov_compile(path, precision if precision in ("f32", "bf16") else "f32", threads)
    request = compiled.create_infer_request()
    shape = [batch, *[d.get_length() for d in list(compiled.inputs[0].get_partial_shape())[1:]]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def profile(runs: int) -> dict[str, float]:
        ov = import_backend("openvino")
        prof = ov.Core().compile_model(str(path), "CPU", {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32",
                                                          **({"INFERENCE_NUM_THREADS": threads} if threads else {})})
        req = prof.create_infer_request()
        totals: dict[str, float] = {}
        for _ in range(runs):
            req.infer({0: x})
            for p in req.get_profiling_info():
                totals[p.node_type] = totals.get(p.node_type, 0.0) + p.real_time.total_seconds() * 1e3 / runs
        return totals

    return Prepared(ref, "openvino", lambda: request.infer({0: x}),
                    source=_source_of(str(path)) if ref.endswith(".xml") else ref, profile=profile)


def prepare_tensorrt(ref: str, batch: int) -> Prepared:
    from p3bkit.exporters.tensorrt import TrtRunner

    if not ref.endswith((".plan", ".engine")):
        raise P3BError(f"the tensorrt backend runs engines (.plan); build one first: p3bkit export {ref} --format trt")
    runner = TrtRunner(ref)
    shape = tuple(runner.engine.get_tensor_shape(runner.input))[1:]
    x = torch.randn(batch, *shape, device="cuda")
    return Prepared(ref, "tensorrt", lambda: runner.run_device(x), torch.cuda.synchronize, _source_of(ref))


# what `--precision` each runner can honour (an artefact's own precision is fixed at export)
RUNNER_PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32",), "openvino": ("fp32", "f32", "bf16"),
                     "tensorrt": ("fp32",)}


def check_precision(backend: str, precision: str) -> None:
    """Refuse a precision the runner would ignore or silently change."""
    allowed = RUNNER_PRECISIONS.get(backend)
    if allowed is not None and precision not in allowed:
        how = {"onnxruntime": "export an fp16 model (p3bkit export --fp16) and bench that artefact",
               "tensorrt": "build the engine in that precision (p3bkit export --format trt --precision ...)",
               "openvino": "OpenVINO on CPU infers in f32 or bf16"}.get(backend, "")
        raise P3BError(f"the {backend} runner cannot run --precision {precision} (it takes {', '.join(allowed)})"
                       + (f"; {how}" if how else ""))


def dense_baselines(ref: str, batch: int, threads: int | None, workdir: Path, skip: str = "") -> list[Prepared]:
    """The dense model on every CPU runtime importable here: torch eager, onnxruntime (plain and
    transformer-optimised) and OpenVINO — the fastest of them is what a pruned model must beat.
    `skip`: a runtime already timed."""
    out = [] if skip == "torch" else [prepare_torch(ref, batch, "cpu", "fp32", threads)]
    makers = [] if skip == "onnxruntime" else [lambda: prepare_onnxruntime(ref, batch, threads, workdir)]
    for make in makers + [
            lambda: prepare_onnxruntime(ref, batch, threads, workdir, transformer_optimized=True)] + (
            [] if skip == "openvino" else [lambda: prepare_openvino(ref, batch, threads, "f32", workdir)]):
        try:
            out.append(make())
        except BackendUnavailable:
            continue
    return out


def prepare(ref: str, backend: str | None, batch: int, device: str, precision: str, threads: int | None,
            workdir: Path | None = None, compile: bool = False) -> Prepared:
    """Build the runner for `ref` (backend inferred from an artefact's suffix when not given).

    An export folder (no arch.json, one exported artefact inside) stands for its artefact.
    """
    ref = artefact_in_folder(ref, backend)
    suffix = Path(ref).suffix
    inferred = ARTEFACT_BACKEND.get(suffix)
    if backend and inferred and backend != inferred:
        raise P3BError(f"{ref} is a {suffix} artefact, which the {backend} backend cannot run (use {inferred})")
    backend = backend or inferred or "torch"
    check_precision(backend, precision)
    if suffix and suffix not in ARTEFACT_BACKEND and not Path(ref).is_dir():
        raise P3BError(f"{ref}: unknown artefact type {suffix!r} (expected a pruned folder, a model name, "
                       f"or one of {', '.join(ARTEFACT_BACKEND)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("--device gpu asked for, but no CUDA GPU is visible here")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="p3bkit-bench-"))
    if backend == "torch":
        return prepare_torch(ref, batch, device, precision, threads, compile)
    if backend == "onnxruntime":
        return prepare_onnxruntime(ref, batch, threads, workdir)
    if backend == "openvino":
        return prepare_openvino(ref, batch, threads, precision, workdir)
    if backend == "tensorrt":
        return prepare_tensorrt(ref, batch)
    raise P3BError(f"unknown backend {backend!r}: choose torch, onnxruntime, openvino or tensorrt")
