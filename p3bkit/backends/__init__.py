"""Backends: the registry and one module per runtime (torch eager, onnxruntime, OpenVINO, TensorRT).

The only package that imports a runtime. Everything a stage needs from a runtime goes through a
registered `Backend`: export (and INT8 quantisation), a runner (verification, eval, the INT8
gate), a timer (bench, latency tables, the demo) and parity tolerances. The timing harness
(`timing`) and the ONNX graph export (`onnx`) that the runtimes share live here too.
"""

from p3bkit.backends.registry import (
    BF16,
    FP16,
    FP32,
    INT8,
    PRECISIONS,
    Backend,
    PrecisionError,
    Runner,
    all_backends,
    artefact_suffixes,
    backend_for_artefact,
    backend_status,
    cpu_backends,
    default_table_backend,
    eager_backend,
    formats,
    get_backend,
    register,
    runtimes,
)
from p3bkit.backends.timing import BenchConfig, Timed, describe_cpu, machine_info

__all__ = [
    "BF16",
    "FP16",
    "FP32",
    "INT8",
    "PRECISIONS",
    "Backend",
    "BenchConfig",
    "PrecisionError",
    "Runner",
    "Timed",
    "all_backends",
    "artefact_suffixes",
    "backend_for_artefact",
    "backend_status",
    "cpu_backends",
    "default_table_backend",
    "eager_backend",
    "formats",
    "get_backend",
    "describe_cpu",
    "machine_info",
    "register",
    "runtimes",
]
