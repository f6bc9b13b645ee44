"""The training commands besides pruning: `train` (a dense model, e.g. a pretrained DeiT on your
classes → a model folder that `prune --model` takes) and `finetune` (a pruned folder → the DeiT
recipe → a fine-tuned folder, distilling from the dense model it was pruned from by default:
`train.distill`). Both run through the run skeleton (`train.run`): output-folder
rules, checkpoints every epoch and on SIGTERM/SIGINT, resume with the same settings only.
"""

from __future__ import annotations

from pathlib import Path

from p3bkit.console import notify
from p3bkit.data.datasets import check_batch
from p3bkit.errors import P3BError
from p3bkit.fileio import write_json_atomic
from p3bkit.train.dist import init_distributed, require_device
from p3bkit.train.distill import AUTO, KD_TEMPERATURE, KD_WEIGHT, NONE, check_kd_settings, choose_teacher
from p3bkit.train.recipes import choose_recipe, learning_rate, warmup_epochs
from p3bkit.train.run import CHECKPOINT, Checkpoints, RunFolder


def _plan(command: str, rate, cfg, bundle) -> str:
    """The line a training command prints at start: what it trains with."""
    kd = (
        f", distilling from the dense model (weight {cfg.kd_weight:g}, temperature {cfg.kd_temperature:g})"
        if cfg.teacher is not None
        else ""
    )
    return (
        f"{command}: {cfg.epochs} epochs at batch {cfg.batch_size}, AdamW {rate}, warm-up {cfg.warmup_epochs} "
        f"epoch(s) then cosine, {'Mixup/CutMix' if bundle.mixup is not None else 'label smoothing 0.1'}{kd}"
    )


def _say_all(say, notes: list[str]) -> None:
    for note in notes if say else ():
        say(note)


def _add_drop_path(model, drop_path: float) -> list:
    """Stochastic depth on every pruned branch, linearly increasing with depth; returns the branches."""
    import torch.nn as nn
    from timm.layers import DropPath

    from p3bkit.models.pruned import PrunedBranch

    branches = [m for m in model.modules() if isinstance(m, PrunedBranch)]
    for i, br in enumerate(branches):
        rate = drop_path * i / max(len(branches) - 1, 1)
        br.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
    return branches


def run_finetune(
    pruned: str,
    out: str,
    data: str | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float | None = None,
    drop_path: float = 0.1,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    resume: bool = False,
    keep_checkpoint: bool = False,
    augment: str = "auto",
    recipe: str = "auto",
    workers: int = 0,
    teacher: str = NONE,
    kd_weight: float = KD_WEIGHT,
    kd_temperature: float = KD_TEMPERATURE,
) -> dict:
    """Fine-tune a pruned folder (AdamW, warm-up + cosine, label smoothing or Mixup/CutMix with
    `--augment deit`, stochastic depth) and save it to `out`. `lr` is a base lr at batch 512
    (scaled by batch/512); None takes the recipe's (`train.recipes`: `auto` is `finetune` here).
    `teacher`: distil from a dense model (`train.distill`: `auto` is the one it was pruned from,
    when recorded and here; `none`; or a dense model folder or weights file) with weight
    `kd_weight` and temperature `kd_temperature`."""
    import torch.nn as nn

    from p3bkit.data import load_data_for
    from p3bkit.models import load
    from p3bkit.train.fit import FitConfig, fit

    if epochs < 1 or batch_size < 1:
        raise P3BError(f"fine-tuning needs epochs ≥ 1 and batch size ≥ 1 (got {epochs} and {batch_size})")
    check_kd_settings(kd_weight, kd_temperature)
    require_device(device)
    folder = RunFolder(Path(out), "finetune", "finetune.json")
    resuming = folder.open((pruned, *([teacher] if teacher not in (AUTO, NONE) else [])), resume, force)
    ctx = init_distributed(device)
    model = load(pruned)
    branches = _add_drop_path(model, drop_path)
    from p3bkit.models.presets import default_data
    from p3bkit.models.source import model_source

    say = notify if ctx.main else None
    notes: list[str] = []  # printed once the data passed its checks: a refusal stays one line
    dense, distill = choose_teacher(teacher, pruned, kd_weight, kd_temperature, notes.append)
    bundle = load_data_for(
        model,
        data or default_data(model_source(model, fallback="arch"), notes.append),
        augment,
        pretrained=True,
        say=notes.append,
    )
    check_batch(bundle, batch_size, ctx.world, bundle.mixup is not None)
    _say_all(say, notes)
    rate = learning_rate(choose_recipe(recipe, weights_loaded=True), batch_size, lr)
    cfg = FitConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=rate.value,
        seed=seed,
        device=device,
        progress=progress,
        warmup_epochs=warmup_epochs(epochs),
        watch_loss=False,
        workers=workers,
        teacher=dense,
        kd_weight=kd_weight,
        kd_temperature=kd_temperature,
    )
    if say:
        say(_plan("finetune", rate, cfg, bundle))
    settings = {
        "source": str(Path(pruned).resolve()),
        "data": data,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": rate.value,
        "drop_path": drop_path,
        "seed": seed,
        "augment": augment,
        "world": ctx.world,
        "distillation": distill,
    }
    with folder.writing(resuming, ctx):
        history = fit(
            model,
            bundle,
            cfg,
            desc="finetune",
            ctx=ctx,
            checkpoints=Checkpoints(folder.path / CHECKPOINT, settings, ctx),
            resume=resuming,
        )
        for br in branches:
            br.drop_path = nn.Identity()
        summary = {
            "source": str(pruned),
            "history": history,
            "val_acc": history[-1]["val_acc"] if history else None,
            "world": ctx.world,
            "distillation": distill,
        }
        return _write(model, folder, "finetune.json", summary, keep_checkpoint, ctx)


def run_train(
    model: str,
    out: str,
    data: str | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float | None = None,
    model_kwargs: dict | None = None,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    weights: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    resume: bool = False,
    keep_checkpoint: bool = False,
    augment: str = "auto",
    recipe: str = "auto",
    workers: int = 0,
) -> dict:
    """Train or fine-tune a dense model (e.g. an ImageNet DeiT on your classes) into a model folder
    (a dense `arch.json` + `model.safetensors` that `p3bkit prune --model` takes). `lr` is a base
    lr at batch 512 (scaled by batch/512); None takes the recipe's (`train.recipes`: `auto` trains
    from scratch unless weights are loaded)."""
    from p3bkit.data import load_data_for
    from p3bkit.models.factory import build_user_model, loads_weights
    from p3bkit.train.fit import FitConfig, fit, seed_everything

    require_device(device)
    folder = RunFolder(Path(out), "train", "train.json")
    resuming = folder.open((model, data or ""), resume, force)
    ctx = init_distributed(device)
    seed_everything(seed)  # the initialisation of whatever is not loaded (e.g. a new classifier)
    say = notify if ctx.main else None
    net = build_user_model(model, pretrained, pretrained_file, weights, model_kwargs or {}, say)
    from p3bkit.models.presets import default_data
    from p3bkit.models.source import model_source

    loaded = loads_weights(model, pretrained, pretrained_file, weights)
    notes: list[str] = []  # printed once the data passed its checks: a refusal stays one line
    bundle = load_data_for(
        net, data or default_data(model_source(net, fallback="arch"), notes.append), augment, loaded, notes.append
    )
    check_batch(bundle, batch_size, ctx.world, bundle.mixup is not None)
    _say_all(say, notes)
    rate = learning_rate(choose_recipe(recipe, loaded), batch_size, lr)
    cfg = FitConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=rate.value,
        seed=seed,
        device=device,
        progress=progress,
        warmup_epochs=warmup_epochs(epochs),
        workers=workers,
    )
    if say:
        say(_plan("train", rate, cfg, bundle))
    settings = {
        "model": model,
        "kwargs": model_kwargs or {},
        "pretrained": pretrained,
        "pretrained_file": pretrained_file,
        "weights": weights,
        "data": data,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": rate.value,
        "seed": seed,
        "augment": augment,
        "world": ctx.world,
    }
    with folder.writing(resuming, ctx):
        history = fit(
            net,
            bundle,
            cfg,
            desc="train",
            ctx=ctx,
            checkpoints=Checkpoints(folder.path / CHECKPOINT, settings, ctx),
            resume=resuming,
        )
        summary = {"model": model, "history": history, "val_acc": history[-1]["val_acc"], "world": ctx.world}
        return _write(net, folder, "train.json", summary, keep_checkpoint, ctx)


def _write(model, folder: RunFolder, record: str, summary: dict, keep_checkpoint: bool, ctx) -> dict:
    """Save the model folder and its JSON record (rank 0), then drop the checkpoint unless kept."""
    from p3bkit.models import save

    if ctx.main:
        save(model, folder.path, overwrite=True)  # the run's own folder
        write_json_atomic(folder.path / record, summary)
    folder.finish(keep_checkpoint, ctx)
    return summary
