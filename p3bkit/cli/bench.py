"""`p3bkit bench` and `p3bkit doctor`: speed on the runtimes here, and which runtimes are here."""

from __future__ import annotations

import click

from p3bkit.backends import PRECISIONS, runtimes
from p3bkit.cli.options import DEVICE, POSITIVE, boundary


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--backend", type=click.Choice(runtimes()), help="Default: from the artefact suffix, else torch.")
@click.option(
    "--device",
    type=DEVICE,
    default="cpu",
    show_default=True,
    help="cpu: batch 1; cuda (or gpu): batch 1024 (the paper's protocol).",
)
@click.option("--batch-size", "--batch", "batch", type=POSITIVE, help="Override the preset batch size.")
@click.option(
    "--precision",
    help=f"{'|'.join(PRECISIONS)}. Default: an artefact's own, fp32 for a model (which "
    "onnxruntime/OpenVINO export on the fly at this precision). Refused where a "
    "runner would ignore it.",
)
@click.option("--runs", type=POSITIVE, default=1000, show_default=True)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--threads", type=POSITIVE, help="CPU threads to pin (recorded in the JSON); not for GPU runs.")
@click.option(
    "--compile/--no-compile",
    default=False,
    show_default=True,
    help="torch.compile (the torch backend only; refused for others).",
)
@click.option("--profile", is_flag=True, help="Time per op type (ORT profiler, OpenVINO counters, torch profiler).")
@click.option(
    "--dense-baselines",
    is_flag=True,
    help="Also time the first model on every CPU runtime here (torch, onnxruntime plain and transformer-"
    "optimised, OpenVINO) and show each model's speedup against the fastest.",
)
@click.option(
    "--latency-table",
    type=click.Path(exists=True, dir_okay=False),
    help="Add this latency table's predicted ms (models on its runtime).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write raw latencies + machine info.")
@boundary
def bench(
    models,
    backend,
    device,
    batch,
    precision,
    runs,
    duration,
    warmup,
    threads,
    compile,
    profile,
    dense_baselines,
    latency_table,
    json_out,
) -> None:
    """Benchmark MODELS interleaved; speedups are relative to the first (the dense baseline)."""
    from p3bkit.bench import BenchConfig, run_bench

    if threads and device != "cpu":
        raise click.UsageError("--threads pins CPU threads; a GPU run does not take it")
    cfg = BenchConfig(runs=runs, duration=duration, warmup=warmup, threads=threads)
    report = run_bench(
        list(models), backend, device, batch, precision, cfg, profile, json_out, compile, dense_baselines, latency_table
    )
    from p3bkit.backends import describe_cpu

    m = report["machine"]
    click.echo(f"{describe_cpu(m)}, {m['threads']} threads{', ' + m['gpu'] if device != 'cpu' else ''}")
    click.echo(report["table"])
    for w in report["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if report.get("profile"):
        click.echo(
            "per-op times: ms per run, summed over every node of that op type (self time; runtimes run nodes "
            "in parallel threads and profiling adds overhead, so they can add up to more than the median)"
        )
    for name, ops in report.get("profile", {}).items():
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
        click.echo(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in top))


@click.command()
@boundary
def doctor() -> None:
    """Which backends are installed and usable here, with versions."""
    from p3bkit.backends import backend_status

    for row in backend_status():
        mark = "ok " if row["usable"] else "no "
        click.echo(
            f"{mark} {row['backend']:<12} {row['version']:<14} --format {row['format']:<9} "
            f"precisions {','.join(row['precisions']):<19} {row['note']}"
        )
