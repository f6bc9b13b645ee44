"""`p3bkit train` and `p3bkit finetune`: dense training on your data before pruning, the DeiT recipe after."""
from __future__ import annotations

import click

from p3bkit.cli.options import DEVICE, POSITIVE, augment_option, boundary, model_options, parse_model_kwargs


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
    from p3bkit.train.jobs import run_train

    s = run_train(kw["model"], kw["out"], data=kw["data"], epochs=kw["epochs"], batch_size=kw["batch_size"],
                  lr=kw["lr"], model_kwargs=parse_model_kwargs(kw), pretrained=kw["pretrained"],
                  pretrained_file=kw["pretrained_file"], weights=kw["weights"], device=kw["device"],
                  seed=kw["seed"], progress=kw["progress"], force=kw["force"], resume=kw["resume"],
                  keep_checkpoint=kw["keep_checkpoint"], augment=kw["augment"])
    click.echo(f"trained model: {kw['out']} (val top-1 {s['val_acc']:.2f}%); prune it with --model {kw['out']}")


@click.command()
@click.argument("pruned", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default="digits", show_default=True)
@augment_option
@click.option("--epochs", type=POSITIVE, default=10, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="Base lr, scaled by batch/512 (DeiT).")
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write into a non-empty OUT (keeps files it did not write).")
@click.option("--resume/--no-resume", default=False, show_default=True,
              help="Continue from OUT/checkpoint.pt (same settings as the interrupted run).")
@click.option("--keep-checkpoint", is_flag=True, help="Keep OUT/checkpoint.pt after a successful run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty).")
@boundary
def finetune(pruned, data, augment, epochs, batch_size, lr, drop_path, device, seed, force, resume, keep_checkpoint,
             progress, out) -> None:
    """Fine-tune a pruned model (DeiT recipe: AdamW, cosine, label smoothing, Mixup/CutMix, drop path)."""
    from p3bkit.train.jobs import run_finetune

    s = run_finetune(pruned, out, data=data, epochs=epochs, batch_size=batch_size, lr=lr, drop_path=drop_path,
                     device=device, seed=seed, force=force, resume=resume, keep_checkpoint=keep_checkpoint,
                     progress=progress, augment=augment)
    click.echo(f"fine-tuned model: {out} (val top-1 {s['val_acc']:.2f}%)")
