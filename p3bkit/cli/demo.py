"""`p3bkit demo`: the whole pipeline on the embedded digits set."""

from __future__ import annotations

import click

from p3bkit.cli.options import boundary


@click.command()
@click.option(
    "--keep",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="Keep ratio of all parameters, (0, 1).",
)
@click.option("-o", "--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write into a non-empty OUT that is not an earlier demo's.")
@click.option("--resume/--no-resume", default=False, show_default=True, help="Continue an interrupted demo in OUT.")
@click.option(
    "--target-speedup",
    type=click.FloatRange(min=1, min_open=True),
    help="Prune to a latency budget (this speedup on the fastest CPU runtime here) instead of --keep.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@boundary
def demo(keep, out, seed, force, resume, target_speedup, progress) -> None:
    """Train a tiny ViT on digits, prune it with P3B, fine-tune, export, compare speed (a few minutes on CPU)."""
    from p3bkit.demo import format_table, run_demo

    click.echo(
        format_table(
            run_demo(
                out, keep=keep, seed=seed, force=force, resume=resume, progress=progress, target_speedup=target_speedup
            )
        )
    )
    click.echo(f"everything is under {out}")
