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

from p3bkit.errors import BackendUnavailable, P3BError
from p3bkit.exporters.artefacts import artefact_in_folder


@dataclass
class Prepared:
    name: str
    backend: str
    step: Callable[[], object]
    sync: Callable[[], None] = lambda: None
    source: str = ""
    profile: Callable[[int], dict[str, float]] | None = None
    info: dict = field(default_factory=dict)
    precision: str = "fp32"  # what it runs at (the registry's canonical name)


def _torch_model(ref: str):
    from p3bkit.models.factory import create_model

    return create_model(ref).eval()


def _source_of(ref: str) -> str:
    """The model an artefact was exported from (its JSON record), for FLOP counts."""
    from p3bkit.exporters.registry import read_record

    return read_record(ref).get("source", ref)


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
    return Prepared(ref, "torch", step, sync, ref, profile, precision=precision)


def _exported(ref: str, fmt: str, workdir: Path, precision: str = "fp32") -> Path:
    from p3bkit.exporters import artefact_name, export_model

    out = workdir / f"{abs(hash(ref))}-{fmt}-{precision}"
    export_model(ref, fmt, out, precision=precision)
    return out / artefact_name(fmt)


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

    from p3bkit.exporters.registry import get_backend
    from p3bkit.models.adapter import inspect_vit

    model = _torch_model(_source_of(ref) if ref.endswith(".onnx") else ref)
    spec = inspect_vit(model)
    out = workdir / f"{path.stem}.ort-transformers.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        opt = optimizer.optimize_model(str(path), model_type="vit", num_heads=spec.num_heads, hidden_size=spec.dim,
                                       opt_level=0)
    opt.save_model_to_file(str(out))
    x = np.random.default_rng(0).standard_normal((2, *_sample_shape(model))).astype(np.float32)
    ort = get_backend("onnxruntime")
    ref, opt = ort.runner(path)(x), ort.runner(out)(x)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref.values(), opt.values()))
    if diff > 1e-3:
        raise P3BError(f"onnxruntime's transformer optimiser changed the outputs of {path} (max abs diff {diff:.2e})")
    return out


def prepare_onnxruntime(ref: str, batch: int, threads: int | None, workdir: Path,
                        transformer_optimized: bool = False, precision: str = "fp32") -> Prepared:
    from p3bkit.exporters.registry import get_backend

    path = Path(ref) if ref.endswith(".onnx") else _exported(ref, "onnx", workdir, precision)
    if transformer_optimized:
        path = _ort_transformer_optimized(path, workdir, ref)
    run = get_backend("onnxruntime").runner(path, precision, threads)  # the registry's runner, as in eval/verify
    x = np.random.default_rng(0).standard_normal((batch, *run.input_shape[1:])).astype(run.input_dtype)

    def profile(runs: int) -> dict[str, float]:
        return _ort_profile(path, threads, "pixel_values", x, runs)

    return Prepared(ref + (ORT_OPTIMIZED if transformer_optimized else ""), "onnxruntime", lambda: run(x),
                    source=_source_of(ref) if ref.endswith(".onnx") else ref, profile=profile, precision=precision)


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
    from p3bkit.exporters.registry import get_backend
    from p3bkit.exporters.runtimes import import_backend

    path = Path(ref) if ref.endswith(".xml") else _exported(ref, "openvino", workdir, precision)
    run = get_backend("openvino").runner(path, precision, threads)  # the registry's runner, as in eval/verify
    x = np.random.default_rng(0).standard_normal((batch, *run.input_shape[1:])).astype(np.float32)

    def profile(runs: int) -> dict[str, float]:
        ov = import_backend("openvino")
        hint = get_backend("openvino").inference_hint(precision)
        prof = ov.Core().compile_model(str(path), "CPU", {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": hint,
                                                          **({"INFERENCE_NUM_THREADS": threads} if threads else {})})
        req = prof.create_infer_request()
        totals: dict[str, float] = {}
        for _ in range(runs):
            req.infer({0: x})
            for p in req.get_profiling_info():
                totals[p.node_type] = totals.get(p.node_type, 0.0) + p.real_time.total_seconds() * 1e3 / runs
        return totals

    return Prepared(ref, "openvino", lambda: run(x),
                    source=_source_of(str(path)) if ref.endswith(".xml") else ref, profile=profile, precision=precision)


def prepare_tensorrt(ref: str, batch: int, precision: str = "fp32") -> Prepared:
    from p3bkit.exporters.tensorrt import TrtRunner

    if not ref.endswith((".plan", ".engine")):
        raise P3BError(f"the tensorrt backend runs engines (.plan); build one first: p3bkit export {ref} --format trt")
    runner = TrtRunner(ref)
    shape = tuple(runner.engine.get_tensor_shape(runner.input))[1:]
    x = torch.randn(batch, *shape, device="cuda")
    return Prepared(ref, "tensorrt", lambda: runner.run_device(x), torch.cuda.synchronize, _source_of(ref),
                    precision=precision)


def run_precision(backend, ref: str, is_artefact: bool, asked: str | None) -> str:
    """What a runner will run at, from the registry: an artefact's own precision (or one its runtime
    can honour for it); a model is exported on the fly at the asked precision. Refuses anything a
    runner would ignore or silently change."""
    from p3bkit.exporters.registry import artefact_precision

    if is_artefact:
        return backend.run_precision(artefact_precision(ref), asked)
    try:
        run = backend.precision(asked)
    except P3BError:
        raise P3BError(f"the {backend.name} runner cannot run --precision {asked} (it takes "
                       f"{', '.join(backend.precisions)})") from None
    if run == "int8":
        raise P3BError(f"INT8 needs calibration images: p3bkit export {ref} --format {backend.format or 'onnx'} "
                       "--precision int8 --calib-data DATA, then bench that artefact")
    return backend.run_precision(run)  # the runtime's own refusals (OpenVINO: bf16 on a CPU without bf16 units)


def dense_baselines(ref: str, batch: int, threads: int | None, workdir: Path, skip: str = "") -> list[Prepared]:
    """The dense model on every CPU runtime importable here: torch eager, onnxruntime (plain and
    transformer-optimised) and OpenVINO — the fastest of them is what a pruned model must beat.
    `skip`: a runtime already timed."""
    out = [] if skip == "torch" else [prepare_torch(ref, batch, "cpu", "fp32", threads)]
    makers = [] if skip == "onnxruntime" else [lambda: prepare_onnxruntime(ref, batch, threads, workdir)]
    for make in makers + [
            lambda: prepare_onnxruntime(ref, batch, threads, workdir, transformer_optimized=True)] + (
            [] if skip == "openvino" else [lambda: prepare_openvino(ref, batch, threads, "fp32", workdir)]):
        try:
            out.append(make())
        except BackendUnavailable:
            continue
    return out


def prepare(ref: str, backend: str | None, batch: int, device: str, precision: str | None, threads: int | None,
            workdir: Path | None = None, compile: bool = False) -> Prepared:
    """Build the runner for `ref` (backend inferred from an artefact's suffix when not given).

    An export folder (no arch.json, one exported artefact inside) stands for its artefact.
    `precision` None: the artefact's own, fp32 for a model.
    """
    from p3bkit.exporters.registry import artefact_suffixes, backend_for_artefact, get_backend

    ref = artefact_in_folder(ref, backend)
    suffix = Path(ref).suffix
    owner = backend_for_artefact(ref)
    if backend and owner and backend != owner.name:
        raise P3BError(f"{ref} is a {suffix} artefact, which the {backend} backend cannot run (use {owner.name})")
    if suffix and not owner and not Path(ref).is_dir():
        raise P3BError(f"{ref}: unknown artefact type {suffix!r} (expected a pruned folder, a model name, "
                       f"or one of {', '.join(artefact_suffixes())})")
    be = get_backend(backend) if backend else owner or get_backend("torch")
    run = run_precision(be, ref, owner is not None, precision)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("--device gpu asked for, but no CUDA GPU is visible here")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="p3bkit-bench-"))
    makers = {"torch": lambda: prepare_torch(ref, batch, device, run, threads, compile),
              "onnxruntime": lambda: prepare_onnxruntime(ref, batch, threads, workdir, precision=run),
              "openvino": lambda: prepare_openvino(ref, batch, threads, run, workdir),
              "tensorrt": lambda: prepare_tensorrt(ref, batch, run)}
    if be.name in makers:
        return makers[be.name]()
    return _prepare_generic(be, ref, batch, threads, run, owner is not None)


def _prepare_generic(be, ref: str, batch: int, threads: int | None, precision: str, is_artefact: bool) -> Prepared:
    """Any other registered backend: its artefact through the registry's `runner`."""
    from p3bkit.exporters.registry import read_record

    if not is_artefact:
        raise P3BError(f"the {be.name} backend runs exported artefacts: export {ref} first (p3bkit export)")
    shape = read_record(ref).get("input_shape", [None, 3, 224, 224])[1:]
    run = be.runner(ref, precision, threads)
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    return Prepared(ref, be.name, lambda: run(x), source=_source_of(ref), precision=precision)
