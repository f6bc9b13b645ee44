"""Plain supervised training and evaluation (dense pre-training and the DeiT-style fine-tune)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from p3bkit.train.data import DataBundle
from p3bkit.train.dist import DistContext, EpochSampler, all_reduce_sum_


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


def fit(model: nn.Module, data: DataBundle, cfg: FitConfig, desc: str = "train",
        ctx: DistContext | None = None) -> list[dict]:
    """AdamW + linear warm-up + cosine decay, label smoothing (Mixup/CutMix when the data has it).

    Under torchrun (`ctx.active`) the model is wrapped in DistributedDataParallel and
    `cfg.batch_size` is the global batch, split over the ranks.
    """
    ctx = ctx or DistContext(device=cfg.device)
    seed_everything(cfg.seed + ctx.rank)
    model.to(ctx.device).train()
    net = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip), lr=cfg.lr)
    local = cfg.batch_size // ctx.world
    steps_per_epoch = len(make_loader(data.train, local, True, rank=ctx.rank, world=ctx.world))
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if data.mixup else cfg.label_smoothing)
    history = []
    for epoch in range(cfg.epochs):
        loader = make_loader(data.train, local, True, seed=cfg.seed + epoch, rank=ctx.rank, world=ctx.world)
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and ctx.main), leave=False)
        running = 0.0
        for x, y in bar:
            x, y = x.to(ctx.device), y.to(ctx.device)
            if data.mixup is not None:
                x, y = data.mixup(x, y)
            loss = criterion(logits_of(net(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate(model, data.val, device=ctx.device, ctx=ctx)
        history.append({"epoch": epoch + 1, "loss": running / max(len(loader), 1), "val_acc": acc})
    model.eval()
    return history
