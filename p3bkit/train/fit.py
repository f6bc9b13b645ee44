"""Plain supervised training and evaluation (dense pre-training and the DeiT-style fine-tune).

`fit` is AdamW (timm's weight-decay groups) with a linear warm-up and cosine decay, label
smoothing or Mixup/CutMix when the data brings it, under torchrun when launched by it, and runs
through the run skeleton (`train.run`): checkpoints every epoch and on SIGTERM/SIGINT, exact resume.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from p3bkit.data import DataBundle, make_loader
from p3bkit.models.outputs import logits_of
from p3bkit.train.dist import DistContext, all_reduce_sum_
from p3bkit.train.distill import KD_TEMPERATURE, KD_WEIGHT
from p3bkit.train.run import Checkpoints, EpochLoop, run_epochs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # timm's Mixup/CutMix draw from numpy
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Dataset, batch_size: int = 256, device: str = "cpu", ctx: DistContext | None = None
) -> float:
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
    watch_loss: bool = True  # warn when the loss did not fall in epoch 1 (not for an already trained model)
    workers: int = 0  # data-loading processes
    teacher: nn.Module | None = None  # a dense model to distil from (eval mode, no gradients): see distillation_loss
    kd_weight: float = KD_WEIGHT  # w, the distillation term's share of the loss
    kd_temperature: float = KD_TEMPERATURE  # T


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor, weight: float, temperature: float
) -> torch.Tensor:
    """(1 − w)·hard_loss + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), the KL averaged over the batch
    (Hinton et al. 2015, §2: T² keeps the soft term's gradients on the labels' scale at any T)."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(logits.float() / t, -1),
        F.log_softmax(teacher_logits.float() / t, -1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - weight) * hard_loss + weight * t * t * kl


def _optimizer(model: nn.Module, cfg: FitConfig, steps_per_epoch: int):
    """AdamW (no decay on biases, norms, tokens: timm's rule) + linear warm-up + cosine decay."""
    from timm.optim import param_groups_weight_decay

    no_decay = getattr(model, "no_weight_decay", None)
    skip = no_decay() if callable(no_decay) else set()
    opt = torch.optim.AdamW(
        param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip), lr=cfg.lr, foreach=True
    )  # one op per group, not per tensor
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


class TrainStep:
    """One optimiser step of `p3bkit train` and `finetune`: Mixup/CutMix when the data brings it, cross
    entropy (label smoothing without Mixup), the distillation term with a teacher, AdamW, the lr schedule.

    `net` is what the batch goes through (the DDP wrapper under torchrun), `model` what owns the
    parameters; the optimiser and schedule are built for `steps_per_epoch` steps per epoch. Calling it
    returns the batch's loss (a float)."""

    def __init__(
        self, model: nn.Module, cfg: FitConfig, steps_per_epoch: int, mixup=None, net: nn.Module | None = None
    ):
        self.model, self.net, self.cfg, self.mixup = model, net if net is not None else model, cfg, mixup
        self.opt, self.sched = _optimizer(model, cfg, steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if mixup else cfg.label_smoothing)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        logits = logits_of(self.net(x))
        loss = self.criterion(logits, y)
        if self.cfg.teacher is not None:  # it sees the same (mixed) images
            with torch.no_grad():
                taught = logits_of(self.cfg.teacher(x))
            loss = distillation_loss(logits, taught, loss, self.cfg.kd_weight, self.cfg.kd_temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.item()

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def fit(
    model: nn.Module,
    data: DataBundle,
    cfg: FitConfig,
    desc: str = "train",
    ctx: DistContext | None = None,
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
) -> list[dict]:
    """Train `model` on `data` (see module doc); returns the per-epoch history (loss, val top-1).

    Under torchrun (`ctx.active`) the model is wrapped in DistributedDataParallel and
    `cfg.batch_size` is the global batch, split over the ranks. With `checkpoints`, `resume`
    continues from its file when there is one.
    """
    ctx = ctx or DistContext(device=cfg.device)
    seed_everything(cfg.seed + ctx.rank)
    model.to(ctx.device).train()
    if cfg.teacher is not None:
        cfg.teacher.to(ctx.device).eval()
    net = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    local = cfg.batch_size // ctx.world
    train_step = TrainStep(
        model, cfg, len(make_loader(data.train, local, True, rank=ctx.rank, world=ctx.world)), data.mixup, net
    )
    run: dict[str, Any] = {"running": 0.0, "history": []}

    def load(state: dict) -> None:
        model.load_state_dict(state["model"])
        train_step.load_state_dict(state)
        run.update(running=state["running"], history=json.loads(state["history"]))

    def step(epoch: int, batch) -> dict:
        loss = train_step(*(t.to(ctx.device) for t in batch))
        run["running"] += loss
        return {"loss": loss}

    def end_epoch(epoch: int, batches: int) -> str:
        acc = evaluate(model, data.val, device=ctx.device, ctx=ctx)
        record = {"epoch": epoch + 1, "loss": run["running"] / max(batches, 1), "val_acc": acc}
        run["history"].append(record)
        run["running"] = 0.0
        return f"train loss {record['loss']:.3f}, val top-1 {acc:.2f}%"

    def state() -> dict:
        return {
            "model": model.state_dict(),
            **train_step.state_dict(),
            "running": run["running"],
            "history": json.dumps(run["history"]),
        }

    def loader(epoch: int, first: int):
        return make_loader(
            data.train,
            local,
            True,
            seed=cfg.seed + epoch,
            rank=ctx.rank,
            world=ctx.world,
            start_batch=first,
            workers=cfg.workers,
        )

    start = checkpoints.restore(load) if checkpoints and resume and checkpoints.path.is_file() else (0, 0)
    loop = EpochLoop(
        cfg.epochs,
        loader,
        step,
        end_epoch,
        state,
        desc,
        cfg.progress,
        lr_note=f"peak lr {cfg.lr:.2e}" if cfg.watch_loss else None,
        watch_epochs=cfg.warmup_epochs + 1,
    )
    run_epochs(loop, ctx, checkpoints, start)
    model.eval()
    return run["history"]
