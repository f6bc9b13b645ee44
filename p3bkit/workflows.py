"""End-to-end jobs the CLI runs: prune (P3B → surgery → pruned folder) and fine-tune.

A prune run writes into its output folder: `checkpoint.pt` (atomically, every epoch; `resume`
continues from it to the same result), `log.jsonl` (every mask update and epoch), `pruned/`
(arch.json + model.safetensors) and `summary.json`.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from p3bkit.errors import P3BError
from p3bkit.models import add_gates, save
from p3bkit.models.factory import create_model
from p3bkit.prune.bpi import ce_loss, hard_distillation_loss
from p3bkit.prune.engine import P3BConfig, P3BPruner
from p3bkit.prune.schedule import Schedule
from p3bkit.surgery import apply_surgery, check_surgery
from p3bkit.train.data import load_data
from p3bkit.train.loop import evaluate, make_loader, seed_everything

CHECKPOINT = "checkpoint.pt"


@dataclass
class PruneJob:
    """Everything a `p3bkit prune` run needs (plain data, stored in summary.json)."""

    out: str
    model: str = "digits-vit"
    pretrained: bool = False
    checkpoint: str | None = None
    data: str = "digits"
    epochs: tuple[int, int, int] = (1, 4, 4)  # warm-up, sparsify, sharpen
    batch_size: int = 64
    structure: str = "full"
    round_to: int = 1
    io_mode: str = "auto"
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    distill_teacher: str | None = None
    teacher_checkpoint: str | None = None
    progress: bool = True
    stop_after_epoch: int | None = None  # testing hook: end the run early, as a crash would
    p3b: P3BConfig = field(default_factory=P3BConfig)


def _atomic_torch_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _validate(job: PruneJob) -> None:
    if not 0 < job.p3b.keep <= 1:
        raise P3BError(f"keep ratio must be in (0, 1], got {job.p3b.keep}")
    if any(e < 0 for e in job.epochs) or job.epochs[1] + job.epochs[2] == 0:
        raise P3BError(f"epochs (warm-up, sparsify, sharpen) = {job.epochs}: need ≥ 0 each and sparsify+sharpen ≥ 1")
    if job.p3b.update_every < 1:
        raise P3BError("mask update frequency must be ≥ 1")
    if job.device.startswith("cuda") and not torch.cuda.is_available():
        raise P3BError("--device cuda asked for, but no CUDA GPU is available here")


def _teacher(job: PruneJob):
    if job.distill_teacher is None:
        return None
    teacher = create_model(job.distill_teacher, checkpoint=job.teacher_checkpoint).to(job.device).eval()
    return teacher


def run_prune(job: PruneJob, resume: bool = False) -> dict:
    """Prune with P3B, apply surgery, write the pruned folder; return the summary."""
    _validate(job)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(job.seed)
    model = create_model(job.model, pretrained=job.pretrained, checkpoint=job.checkpoint)
    gated = add_gates(model, job.structure).to(job.device)  # refuses unsupported models first
    data = load_data(job.data, img_size=model.patch_embed.img_size[0], num_classes=model.num_classes,
                     in_chans=model.patch_embed.proj.in_channels)
    if getattr(model, "dist_token", None) is not None:
        model.set_distilled_training(True)
    teacher = _teacher(job)
    spe = len(make_loader(data.train, job.batch_size, True))
    sched = Schedule(*(e * spe for e in job.epochs), tau_max=job.p3b.tau)
    pruner = P3BPruner(gated, job.p3b, sched, hard_distillation_loss if teacher is not None else ce_loss).to(job.device)
    start, log_path = 0, out / "log.jsonl"
    if resume and (out / CHECKPOINT).is_file():
        start = _load_checkpoint(pruner, out / CHECKPOINT)
    elif log_path.exists():
        log_path.unlink()
    t0 = time.time()
    total_epochs = sum(job.epochs)
    for epoch in range(start, total_epochs):
        _train_epoch(pruner, job, data, teacher, epoch, log_path)
        acc = evaluate(gated, data.val, device=job.device)
        _append(log_path, {"type": "epoch", "epoch": epoch + 1, "val_acc": acc,
                           "block_keep": pruner.block_keep_ratio()})
        _atomic_torch_save(_checkpoint(pruner, epoch + 1), out / CHECKPOINT)
        if job.stop_after_epoch is not None and epoch + 1 >= job.stop_after_epoch and epoch + 1 < total_epochs:
            return {"stopped_after_epoch": epoch + 1}
    return _finish(job, pruner, data, out, time.time() - t0)


def _train_epoch(pruner: P3BPruner, job: PruneJob, data, teacher, epoch: int, log_path: Path) -> None:
    pruner.gated.train()
    loader = make_loader(data.train, job.batch_size, True, seed=job.seed + epoch)
    bar = tqdm(loader, desc=f"prune {epoch + 1}/{sum(job.epochs)}", disable=not job.progress, leave=False)
    dtype = torch.bfloat16 if job.bf16 else None
    for x, y in bar:
        x, y = x.to(job.device), y.to(job.device)
        t_labels = teacher(x).argmax(-1) if teacher is not None else None
        stats = pruner.train_step(x, y, t_labels, dtype)
        if pruner.due():
            record = pruner.update_masks()
            record.update(type="mask_update", epoch=epoch + 1, **stats, block_keep=pruner.block_keep_ratio())
            _append(log_path, record)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", keep=f"{pruner.block_keep_ratio():.3f}")


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _checkpoint(pruner: P3BPruner, epoch: int) -> dict:
    return {"epoch": epoch, "pruner": pruner.state_dict(), "extra": pruner.extra_state(),
            "rng_torch": torch.get_rng_state(), "rng_python": list(random.getstate()[1]),
            "rng_python_version": random.getstate()[0], "rng_python_gauss": random.getstate()[2]}


def _load_checkpoint(pruner: P3BPruner, path: Path) -> int:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        pruner.load_state_dict(ck["pruner"])
        pruner.load_extra_state(ck["extra"])
    except (RuntimeError, KeyError, EOFError, ValueError) as exc:
        raise P3BError(f"{path} cannot be resumed from ({exc}); delete it to start over") from exc
    torch.set_rng_state(ck["rng_torch"])
    random.setstate((ck["rng_python_version"], tuple(ck["rng_python"]), ck["rng_python_gauss"]))
    return int(ck["epoch"])


def _finish(job: PruneJob, pruner: P3BPruner, data, out: Path, seconds: float) -> dict:
    gated = pruner.gated.eval()
    masked_acc = evaluate(gated, data.val, device=job.device)
    pruned = apply_surgery(gated, round_to=job.round_to, io_mode=job.io_mode)
    diff = check_surgery(gated, pruned) if job.round_to == 1 else check_surgery(gated, pruned, atol=float("inf"))
    save(pruned, out / "pruned")  # save() copies tensors to the CPU; the model stays on its device
    full, kept = float(pruner.full_sizes.sum()), float(pruner.kept_sizes().sum())
    eff = sum(p.numel() for n, p in pruned.named_parameters() if ".fn." in n)
    summary = {"job": asdict(job), "val_acc_masked": masked_acc,
               "val_acc_pruned": evaluate(pruned, data.val, device=job.device),
               "block_params_full": full, "block_params_kept": kept, "block_keep_nominal": kept / full,
               "block_params_effective": eff, "surgery_max_abs_diff": diff, "seconds": seconds,
               "kappa": pruner.kappa.tolist()}
    _write_json(out / "summary.json", summary)
    return summary


def run_finetune(pruned: str, out: str, data: str = "digits", epochs: int = 10, batch_size: int = 64,
                 lr: float = 5e-4, drop_path: float = 0.1, device: str = "cpu", seed: int = 0,
                 progress: bool = True) -> dict:
    """Fine-tune a pruned folder with the DeiT recipe (lr = base·batch/512) and save it to `out`."""
    import torch.nn as nn
    from timm.layers import DropPath

    from p3bkit.models import load
    from p3bkit.models.pruned import PrunedBranch
    from p3bkit.train.loop import FitConfig, fit

    model = load(pruned)
    branches = [m for m in model.modules() if isinstance(m, PrunedBranch)]
    for i, br in enumerate(branches):  # stochastic depth, linearly increasing with depth
        rate = drop_path * i / max(len(branches) - 1, 1)
        br.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
    bundle = load_data(data, img_size=model.patch_embed.img_size[0], num_classes=model.num_classes,
                       in_chans=model.patch_embed.proj.in_channels)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr * batch_size / 512, seed=seed, device=device,
                    progress=progress, warmup_epochs=min(5, max(epochs // 10, 0)))
    history = fit(model, bundle, cfg, desc="finetune")
    for br in branches:
        br.drop_path = nn.Identity()
    save(model.cpu(), out)
    summary = {"source": str(pruned), "history": history, "val_acc": history[-1]["val_acc"] if history else None}
    _write_json(Path(out) / "finetune.json", summary)
    return summary
