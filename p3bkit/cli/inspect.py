"""`p3bkit info`: parameters, FLOPs, both pruning rates and per-branch widths of a model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from p3bkit.cli.options import boundary


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@boundary
def info(model, as_json) -> None:
    """Parameters, FLOPs, pruning rates, per-branch widths, heads and removed branches of a model."""
    from p3bkit.models.arch import ARCH_FILE, create_stock_model, read_arch
    from p3bkit.models.factory import create_model
    from p3bkit.models.report import describe, pruning_rates

    net = create_model(model)
    d = describe(net)
    if (Path(model) / ARCH_FILE).is_file():  # a pruned folder: rates against its dense source
        d["rates"] = pruning_rates(net, create_stock_model(read_arch(model).source))
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(f"{model}: {d['params']:,} parameters, {d['flops'] / 1e9:.3f} GFLOPs (multiply-adds, per image)")
    if "rates" in d:
        r = d["rates"]
        click.echo(
            f"pruned {100 * r['prune_rate_total']:.1f}% of all parameters ({r['dense_params']:,} → "
            f"{r['params']:,}) and {100 * r['prune_rate_blocks']:.1f}% of block parameters "
            f"({r['dense_block_params']:,} → {r['block_params']:,})"
        )
    removed = sum(r["removed"] for r in d["blocks"])
    if removed:
        click.echo(f"{removed} of {len(d['blocks'])} branches removed (identity residuals)")
    click.echo(f"{'branch':>9} {'heads':>6} {'c_in':>6} {'inner':>6} {'c_out':>6} {'params':>10}")
    for r in d["blocks"]:
        if r["removed"]:
            click.echo(f"{r['block']:>9} {'removed':>38}")
            continue
        heads = r["heads"] if r["block"].endswith("attn") else "-"
        click.echo(f"{r['block']:>9} {heads:>6} {r['c_in']:>6} {r['inner']:>6} {r['c_out']:>6} {r['params']:>10,}")
