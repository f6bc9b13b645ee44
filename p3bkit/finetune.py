"""The training jobs the CLI runs besides pruning: `finetune` (a pruned folder → the DeiT recipe →
a fine-tuned folder) and `train` (a dense model, e.g. a pretrained DeiT on your classes → a folder).

Like a prune run, it checkpoints every epoch and on SIGTERM/SIGINT, resumes only with the same
settings, never writes over its input and refuses a non-empty output folder without `--force`.
"""
from __future__ import annotations

import json
from pathlib import Path

from p3bkit.errors import P3BError
from p3bkit.fileio import check_output_folder, write_json_atomic
from p3bkit.models import save
from p3bkit.train.dist import barrier, init_distributed, require_device
from p3bkit.workflows import CHECKPOINT, notify


def _start(out: str, command: str, inputs: tuple, force: bool, resume: bool) -> tuple[Path, bool]:
    """Check the output folder; (checkpoint path, whether a checkpoint will be resumed)."""
    ck_path = Path(out) / CHECKPOINT
    resuming = resume and ck_path.is_file()
    if resume and not resuming:
        notify(f"note: no {CHECKPOINT} in {out}: starting from scratch")
    check_output_folder(out, command, inputs, force=force or resuming)
    return ck_path, resuming


def run_finetune(pruned: str, out: str, data: str = "digits", epochs: int = 10, batch_size: int = 64,
                 lr: float = 5e-4, drop_path: float = 0.1, device: str = "cpu", seed: int = 0,
                 progress: bool = True, force: bool = False, resume: bool = False,
                 keep_checkpoint: bool = False, augment: str = "auto") -> dict:
    """Fine-tune a pruned folder with the DeiT recipe (lr = base·batch/512) and save it to `out`.

    `out` must be new or empty (`force`: write into it, keeping other files), never the input.
    A checkpoint is written to `out` every epoch and on SIGTERM/SIGINT; `resume` continues from it
    (same settings only) to the same result; a finished run removes it unless `keep_checkpoint`.
    """
    import torch.nn as nn
    from timm.layers import DropPath

    from p3bkit.models import load
    from p3bkit.models.pruned import PrunedBranch
    from p3bkit.train.loop import Checkpointing, FitConfig, fit
    from p3bkit.workflows import data_for

    if epochs < 1 or batch_size < 1:
        raise P3BError(f"fine-tuning needs epochs ≥ 1 and batch size ≥ 1 (got {epochs} and {batch_size})")
    require_device(device)
    ck_path, resuming = _start(out, "finetune", (pruned,), force, resume)
    ctx = init_distributed(device)
    model = load(pruned)
    branches = [m for m in model.modules() if isinstance(m, PrunedBranch)]
    for i, br in enumerate(branches):  # stochastic depth, linearly increasing with depth
        rate = drop_path * i / max(len(branches) - 1, 1)
        br.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
    bundle = data_for(data, model, augment, pretrained=True, say=ctx.main)  # a pruned model was trained before
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr * batch_size / 512, seed=seed, device=device,
                    progress=progress, warmup_epochs=min(5, max(epochs // 10, 0)))
    settings = json.loads(json.dumps({"source": str(Path(pruned).resolve()), "data": data, "epochs": epochs,
                                      "batch_size": batch_size, "lr": lr, "drop_path": drop_path, "seed": seed, "augment": augment,
                                      "world": ctx.world}))
    if ctx.main:
        Path(out).mkdir(parents=True, exist_ok=True)
    history = fit(model, bundle, cfg, desc="finetune", ctx=ctx,
                  checkpointing=Checkpointing(ck_path, resuming, settings))
    for br in branches:
        br.drop_path = nn.Identity()
    summary = {"source": str(pruned), "history": history, "val_acc": history[-1]["val_acc"] if history else None,
               "world": ctx.world}
    return _write(model, out, "finetune.json", summary, keep_checkpoint, ctx)


def run_train(model: str, out: str, data: str = "digits", epochs: int = 10, batch_size: int = 64, lr: float = 5e-4,
              model_kwargs: dict | None = None, pretrained: bool = False, pretrained_file: str | None = None,
              checkpoint: str | None = None, device: str = "cpu", seed: int = 0, progress: bool = True,
              force: bool = False, resume: bool = False, keep_checkpoint: bool = False, augment: str = "auto") -> dict:
    """Train or fine-tune a dense model (e.g. an ImageNet DeiT on your classes) into a model folder.

    The folder is a dense `arch.json` + `model.safetensors` that `p3bkit prune --model` takes.
    Same output rules, checkpoints and resume as `run_finetune`.
    """
    from p3bkit.train.loop import Checkpointing, FitConfig, fit, seed_everything
    from p3bkit.workflows import build_model, data_for

    require_device(device)
    ck_path, resuming = _start(out, "train", tuple(p for p in (model, data) if Path(p).is_dir()), force, resume)
    ctx = init_distributed(device)
    seed_everything(seed)  # the initialisation of whatever is not loaded (e.g. a new classifier)
    net = build_model(model, pretrained, pretrained_file, checkpoint, model_kwargs or {}, ctx.main)
    bundle = data_for(data, net, augment, pretrained or pretrained_file is not None, ctx.main)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr * batch_size / 512, seed=seed, device=device,
                    progress=progress, warmup_epochs=min(5, max(epochs // 10, 0)))
    settings = json.loads(json.dumps({"model": model, "kwargs": model_kwargs or {}, "pretrained": pretrained,
                                      "pretrained_file": pretrained_file, "checkpoint": checkpoint, "data": data,
                                      "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "augment": augment,
                                      "world": ctx.world}))
    if ctx.main:
        Path(out).mkdir(parents=True, exist_ok=True)
    history = fit(net, bundle, cfg, desc="train", ctx=ctx, checkpointing=Checkpointing(ck_path, resuming, settings))
    summary = {"model": model, "history": history, "val_acc": history[-1]["val_acc"], "world": ctx.world}
    return _write(net, out, "train.json", summary, keep_checkpoint, ctx)


def _write(model, out: str, record: str, summary: dict, keep_checkpoint: bool, ctx) -> dict:
    """Save the model folder and its JSON record (rank 0), then drop the checkpoint unless kept."""
    if ctx.main:
        save(model, out)
        write_json_atomic(Path(out) / record, summary)
        if not keep_checkpoint:
            (Path(out) / CHECKPOINT).unlink(missing_ok=True)
    barrier(ctx)
    return summary
