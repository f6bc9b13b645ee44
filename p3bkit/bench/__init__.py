"""Throughput harness: runners per backend, interleaved timing, comparison tables and plots."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from p3bkit.bench.harness import (
    PRESETS,
    BenchConfig,
    BenchResult,
    benchmark,
    compare_table,
    results_json,
    timing_warnings,
)
from p3bkit.bench.runners import prepare
from p3bkit.fileio import write_json_atomic

__all__ = ["BenchConfig", "BenchResult", "PRESETS", "benchmark", "compare_table", "run_bench"]


def _flops(ref: str) -> int | None:
    from p3bkit.models.factory import create_model
    from p3bkit.models.report import describe

    try:
        return describe(create_model(ref))["flops"]
    except Exception:  # an artefact whose source model is not rebuildable here: no FLOP ratio
        return None


def _architecture(ref: str) -> str | None:
    """The timm architecture behind a model reference (None for artefacts it cannot tell)."""
    from p3bkit.errors import P3BError
    from p3bkit.models.arch import ARCH_FILE, read_arch
    from p3bkit.models.factory import resolve_source

    try:
        if (Path(ref) / ARCH_FILE).is_file():
            return read_arch(ref).source.name
        return resolve_source(ref).name if not Path(ref).exists() else None
    except P3BError:
        return None


def _artefact_precision(ref: str) -> str | None:
    """An exported artefact's precision, from its export record."""
    import json

    record = Path(f"{ref}.json")
    return json.loads(record.read_text()).get("precision") if record.is_file() else None


def run_bench(refs: list[str], backend: str | None = None, device: str = "cpu", batch: int | None = None,
              precision: str = "fp32", cfg: BenchConfig | None = None, profile: bool = False,
              json_out: str | None = None, compile: bool = False) -> dict:
    """Benchmark models interleaved; returns the JSON-able report (also written to `json_out`)."""
    cfg = cfg or BenchConfig()
    dev = PRESETS[device] if device in PRESETS else {"batch": 1, "device": device}
    batch = batch or dev["batch"]
    workdir = Path(tempfile.mkdtemp(prefix="p3bkit-bench-"))
    try:  # models exported on the fly live in workdir only while they are measured
        prepared = [prepare(r, backend, batch, dev["device"], precision, cfg.threads, workdir, compile) for r in refs]
        results = benchmark(prepared, batch, cfg)
        for p, r in zip(prepared, results):
            r.flops = _flops(p.source or p.name)
            r.precision = _artefact_precision(p.name) or precision
        report = results_json(results, cfg, {"device": dev["device"], "precision": precision})
        report["table"] = compare_table(results)
        report["warnings"] = timing_warnings(results, [_architecture(p.source or p.name) for p in prepared])
        if profile:
            report["profile"] = {p.name: p.profile(min(cfg.runs, 50)) if p.profile else {} for p in prepared}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if json_out:
        write_json_atomic(json_out, report)
    return report
