"""Bench results and how they are reported: statistics, warnings, the comparison table, JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from p3bkit.backends.timing import BenchConfig, machine_info


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


NOISY_P90 = 1.5  # p90 above 1.5× the median: something else was competing for the machine


def timing_warnings(results: list[BenchResult], archs: list[str | None]) -> list[str]:
    """What makes a comparison untrustworthy: noisy timings, mixed backends, different models."""
    out = [
        f"timing of {r.name} is noisy (p90 {r.stats['p90_ms']:.3f} ms vs median {r.stats['median_ms']:.3f} ms): "
        "run the benchmark alone, with more --runs"
        for r in results
        if r.stats["p90_ms"] > NOISY_P90 * r.stats["median_ms"]
    ]
    backends = sorted({r.backend for r in results})
    if len(backends) > 1:
        out.append(f"the models run on different backends ({', '.join(backends)}): speedups mix model and runtime")
    names = sorted({a for a in archs if a})
    if len(names) > 1:
        out.append(f"the models are different architectures ({', '.join(names)}): speedups are not pruning speedups")
    return out


def compare_table(results: list[BenchResult]) -> str:
    """Markdown: latency, images/s, speedup vs the first, FLOP ratio (ideal) and measured/ideal.

    With dense baselines (several runtimes of the dense model) it adds the speedup against the
    fastest of them; with a latency table, the table's predicted ms. A FLOP ratio that cannot be
    computed (an artefact whose source model is not here) is shown as "–".
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
        ideal = base.flops / r.flops if base.flops and r.flops else None
        row = (
            f"| {r.name} | {r.backend} | {r.precision or 'fp32'} | {r.batch} | {r.stats['median_ms']:.3f} | "
            f"{r.stats['p90_ms']:.3f} | {r.stats['images_per_s']:.1f} | {speed:.2f}× | "
            + (f"{ideal:.2f}× | {speed / ideal:.2f} |" if ideal else "– | – |")
        )
        if fastest:
            row += f" {fastest.stats['median_ms'] / r.stats['median_ms']:.2f}× |"
        if predicted:
            row += f" {r.predicted_ms:.3f} |" if r.predicted_ms is not None else " |"
        rows.append(row)
    return "\n".join(rows)


def results_json(results: list[BenchResult], cfg: BenchConfig, extra: dict | None = None) -> dict:
    return {
        "machine": machine_info(cfg.threads),
        "config": asdict(cfg),
        **(extra or {}),
        "results": [asdict(r) for r in results],
    }
