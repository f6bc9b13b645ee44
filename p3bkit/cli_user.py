"""`p3bkit train` and `p3bkit eval`: your own model on your own data, before pruning and after export."""
from __future__ import annotations

import json

import click

from p3bkit.cli_options import DEVICE, POSITIVE, augment_option, boundary, model_options, parse_model_kwargs
from p3bkit.exporters.registry import runtimes


@click.command()
@click.option("--model", required=True, help="Preset or timm model name.")
@model_options
@click.option("--data", default="digits", show_default=True, help="digits, synthetic, ImageFolder or CIFAR-100 folder.")
@augment_option
@click.option("--epochs", type=POSITIVE, default=10, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="Base lr, scaled by batch/512 (DeiT).")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write into a non-empty OUT (keeps files it did not write).")
@click.option("--resume/--no-resume", default=False, show_default=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--keep-checkpoint", is_flag=True, help="Keep OUT/checkpoint.pt after a successful run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty).")
@boundary
def train(**kw) -> None:
    """Train a dense model on your data (e.g. a pretrained DeiT on your classes) before pruning it."""
    from p3bkit.finetune import run_train

    s = run_train(kw["model"], kw["out"], data=kw["data"], epochs=kw["epochs"], batch_size=kw["batch_size"],
                  lr=kw["lr"], model_kwargs=parse_model_kwargs(kw), pretrained=kw["pretrained"],
                  pretrained_file=kw["pretrained_file"], checkpoint=kw["checkpoint"], device=kw["device"],
                  seed=kw["seed"], progress=kw["progress"], force=kw["force"], resume=kw["resume"],
                  keep_checkpoint=kw["keep_checkpoint"], augment=kw["augment"])
    click.echo(f"trained model: {kw['out']} (val top-1 {s['val_acc']:.2f}%); prune it with --model {kw['out']}")


@click.command(name="eval")
@click.argument("model")
@click.option("--data", default="digits", show_default=True, help="digits, ImageFolder or CIFAR-100 folder (val split).")
@click.option("--backend", type=click.Choice(runtimes()),
              help="Default: from the artefact suffix, else torch.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--threads", type=POSITIVE)
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="torch models only.")
@click.option("--precision", help="Run an artefact at another precision its runtime honours (e.g. an fp32 "
                                  "OpenVINO IR at bf16). Default: the artefact's own.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@boundary
def eval_(model, data, backend, batch_size, threads, device, precision, as_json, progress) -> None:
    """Top-1 / top-5 of a model or exported artefact on the validation images, through its runtime."""
    from p3bkit.evaluate import run_eval

    r = run_eval(model, data, backend, batch_size, threads, device, progress, precision)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    top5 = f", top-5 {r['top5']:.2f}%" if "top5" in r else ""
    click.echo(f"{r['model']} ({r['backend']}, {r['precision']}): top-1 {r['top1']:.2f}%{top5} on {r['images']} images of {r['data']}")
