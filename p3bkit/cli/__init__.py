"""The `p3bkit` command line: parses, calls one library function per command, prints.

One module per command group (`prune`, `train`, `export`, `bench`, `latency`, `inspect`, `demo`),
shared option types and the one error boundary in `options`: a `P3BError` becomes `error: ...`
on stderr and exit code 1 (`p3bkit --debug ...` shows its traceback instead).
"""

from __future__ import annotations

import click

from p3bkit.cli.bench import bench, doctor
from p3bkit.cli.demo import demo
from p3bkit.cli.export import eval_, export
from p3bkit.cli.inspect import info
from p3bkit.cli.latency import latency_table
from p3bkit.cli.prune import analyze, prune
from p3bkit.cli.train import finetune, train


@click.group()
@click.version_option(package_name="p3bkit")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Prune timm Vision Transformers with P3B, export them, benchmark them."""
    ctx.obj = {"debug": debug}


for command in (prune, finetune, demo, info, export, doctor, bench, analyze, latency_table, train, eval_):
    main.add_command(command)

__all__ = ["main"]
