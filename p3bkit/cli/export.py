"""`p3bkit export` and `p3bkit eval`: an artefact for your runtime, verified, and its accuracy through it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from p3bkit.backends import BF16, FP16, FP32, INT8, PRECISIONS, formats, get_backend, runtimes
from p3bkit.cli.options import DEVICE, POSITIVE, boundary, data_option


@click.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(formats()), required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--precision",
    help=f"{'|'.join(PRECISIONS)} (a runtime's own name such as f32 works too); what each format takes: p3bkit doctor.",
)
@click.option("--fp16", is_flag=True, help="Shorthand for --precision fp16.")
@click.option("--bf16", is_flag=True, help="Shorthand for --precision bf16.")
@click.option("--calib-data", help="INT8: calibration images (digits, ImageFolder or CIFAR-100 folder; train split).")
@click.option("--calib-size", type=POSITIVE, default=300, show_default=True, help="INT8: calibration images used.")
@click.option(
    "--gate-data",
    "--val-data",
    "val_data",
    help="INT8 gate only: the data whose validation split the gate measures top-1 on [--calib-data's].",
)
@click.option(
    "--val-size",
    type=POSITIVE,
    default=2000,
    show_default=True,
    help="INT8 gate: validation images used (a seeded random subset of a larger split).",
)
@click.option(
    "--max-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="INT8 gate: largest top-1 drop (points) vs fp32 through the runtime; above it (after the "
    "runtime's remedies) the export fails and writes nothing.",
)
@click.option(
    "--static-batch",
    type=POSITIVE,
    help="Fixed batch size instead of a dynamic batch axis: for a deployment at one batch size (CPU "
    "runtimes fold the shape arithmetic away; bench exports models this way for the batch it times).",
)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Parity check against PyTorch.")
@click.option("--write-op", type=click.Choice(["scatter", "gather"]), help="Residual write op (default per format).")
@click.option("--min-batch", type=POSITIVE, default=1, show_default=True, help="TensorRT profile.")
@click.option("--opt-batch", type=POSITIVE, default=1024, show_default=True, help="TensorRT profile.")
@click.option("--max-batch", type=POSITIVE, default=1024, show_default=True, help="TensorRT profile.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read + updated).")
@click.option(
    "--eval-data",
    help="After export: top-1 of the artefact through its runtime on this data's validation "
    "split, stored in the record (any precision).",
)
@click.option(
    "--force", is_flag=True, help="Write into a non-empty OUT (replaces this export's own files, keeps others)."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@boundary
def export(
    model,
    fmt,
    out,
    precision,
    fp16,
    bf16,
    calib_data,
    calib_size,
    val_data,
    val_size,
    max_drop,
    static_batch,
    verify,
    write_op,
    min_batch,
    opt_batch,
    max_batch,
    timing_cache,
    eval_data,
    force,
    progress,
) -> None:
    """Export MODEL (pruned folder, timm name or preset) and verify it against PyTorch."""
    from p3bkit.export import export_model
    from p3bkit.export.int8 import Int8Config

    if fp16 and bf16:
        raise click.UsageError("--fp16 and --bf16 are exclusive")
    if fp16 or bf16:
        if precision:
            raise click.UsageError("give --precision or --fp16/--bf16, not both")
        precision = FP16 if fp16 else BF16
    if (val_data or calib_data) and get_backend(fmt).precision(precision) != INT8:
        raise click.UsageError("--calib-data/--gate-data are for --precision int8")
    int8 = Int8Config(calib_data, calib_size, val_data, max_drop, val_size) if calib_data else None
    rec = export_model(
        model,
        fmt,
        out,
        precision=precision,
        static_batch=static_batch,
        verify=verify,
        write_op=write_op,
        trt_profile=(min_batch, opt_batch, max_batch),
        timing_cache=timing_cache,
        int8=int8,
        force=force,
    )
    worst = max((s["max_abs_diff"] for b in rec.parity.values() for s in b.values()), default=None)
    parity = f"max abs diff vs torch {worst:.2e}" if verify and worst is not None else "not verified against torch"
    if verify and rec.precision != FP32:
        stats = [s for b in rec.parity.values() for s in b.values()]
        agree = [s["top1_agreement"] for s in stats if s.get("top1_agreement") is not None]
        top1 = (
            f"top-1 agreement {min(agree):.3f} on {sum(s.get('confident_images', 0) for s in stats)} confident images"
            if agree
            else "no image with a confident top-1 (judged by cosine)"
        )
        parity = (
            f"vs torch on {rec.parity_inputs}: {top1}, "
            f"cosine mean {min(s.get('cosine_mean', 1.0) for s in stats):.4f} / worst "
            f"{min(s['cosine_min'] for s in stats):.4f}"
        )
    click.echo(
        f"wrote {', '.join(str(Path(out) / f) for f in rec.files)} ({rec.precision}, {rec.seconds:.1f} s); {parity}"
    )
    gate = rec.extra.get("int8")
    if gate and gate["val_classes"] != gate["model_classes"]:
        click.echo(
            f"warning: {gate['val_data']} has {gate['val_classes']} classes and the model "
            f"{gate['model_classes']}: the accuracy gate compares near-chance top-1s",
            err=True,
        )
    if gate:
        kept = f"; kept in fp32: {', '.join(gate['kept_in_fp32'])}" if gate["kept_in_fp32"] else ""
        calibrated = f"calibrated on {gate['calib_size']} images of {gate['calib_data']}{kept}"
        if gate["gated"]:
            click.echo(
                f"INT8 gate: top-1 {gate['int8_top1']:.2f}% vs fp32 {gate['fp32_top1']:.2f}% (drop "
                f"{gate['drop']:.2f} ≤ {gate['max_drop']:g}) on {gate['val_images']} images; {calibrated}"
            )
        else:
            click.echo(
                f"INT8 gate: not applied ({gate['not_gated_because']}; give --gate-data with labelled "
                f"images to gate accuracy); {calibrated}",
                err=True,
            )
        if gate["gated"] and gate["top1_step"] > gate["max_drop"]:
            click.echo(
                f"warning: one changed prediction on the gate's {gate['val_images']} images moves top-1 by "
                f"{gate['top1_step']:.2f} points, more than --max-drop {gate['max_drop']:g}: the gate allows "
                "no change at all (raise --val-size or use a larger --gate-data)",
                err=True,
            )
        for line in profile_lines(gate.get("op_profile") or {}, rec.format):
            click.echo(line)
    if eval_data:
        from p3bkit.export.accuracy import record_accuracy

        acc = record_accuracy(Path(out) / rec.files[0], eval_data, progress=progress)
        click.echo(f"top-1 {acc['top1']:.2f}% on {acc['images']} validation images of {eval_data} (in the record)")


def profile_lines(prof: dict, fmt: str) -> list[str]:
    """The INT8 export's per-op table: where the time goes in the fp32 graph and in the INT8 artefact
    (top 10 each, the kernel in brackets says which precision an op ran at)."""
    if not prof.get("int8"):
        return []
    f, q = list(prof["fp32"].items()), list(prof["int8"].items())
    lines = [
        f"time per op type, {prof.get('runtime', fmt)} profiler, {prof['runs']} runs: fp32 {prof['fp32_total_ms']:.2f} ms, INT8 "
        f"{prof['int8_total_ms']:.2f} ms ({prof['fp32_total_ms'] / max(prof['int8_total_ms'], 1e-9):.2f}×)",
        "| fp32 graph: op (kernel) | ms | INT8: op (kernel) | ms |",
        "|---|---|---|---|",
    ]
    for i in range(max(len(f), len(q))):
        a, b = f[i] if i < len(f) else ("", None), q[i] if i < len(q) else ("", None)
        lines.append(
            f"| {a[0]} | {'' if a[1] is None else f'{a[1]:.3f}'} | {b[0]} | {'' if b[1] is None else f'{b[1]:.3f}'} |"
        )
    return lines


@click.command(name="eval")
@click.argument("model")
@data_option
@click.option("--backend", type=click.Choice(runtimes()), help="Default: from the artefact suffix, else torch.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--threads", type=POSITIVE)
@click.option("--device", type=DEVICE, help="Where torch models run [cpu]; artefacts run on their runtime's device.")
@click.option(
    "--precision",
    help="Run an artefact at another precision its runtime honours (e.g. an fp32 "
    "OpenVINO IR at bf16). Default: the artefact's own.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@boundary
def eval_(model, data, backend, batch_size, threads, device, precision, as_json, progress) -> None:
    """Top-1 / top-5 of a model or exported artefact on the validation images, through its runtime."""
    from p3bkit.export.accuracy import run_eval

    r = run_eval(model, data, backend, batch_size, threads, device, progress, precision)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    click.echo(
        f"{r['model']} ({r['backend']}, {r['precision']}): top-1 {r['top1']:.2f}%{top5} on {r['images']} images of {r['data']}"
    )
