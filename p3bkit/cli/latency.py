"""`p3bkit latency-table`: what each branch width costs on the runtime you deploy to."""

from __future__ import annotations

import click

from p3bkit.backends import default_table_backend, runtimes
from p3bkit.cli.options import DEVICE, POSITIVE, architecture_options, boundary, parse_model_kwargs


@click.command("latency-table")
@click.argument("model")
@architecture_options
@click.option(
    "--backend",
    type=click.Choice(runtimes()),
    default=default_table_backend,
    show_default="the fastest CPU runtime installed",
    help="The runtime the pruned model will run on.",
)
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--batch-size", "--batch", "batch", type=POSITIVE, default=1, show_default=True)
@click.option("--threads", type=POSITIVE, help="Runtime threads [all cores].")
@click.option("--head-dim-step", type=POSITIVE, default=4, show_default=True, help="Grid step over head dims.")
@click.option("--hidden-step", type=POSITIVE, default=32, show_default=True, help="Grid step over MLP hidden units.")
@click.option(
    "--heads",
    type=click.Choice(["full", "all"]),
    default="all",
    show_default=True,
    help="all: every head count 1..H (what --structure heads needs); full: the model's head count only.",
)
@click.option("--runs", type=POSITIVE, default=25, show_default=True, help="Timed runs per graph and pass.")
@click.option(
    "--calibration",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    help="Whole random pruned models the branch costs are fitted to.",
)
@click.option(
    "--check",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Then time this many other random pruned models and report the prediction error (stored in the "
    "table; prune refuses a table whose median error is above 15%).",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing table file.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Table file (.json).")
@boundary
def latency_table(
    model,
    backend,
    device,
    batch,
    threads,
    head_dim_step,
    hidden_step,
    heads,
    runs,
    calibration,
    check,
    progress,
    force,
    out,
    **kw,
) -> None:
    """Measure a latency table of MODEL (a timm name, preset or dense folder; random weights) on this machine."""
    from p3bkit.latency.job import run_latency_table
    from p3bkit.latency.table import MAX_CHECK_ERROR

    cfg_kw = dict(
        backend=backend,
        device=device,
        batch=batch,
        threads=threads,
        head_dim_step=head_dim_step,
        hidden_step=hidden_step,
        heads=heads,
        runs=runs,
        calibration=calibration,
        progress=progress,
    )
    from p3bkit.backends import describe_cpu

    table, errors = run_latency_table(model, out, cfg_kw, check, parse_model_kwargs(kw), force)
    click.echo(
        f"{table.model} on {backend} ({describe_cpu(table.machine)}, {table.threads} threads, batch {batch}): "
        f"dense {table.dense_ms:.3f} ms measured, {table.predict():.3f} ms predicted; "
        f"branch-free {table.fixed_ms:.3f} ms"
    )
    if errors:
        import numpy as np

        e = np.abs(np.asarray(errors)) * 100
        click.echo(f"prediction error on {len(e)} random pruned models: median {np.median(e):.1f}%, max {e.max():.1f}%")
        if (table.check_error or 0.0) > MAX_CHECK_ERROR:
            click.echo(
                f"warning: a median prediction error of {np.median(e):.1f}% (> {100 * MAX_CHECK_ERROR:.0f}%) "
                "makes latency budgets from this table unreliable: measure it again on an idle machine with "
                "more --runs and --calibration; prune refuses it unless given --accept-table-error",
                err=True,
            )
    click.echo(f"latency table: {out}")
