"""`p3bkit train` and `p3bkit finetune`: dense training on your data before pruning, fine-tuning after."""

from __future__ import annotations

import click

from p3bkit.cli.options import (
    DEVICE,
    POSITIVE,
    augment_option,
    boundary,
    data_option,
    distill_options,
    model_options,
    parse_model_kwargs,
    train_recipe_options,
    workers_option,
)
from p3bkit.train.distill import NONE


@click.command()
@click.option("--model", required=True, help="Preset or timm model name.")
@model_options
@data_option
@augment_option
@click.option("--epochs", type=POSITIVE, default=10, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@train_recipe_options
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@workers_option
@click.option("--force", is_flag=True, help="Write into a non-empty OUT (keeps files it did not write).")
@click.option("--resume/--no-resume", default=False, show_default=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--keep-checkpoint", is_flag=True, help="Keep OUT/checkpoint.pt after a successful run.")
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress bars (the per-epoch lines are printed either way).",
)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty).")
@boundary
def train(**kw) -> None:
    """Train a dense model on your data (e.g. a pretrained DeiT on your classes) before pruning it."""
    from p3bkit.train.jobs import run_train

    s = run_train(
        kw["model"],
        kw["out"],
        data=kw["data"],
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        model_kwargs=parse_model_kwargs(kw),
        pretrained=kw["pretrained"],
        pretrained_file=kw["pretrained_file"],
        weights=kw["weights"],
        device=kw["device"],
        seed=kw["seed"],
        progress=kw["progress"],
        force=kw["force"],
        resume=kw["resume"],
        keep_checkpoint=kw["keep_checkpoint"],
        augment=kw["augment"],
        recipe=kw["recipe"],
        workers=kw["workers"],
    )
    click.echo(f"trained model: {kw['out']} (val top-1 {s['val_acc']:.2f}%); prune it with --model {kw['out']}")


@click.command()
@click.argument("pruned", type=click.Path(exists=True, file_okay=False))
@data_option
@augment_option
@click.option("--epochs", type=POSITIVE, default=10, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@train_recipe_options
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@distill_options("finetune", NONE)
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@workers_option
@click.option("--force", is_flag=True, help="Write into a non-empty OUT (keeps files it did not write).")
@click.option(
    "--resume/--no-resume",
    default=False,
    show_default=True,
    help="Continue from OUT/checkpoint.pt (same settings as the interrupted run).",
)
@click.option("--keep-checkpoint", is_flag=True, help="Keep OUT/checkpoint.pt after a successful run.")
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress bars (the per-epoch lines are printed either way).",
)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty).")
@boundary
def finetune(
    pruned,
    data,
    augment,
    epochs,
    batch_size,
    recipe,
    lr,
    drop_path,
    teacher,
    kd_weight,
    kd_temperature,
    device,
    seed,
    workers,
    force,
    resume,
    keep_checkpoint,
    progress,
    out,
) -> None:
    """Fine-tune a pruned model: AdamW, warm-up + cosine, label smoothing (Mixup/CutMix with --augment deit),
    stochastic depth, distilling from the dense model it was pruned from; the settings, the augmentation and
    the teacher chosen are printed at start."""
    from p3bkit.train.jobs import run_finetune

    s = run_finetune(
        pruned,
        out,
        data=data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        drop_path=drop_path,
        device=device,
        seed=seed,
        force=force,
        resume=resume,
        keep_checkpoint=keep_checkpoint,
        progress=progress,
        augment=augment,
        recipe=recipe,
        workers=workers,
        teacher=teacher,
        kd_weight=kd_weight,
        kd_temperature=kd_temperature,
    )
    click.echo(f"fine-tuned model: {out} (val top-1 {s['val_acc']:.2f}%)")
