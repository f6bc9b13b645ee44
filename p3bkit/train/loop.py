"""Plain supervised training and evaluation (dense pre-training and the DeiT-style fine-tune)."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from p3bkit.train.checkpoint import (
    Interrupted,
    check_resume_settings,
    gather_rng,
    install_stop_handlers,
    load_checkpoint,
    restore_handlers,
    save_checkpoint,
    set_rng_state,
    stop_requested,
)
from p3bkit.train.data import DataBundle
from p3bkit.train.dist import DistContext, EpochSampler, all_reduce_sum_, barrier


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # timm's Mixup/CutMix draw from numpy
    torch.manual_seed(seed)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0,
                rank: int = 0, world: int = 1, start_batch: int = 0) -> DataLoader:
    """A loader whose order depends only on `seed` (so a resumed epoch replays exactly).

    Training loaders (shuffle) drop the last partial batch; `rank`/`world` shard it for DDP.
    """
    sampler = EpochSampler(len(ds), batch_size, seed, rank, world, start_batch, shuffle)
    # an own generator: creating the iterator must not draw from the global RNG (resume exactness)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=gen)


def logits_of(out: torch.Tensor | tuple) -> torch.Tensor:
    """Class logits of a model output (distilled models in train mode return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 256, device: str = "cpu",
             ctx: DistContext | None = None) -> float:
    """Top-1 accuracy in percent (each rank scores its shard; counts are summed over ranks)."""
    ctx = ctx or DistContext(device=device)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in make_loader(ds, batch_size, shuffle=False, rank=ctx.rank, world=ctx.world):
        pred = logits_of(model(x.to(device))).argmax(-1)
        counts += torch.tensor([float((pred.cpu() == y).sum()), float(len(y))], dtype=torch.float64)
    all_reduce_sum_([counts], ctx)
    model.train(was_training)
    return float(100.0 * counts[0] / counts[1].clamp(min=1))


@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class Checkpointing:
    """Where `fit` checkpoints (every epoch and on SIGTERM/SIGINT) and what a resume must match."""

    path: Path
    resume: bool = False
    settings: dict = field(default_factory=dict)


def _optimizer(model: nn.Module, cfg: FitConfig, steps_per_epoch: int):
    """AdamW (no decay on biases, norms, tokens: timm's rule) + linear warm-up + cosine decay."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip), lr=cfg.lr)
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _restore(ck: Checkpointing, model: nn.Module, opt, sched, ctx: DistContext) -> dict:
    """Position and history from `ck.path` (epoch 0, batch 0 when there is nothing to resume)."""
    if not (ck.resume and ck.path.is_file()):
        return {"epoch": 0, "batch": 0, "running": 0.0, "history": []}
    state = load_checkpoint(ck.path)
    check_resume_settings(ck.path, json.loads(state.get("settings", "{}")), ck.settings)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][ctx.rank])
    return {k: state[k] for k in ("epoch", "batch", "running")} | {"history": json.loads(state["history"])}


def _checkpoint(ck: Checkpointing | None, model, opt, sched, pos: dict, ctx: DistContext) -> None:
    if ck is None:
        return
    rng = gather_rng(ctx)
    if ctx.main:
        save_checkpoint(ck.path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "rng": rng, "epoch": pos["epoch"],
                                  "batch": pos["batch"], "running": pos["running"],
                                  "history": json.dumps(pos["history"]), "settings": json.dumps(ck.settings)})
    barrier(ctx)


def fit(model: nn.Module, data: DataBundle, cfg: FitConfig, desc: str = "train",
        ctx: DistContext | None = None, checkpointing: Checkpointing | None = None) -> list[dict]:
    """AdamW + linear warm-up + cosine decay, label smoothing (Mixup/CutMix when the data has it).

    Under torchrun (`ctx.active`) the model is wrapped in DistributedDataParallel and
    `cfg.batch_size` is the global batch, split over the ranks. With `checkpointing`, a checkpoint
    is written after every epoch and at the current batch on SIGTERM/SIGINT (then `Interrupted`
    is raised); `resume` continues from it exactly.
    """
    ctx = ctx or DistContext(device=cfg.device)
    seed_everything(cfg.seed + ctx.rank)
    model.to(ctx.device).train()
    net = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    local = cfg.batch_size // ctx.world
    opt, sched = _optimizer(model, cfg, len(make_loader(data.train, local, True, rank=ctx.rank, world=ctx.world)))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if data.mixup else cfg.label_smoothing)
    pos = _restore(checkpointing, model, opt, sched, ctx) if checkpointing else \
        {"epoch": 0, "batch": 0, "running": 0.0, "history": []}
    flag: dict = {}
    old = install_stop_handlers(flag) if checkpointing else {}
    try:
        while pos["epoch"] < cfg.epochs:
            epoch = pos["epoch"]
            loader = make_loader(data.train, local, True, seed=cfg.seed + epoch, rank=ctx.rank, world=ctx.world,
                                 start_batch=pos["batch"])
            bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and ctx.main),
                       leave=False)
            for x, y in bar:
                x, y = x.to(ctx.device), y.to(ctx.device)
                if data.mixup is not None:
                    x, y = data.mixup(x, y)
                loss = criterion(logits_of(net(x)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                pos["running"] += loss.item()
                pos["batch"] += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if checkpointing and stop_requested(flag, ctx):
                    _checkpoint(checkpointing, model, opt, sched, pos, ctx)
                    raise Interrupted(f"stopped by {flag.get('signal', 'a signal on another rank')} at epoch "
                                      f"{epoch + 1}, batch {pos['batch']}; checkpoint written to "
                                      f"{checkpointing.path}, continue with --resume")
            acc = evaluate(model, data.val, device=ctx.device, ctx=ctx)
            pos["history"].append({"epoch": epoch + 1, "loss": pos["running"] / max(pos["batch"], 1), "val_acc": acc})
            pos.update(epoch=epoch + 1, batch=0, running=0.0)
            _checkpoint(checkpointing, model, opt, sched, pos, ctx)
    finally:
        restore_handlers(old)
    model.eval()
    return pos["history"]
