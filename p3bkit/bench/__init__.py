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
from p3bkit.bench.runners import prepare, runtime_label
from p3bkit.fileio import write_json_atomic

# written into every report: how the numbers were taken (issue 12, "honest speedups")
PROTOCOL = ("all models in one process, timed round-robin in blocks with untimed lead-in runs; onnxruntime "
            "intra-op threads do not spin (session.intra_op.allow_spinning=0); median latency")

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


def _layers(ref: str) -> list[dict] | None:
    """Pruned layers behind a model reference (a pruned folder or an artefact exported from one)."""
    from p3bkit.exporters.registry import read_record
    from p3bkit.models.arch import ARCH_FILE, read_arch

    ref = read_record(ref).get("source", ref)
    return read_arch(ref).layers if (Path(ref) / ARCH_FILE).is_file() else None


def _predictions(prepared, results, table_path: str, threads: int | None) -> None:
    """The latency table's prediction for every model run on the table's runtime (batch)."""
    from p3bkit.bench.harness import machine_info
    from p3bkit.errors import P3BError
    from p3bkit.models.latency import LatencyTable

    table = LatencyTable.load(table_path)
    table.check_machine(machine_info(threads))
    for p, r in zip(prepared, results):
        if runtime_label(p.name, r.backend) == table.backend and r.batch == table.batch:
            try:
                r.predicted_ms = table.predict(_layers(p.source or p.name))
            except P3BError:  # another model, or one the table does not model (--structure full): no column value
                r.predicted_ms = None


def run_bench(refs: list[str], backend: str | None = None, device: str = "cpu", batch: int | None = None,
              precision: str | None = None, cfg: BenchConfig | None = None, profile: bool = False,
              json_out: str | None = None, compile: bool = False, dense_baselines: bool = False,
              latency_table: str | list[str] | None = None) -> dict:
    """Benchmark models interleaved; returns the JSON-able report (also written to `json_out`).

    `dense_baselines`: also time the first model (the dense one) on every CPU runtime here, and
    report each model's speedup against the fastest. `latency_table`: add the prediction of the
    table (or tables, one per runtime) for the models run on its runtime.
    """
    from p3bkit.bench.runners import dense_baselines as baselines_of
    from p3bkit.errors import P3BError

    cfg = cfg or BenchConfig()
    dev = PRESETS[device] if device in PRESETS else {"batch": 1, "device": device}
    batch = batch or dev["batch"]
    if dense_baselines and dev["device"] != "cpu":
        raise P3BError("--dense-baselines compares CPU runtimes: use --device cpu")
    workdir = Path(tempfile.mkdtemp(prefix="p3bkit-bench-"))
    try:  # models exported on the fly live in workdir only while they are measured
        prepared = [prepare(r, backend, batch, dev["device"], precision, cfg.threads, workdir, compile) for r in refs]
        extra = baselines_of(prepared[0].source or refs[0], batch, cfg.threads, workdir, prepared[0].backend) \
            if dense_baselines else []
        results = benchmark(prepared + extra, batch, cfg)
        for i, (p, r) in enumerate(zip(prepared + extra, results)):
            r.flops = _flops(p.source or p.name)
            r.precision = p.precision
            r.baseline = i >= len(prepared) or (dense_baselines and i == 0)
        for table in [latency_table] if isinstance(latency_table, str) else latency_table or []:
            _predictions(prepared + extra, results, table, cfg.threads)
        report = results_json(results, cfg, {"device": dev["device"], "precision": precision or "as exported",
                                             "protocol": PROTOCOL})
        report["table"] = compare_table(results)
        n = len(prepared)  # the dense baselines are other runtimes on purpose: only their noise is worth a warning
        report["warnings"] = timing_warnings(results[:n], [_architecture(p.source or p.name) for p in prepared]) + [
            w for w in timing_warnings(results[n:], []) if "noisy" in w]
        if profile:
            report["profile"] = {p.name: p.profile(min(cfg.runs, 50)) if p.profile else {} for p in prepared}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if json_out:
        write_json_atomic(json_out, report)
    return report
