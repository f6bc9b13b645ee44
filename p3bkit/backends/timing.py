"""The one timing harness: bench, latency tables, the demo and benchmarks/ all time through it.

A `Timed` is one model on one runtime with its input ready: `step()` runs one batch, `sync()`
waits for it (CUDA). `time_interleaved` times several round-robin in blocks (A×k, B×k, C×k,
A×k, …) in one process, so drift in clock speed or background load hits every model alike.
Each block starts with untimed runs: a runtime's worker threads must wake up and the previous
model's threads go idle (interleaving single calls measured onnxruntime's dense DeiT-S at 127 ms
instead of 43 ms). `time_in_passes` times one model at a time, the lowest median of a few passes
(latency tables: a transient disturbance during one graph's turn does not enter the table).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _no_sync() -> None:
    return None


@dataclass
class Timed:
    """One model on one runtime, its input ready: what the harness times."""

    name: str
    backend: str
    step: Callable[[], object]
    sync: Callable[[], None] = _no_sync
    source: str = ""  # the model the artefact was exported from (FLOP counts, latency predictions)
    profile: Callable[[int], dict[str, float]] | None = None  # ms per op type per run
    precision: str = "fp32"  # what it runs at (the registry's canonical name)
    variant: str = ""  # another graph of the same model on this runtime (e.g. "transformer-optimised")

    @property
    def runtime(self) -> str:
        """The runtime it ran on, telling a variant graph apart: "onnxruntime (transformer-optimised)"."""
        return f"{self.backend} ({self.variant})" if self.variant else self.backend


@dataclass
class BenchConfig:
    runs: int = 1000
    duration: float | None = None  # seconds per model; stops early when reached
    warmup: int = 20
    warmup_seconds: float = 1.0
    threads: int | None = None
    block: int = 10  # timed runs per model before switching to the next
    block_warmup: int = 2  # untimed runs at the start of every block


DEVICE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"batch": 1, "device": "cpu"},
    "gpu": {"batch": 1024, "device": "cuda"},
}  # the paper's protocol


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Pin torch's intra-op threads for the block, then restore."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run(t: Timed) -> float:
    t0 = time.perf_counter()
    t.step()
    t.sync()
    return time.perf_counter() - t0


def _warm(t: Timed, runs: int, seconds: float) -> None:
    t0, n = time.perf_counter(), 0
    while n < runs or time.perf_counter() - t0 < seconds:
        _run(t)
        n += 1


def time_interleaved(models: list[Timed], cfg: BenchConfig) -> list[list[float]]:
    """Warm every model, then time them interleaved; latencies in ms per model."""
    lat: list[list[float]] = [[] for _ in models]
    spent = [0.0 for _ in models]
    with torch_threads(cfg.threads):
        for t in models:
            _warm(t, cfg.warmup, cfg.warmup_seconds)
        while min(len(x) for x in lat) < cfg.runs:
            for i, t in enumerate(models):
                for _ in range(cfg.block_warmup if len(models) > 1 else 0):
                    _run(t)
                for _ in range(min(cfg.block, cfg.runs - len(lat[i]))):
                    dt = _run(t)
                    lat[i].append(dt * 1e3)
                    spent[i] += dt
            if cfg.duration is not None and min(spent) >= cfg.duration:
                break
    return lat


def median_ms(t: Timed, runs: int) -> float:
    """Median ms of `runs` timed runs after a short untimed warm-up (≥ 3 runs and 50 ms)."""
    _warm(t, 3, 0.05)
    return float(np.median([_run(t) for _ in range(runs)]) * 1e3)


def time_in_passes(models: list[Timed], runs: int, passes: int = 3, progress: bool = False) -> list[float]:
    """Median ms per model, the lowest over `passes` passes (forward, then reverse order), so a
    transient disturbance during one model's turn does not end up in the result."""
    from p3bkit.console import progress as bar_of

    gc.collect()  # release runtimes of earlier graphs before timing (their pools must not compete)
    best = [float("inf")] * len(models)
    bar = bar_of(desc="timing", total=passes * len(models), enabled=progress)
    for p in range(passes):
        for i in range(len(models)) if p % 2 == 0 else reversed(range(len(models))):
            best[i] = min(best[i], median_ms(models[i], runs))
            bar.update()
    bar.close()
    return best


def time_against_first(models: list[Timed], runs: int, rounds: int = 9) -> list[float]:
    """Median ms per model, each but the first as the first's ms over its median speedup.

    `rounds` short rounds (forward, then reverse order), each timing every model for about
    3·`runs`/`rounds` runs; a model's speedup over the first is taken per round and the median
    over rounds kept. On a busy host the machine's pace drifts between rounds by more than pruned
    models differ (dense DeiT-S medians of 20.2–24.4 ms in one minute); a ratio within a round
    cancels that drift, separate minima over passes do not."""
    per = max(5, 3 * runs // rounds)
    ms = np.zeros((rounds, len(models)))
    gc.collect()
    for r in range(rounds):
        for i in range(len(models)) if r % 2 == 0 else reversed(range(len(models))):
            ms[r, i] = median_ms(models[i], per)
    first = float(np.median(ms[:, 0]))
    return [first] + [first / float(np.median(ms[:, 0] / ms[:, i])) for i in range(1, len(models))]


def latency_stats(lat_ms: list[float], batch: int) -> dict:
    a = np.asarray(lat_ms, dtype=np.float64)
    median = float(np.median(a))
    # images/s from the median (the number the table's speedups use); the mean-based rate is kept too
    return {
        "runs": len(a),
        "median_ms": median,
        "mean_ms": float(a.mean()),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "std_ms": float(a.std()),
        "images_per_s": batch / (median / 1e3),
        "images_per_s_mean": float(batch * len(a) / (a.sum() / 1e3)),
    }


# The instruction sets CPU runtimes choose their kernels by. The model name alone does not tell CPU
# kinds apart: an idle 2-core "AMD EPYC" with AVX2 only (family 25 model 1) times dense DeiT-S on
# OpenVINO at 56-69 ms, where another 2-core host of the same name timed it at 22 ms.
KERNEL_ISA = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
)


def cpu_identity(cpuinfo: str) -> dict:
    """The CPU's model name, its id (vendor, family, model) and the kernel instruction sets it has,
    read from the text of /proc/cpuinfo (x86 `flags`, Arm `Features`); what the text lacks is None."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    if "vendor_id" in fields:
        cpu_id = f"{fields['vendor_id']} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    elif "cpu implementer" in fields:
        cpu_id = f"implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    else:
        cpu_id = None
    return {
        "cpu": fields.get("model name"),
        "cpu_id": cpu_id,
        "isa": [f for f in KERNEL_ISA if f in flags] if flags else None,
    }


def this_cpu() -> dict:
    """`cpu_identity` of this machine (all None where /proc/cpuinfo cannot be read)."""
    with contextlib.suppress(OSError):
        return cpu_identity(Path("/proc/cpuinfo").read_text())
    return {"cpu": None, "cpu_id": None, "isa": None}


def int8_saturates(isa: list[str] | None) -> bool:
    """Whether this CPU's INT8 dot products can saturate: x86 without VNNI (AVX2, AVX-512F) multiplies
    8-bit pairs into 16-bit sums (onnxruntime's u8·s8 kernels), so full-range 8-bit weights overflow;
    VNNI, AMX and Arm's dot products accumulate in 32 bits."""
    if not isa or "asimd" in isa:
        return False
    return not any(f in isa for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def machine_info(threads: int | None = None) -> dict:
    """The CPU (name, id, kernel instruction sets), cores, threads, GPU and runtime versions a
    measurement was taken with."""
    import torch

    from p3bkit.backends.registry import runtime_packages
    from p3bkit.version import package_versions

    ident = this_cpu()
    versions = {k: v for k, v in package_versions(*runtime_packages()).items() if v != "missing"}
    return {
        "cpu": ident["cpu"] or platform.processor(),
        "cpu_id": ident["cpu_id"],
        "isa": ident["isa"],
        "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": versions,
    }


def describe_cpu(machine: dict) -> str:
    """'AMD EPYC (AuthenticAMD family 25 model 1, avx2)': the name and what tells its kind apart."""
    isa = " ".join(f for f in machine.get("isa") or [] if f != "fma")
    detail = ", ".join(x for x in (machine.get("cpu_id"), isa) if x)
    return f"{machine.get('cpu')} ({detail})" if detail else str(machine.get("cpu"))
