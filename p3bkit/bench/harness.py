"""Timing harness: warm-up, interleaved timed runs, statistics, comparison table, machine info.

Models are timed round-robin in blocks (A×k, B×k, C×k, A×k, …) in one process so that drift in
clock speed or background load hits every model alike. Each block starts with untimed runs: a
runtime's worker threads (onnxruntime spins them, OpenVINO too) must wake up and the previous
model's threads must go idle — interleaving single calls measured onnxruntime's dense DeiT-S at
127 ms instead of 43 ms here. Throughput is images/s = batch × runs / total time.
"""
from __future__ import annotations

import contextlib
import os
import platform

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from p3bkit.bench.runners import Prepared

PRESETS = {"cpu": {"batch": 1, "device": "cpu"}, "gpu": {"batch": 1024, "device": "cuda"}}


@dataclass
class BenchConfig:
    runs: int = 1000
    duration: float | None = None  # seconds per model; stops early when reached
    warmup: int = 20
    warmup_seconds: float = 1.0
    threads: int | None = None
    block: int = 10  # timed runs per model before switching to the next
    block_warmup: int = 2  # untimed runs at the start of every block


@dataclass
class BenchResult:
    name: str
    backend: str
    batch: int
    latencies_ms: list[float]
    stats: dict = field(default_factory=dict)
    flops: int | None = None
    precision: str = ""  # what ran: the requested one, or an artefact's own (fixed at export)
    predicted_ms: float | None = None  # the latency table's prediction, when one was given
    baseline: bool = False  # one of the dense model's runtimes (bench --dense-baselines)


def latency_stats(lat_ms: list[float], batch: int) -> dict:
    a = np.asarray(lat_ms, dtype=np.float64)
    median = float(np.median(a))
    # images/s from the median (the number the table's speedups use); the mean-based rate is kept too
    return {"runs": len(a), "median_ms": median, "mean_ms": float(a.mean()),
            "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99)),
            "std_ms": float(a.std()), "images_per_s": batch / (median / 1e3),
            "images_per_s_mean": float(batch * len(a) / (a.sum() / 1e3))}


NOISY_P90 = 1.5  # p90 above 1.5× the median: something else was competing for the machine


def timing_warnings(results: list[BenchResult], archs: list[str | None]) -> list[str]:
    """What makes a comparison untrustworthy: noisy timings, mixed backends, different models."""
    out = [f"timing of {r.name} is noisy (p90 {r.stats['p90_ms']:.3f} ms vs median {r.stats['median_ms']:.3f} ms): "
           "run the benchmark alone, with more --runs" for r in results
           if r.stats["p90_ms"] > NOISY_P90 * r.stats["median_ms"]]
    backends = sorted({r.backend for r in results})
    if len(backends) > 1:
        out.append(f"the models run on different backends ({', '.join(backends)}): speedups mix model and runtime")
    names = sorted({a for a in archs if a})
    if len(names) > 1:
        out.append(f"the models are different architectures ({', '.join(names)}): speedups are not pruning speedups")
    return out


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Pin torch's intra-op threads for the block, then restore."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _warm(p: Prepared, cfg: BenchConfig) -> None:
    t0, n = time.perf_counter(), 0
    while n < cfg.warmup or time.perf_counter() - t0 < cfg.warmup_seconds:
        p.step()
        p.sync()
        n += 1


def benchmark(models: list[Prepared], batch: int, cfg: BenchConfig) -> list[BenchResult]:
    """Warm every model, then time them interleaved."""
    lat: list[list[float]] = [[] for _ in models]
    spent = [0.0 for _ in models]
    with torch_threads(cfg.threads):
        for p in models:
            _warm(p, cfg)
        while min(len(x) for x in lat) < cfg.runs:
            for i, p in enumerate(models):
                for _ in range(cfg.block_warmup if len(models) > 1 else 0):
                    p.step()
                    p.sync()
                for _ in range(min(cfg.block, cfg.runs - len(lat[i]))):
                    t0 = time.perf_counter()
                    p.step()
                    p.sync()
                    dt = time.perf_counter() - t0
                    lat[i].append(dt * 1e3)
                    spent[i] += dt
            if cfg.duration is not None and min(spent) >= cfg.duration:
                break
    return [BenchResult(p.name, p.backend, batch, l, latency_stats(l, batch)) for p, l in zip(models, lat)]


def compare_table(results: list[BenchResult]) -> str:
    """Markdown: latency, images/s, speedup vs the first, FLOP ratio (ideal) and measured/ideal.

    With dense baselines (several runtimes of the dense model) it adds the speedup against the
    fastest of them; with a latency table, the table's predicted ms.
    """
    base = results[0]
    baselines = [r for r in results if r.baseline]
    fastest = min(baselines, key=lambda r: r.stats["median_ms"]) if baselines else None
    predicted = any(r.predicted_ms is not None for r in results)
    head = "| model | backend | precision | batch | median ms | p90 ms | images/s | speedup | FLOP ratio | measured/ideal |"
    head += f" vs fastest dense ({fastest.name}, {fastest.backend}) |" if fastest else ""
    head += " predicted ms |" if predicted else ""
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        speed = base.stats["median_ms"] / r.stats["median_ms"]
        ideal = base.flops / r.flops if base.flops and r.flops else float("nan")
        row = (f"| {r.name} | {r.backend} | {r.precision or 'fp32'} | {r.batch} | {r.stats['median_ms']:.3f} | {r.stats['p90_ms']:.3f} | "
               f"{r.stats['images_per_s']:.1f} | {speed:.2f}× | {ideal:.2f}× | {speed / ideal:.2f} |")
        if fastest:
            row += f" {fastest.stats['median_ms'] / r.stats['median_ms']:.2f}× |"
        if predicted:
            row += f" {r.predicted_ms:.3f} |" if r.predicted_ms is not None else " |"
        rows.append(row)
    return "\n".join(rows)


def machine_info(threads: int | None = None) -> dict:
    import importlib.metadata as md

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    from p3bkit.exporters.registry import all_backends

    for pkg in ["timm", *dict.fromkeys(p.split(".")[0] for b in all_backends() for p in b.packages)]:
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "versions": versions}


def results_json(results: list[BenchResult], cfg: BenchConfig, extra: dict | None = None) -> dict:
    return {"machine": machine_info(cfg.threads), "config": asdict(cfg), **(extra or {}),
            "results": [asdict(r) for r in results]}
