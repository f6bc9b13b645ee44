"""`p3bkit bench`: models timed interleaved in one process, on any registered backend.

Speedups are relative to the first model (the dense baseline); `dense_baselines` also times it on
every CPU runtime here and adds each model's speedup against the fastest; a latency table adds
its prediction. The timing itself is the one harness (`p3bkit.backends.timing`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from p3bkit.backends import backend_for_artefact
from p3bkit.backends.timing import DEVICE_PRESETS, BenchConfig, latency_stats, time_interleaved
from p3bkit.bench.report import BenchResult, compare_table, results_json, timing_warnings
from p3bkit.errors import P3BError, first_line
from p3bkit.fileio import write_json_atomic

# written into every report: how the numbers were taken
PROTOCOL = (
    "all models in one process, timed round-robin in blocks with untimed lead-in runs; onnxruntime "
    "intra-op threads do not spin (session.intra_op.allow_spinning=0); models bench exports itself have "
    "a fixed batch axis (the batch timed); median latency"
)

__all__ = ["BenchConfig", "BenchResult", "compare_table", "run_bench"]


def _flops(ref: str, notes: list[str]) -> int | None:
    """FLOPs of the model behind `ref`; None (and a note why) when it cannot be rebuilt here."""
    from p3bkit.models.factory import create_model
    from p3bkit.models.report import describe

    try:
        return describe(create_model(ref))["flops"]
    except Exception as exc:  # e.g. an artefact without its export record: its source is unknown
        notes.append(f"no FLOP ratio for {ref}: {type(exc).__name__}: {first_line(exc)}")
        return None


def _architecture(ref: str) -> str | None:
    """The timm architecture behind a model reference (None for artefacts it cannot tell)."""
    from p3bkit.models.factory import source_of

    source = source_of(ref)
    return source.name if source else None


def _layers(ref: str) -> list[dict] | None:
    """Pruned layers behind a model reference (a pruned folder or an artefact exported from one)."""
    from p3bkit.export.records import exported_from
    from p3bkit.models.arch import ARCH_FILE, read_arch

    ref = exported_from(ref)
    return read_arch(ref).layers if (Path(ref) / ARCH_FILE).is_file() else None


def _predictions(timed, results, table_path: str, threads: int | None) -> None:
    """The latency table's prediction for every model run on the table's runtime (batch)."""
    from p3bkit.backends import machine_info
    from p3bkit.latency.table import LatencyTable

    table = LatencyTable.load(table_path)
    table.check_machine(machine_info(threads))
    for t, r in zip(timed, results):
        if t.runtime == table.backend and r.batch == table.batch:
            try:
                r.predicted_ms = table.predict(_layers(t.source or t.name))
            except P3BError:  # another model, or one the table does not model (--structure full): no column value
                r.predicted_ms = None


def run_bench(
    refs: list[str],
    backend: str | None = None,
    device: str = "cpu",
    batch: int | None = None,
    precision: str | None = None,
    cfg: BenchConfig | None = None,
    profile: bool = False,
    json_out: str | None = None,
    compile: bool = False,
    dense_baselines: bool = False,
    latency_table: str | list[str] | None = None,
) -> dict:
    """Benchmark models interleaved; returns the JSON-able report (also written to `json_out`).

    `device`: cpu (batch 1) or cuda[:N] / gpu (batch 1024, the paper's protocol) unless `batch`.
    `dense_baselines`: also time the first model (the dense one) on every CPU runtime here, and
    report each model's speedup against the fastest. `latency_table`: add the prediction of the
    table (or tables, one per runtime) for the models run on its runtime.
    """
    from p3bkit.bench.prepare import dense_baselines as baselines_of
    from p3bkit.bench.prepare import dynamic_batch_note, prepare

    cfg = cfg or BenchConfig()
    device = "cuda" if device == "gpu" else device
    preset = DEVICE_PRESETS["gpu" if device.startswith("cuda") else "cpu"]
    batch = batch or preset["batch"]
    if dense_baselines and device != "cpu":
        raise P3BError("--dense-baselines compares CPU runtimes: use --device cpu")
    workdir = Path(tempfile.mkdtemp(prefix="p3bkit-bench-"))
    notes: list[str] = []
    try:  # models exported on the fly live in workdir only while they are measured
        timed = [prepare(r, backend, batch, device, precision, cfg.threads, workdir, compile) for r in refs]
        if dense_baselines or any(backend_for_artefact(t.name) is None for t in timed):  # bench exported some
            notes += [n for n in (dynamic_batch_note(t.name, batch) for t in timed) if n]
        extra = (
            baselines_of(timed[0].source or refs[0], batch, cfg.threads, workdir, timed[0].backend)
            if dense_baselines
            else []
        )
        lat = time_interleaved(timed + extra, cfg)
        results = [
            BenchResult(
                t.name,
                t.backend,
                batch,
                ms,
                latency_stats(ms, batch),
                _flops(t.source or t.name, notes),
                t.precision,
                baseline=i >= len(timed) or (dense_baselines and i == 0),
            )
            for i, (t, ms) in enumerate(zip(timed + extra, lat))
        ]
        for table in [latency_table] if isinstance(latency_table, str) else latency_table or []:
            _predictions(timed + extra, results, table, cfg.threads)
        report = results_json(
            results, cfg, {"device": device, "precision": precision or "as exported", "protocol": PROTOCOL}
        )
        for r, t in zip(report["results"], timed + extra):
            r["runtime"] = t.runtime
        report["table"] = compare_table(results)
        n = len(timed)  # the dense baselines are other runtimes on purpose: only their noise is worth a warning
        report["warnings"] = (
            timing_warnings(results[:n], [_architecture(t.source or t.name) for t in timed])
            + [w for w in timing_warnings(results[n:], []) if "noisy" in w]
            + notes
        )
        if profile:
            report["profile"] = {t.name: t.profile(min(cfg.runs, 50)) if t.profile else {} for t in timed}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if json_out:
        write_json_atomic(json_out, report)
    return report
