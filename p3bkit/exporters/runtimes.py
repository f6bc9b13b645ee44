"""Load exported artefacts into their runtimes (imported lazily: none is needed to import p3bkit).

Each loader returns a callable numpy-in → {output name: numpy} used by verification and bench.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np



def import_backend(name: str):
    """Import a runtime's module (onnxruntime, openvino, tensorrt) or raise BackendUnavailable
    naming the pip extra that the backend registry gives for it."""
    from p3bkit.exporters.registry import all_backends, require

    return require(name, next((b.extra for b in all_backends() if name in b.packages), name))


def fixed_batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    """`x` cut into batches of exactly `size` for a static-batch graph, the last one filled by
    repeating images (callers keep the first `len(x)` outputs)."""
    return [np.resize(x[i:i + size], (size, *x.shape[1:])) for i in range(0, len(x), size)]


def ort_session(path: str | Path | bytes, threads: int | None = None, profile: bool = False, spin: bool = True):
    """An onnxruntime CPU session; `spin=False` stops idle worker threads from busy-waiting, so a
    session that is not running takes no core from another model being timed (issue 12)."""
    ort = import_backend("onnxruntime")
    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.enable_profiling = profile
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=["CPUExecutionProvider"])


def ov_compile(xml, precision: str = "f32", threads: int | None = None, device: str = "CPU"):
    """Compile an IR (path or in-memory model); f32/f16 pin f32 inference (OpenVINO defaults to bf16 on CPUs that have it)."""
    ov = import_backend("openvino")
    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(xml if isinstance(xml, ov.Model) else str(xml), device, cfg)


def ov_runner(xml: str | Path, precision: str = "f32", threads: int | None = None):
    compiled = ov_compile(xml, precision, threads)
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        res = request.infer({0: x})
        return {n: np.array(res[o]) for n, o in zip(names, compiled.outputs)}
    run.input_shape = [d.get_length() if d.is_static else None for d in compiled.inputs[0].get_partial_shape()]
    return run
