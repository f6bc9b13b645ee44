"""The prune job the CLI runs: P3B → surgery → pruned folder (fine-tuning: `p3bkit.finetune`).

A prune run writes into its output folder: `checkpoint.pt` (atomically, every epoch; `resume`
continues from it to the same result), `log.jsonl` (every mask update and epoch), `pruned/`
(arch.json + model.safetensors) and `summary.json`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from p3bkit.errors import P3BError
from p3bkit.fileio import check_output_folder, write_json_atomic
from p3bkit.models import add_gates, save
from p3bkit.models.arch import ARCH_FILE, WEIGHTS_FILE, read_arch
from p3bkit.models.factory import create_model
from p3bkit.prune.bpi import ce_loss, hard_distillation_loss
from p3bkit.prune.engine import P3BConfig, P3BPruner
from p3bkit.prune.schedule import Schedule
from p3bkit.surgery import apply_surgery, check_surgery
from p3bkit.train.checkpoint import (
    Interrupted,
    check_resume_settings,
    gather_rng,
    install_stop_handlers,
    restore_handlers,
    stop_requested,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from p3bkit.train.data import load_data, resolve_augment
from p3bkit.train.dist import (
    DistContext,
    all_reduce_sum_,
    barrier,
    check_identical,
    init_distributed,
    require_device,
)
from p3bkit.train.loop import evaluate, make_loader, seed_everything

CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CHECKPOINT, f".{CHECKPOINT}.tmp", "log.jsonl", "summary.json", "pruned")  # what a prune run writes
RESUME_FREE = ("out", "progress", "stop_after_epoch", "device", "keep_checkpoint")  # may change on --resume


def notify(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class PruneJob:
    """Everything a `p3bkit prune` run needs (plain data, stored in summary.json)."""

    out: str
    recipe: str = "quick"  # recorded; the CLI fills unset settings from it (prune/recipes.py)
    model: str = "digits-vit"
    model_kwargs: dict = field(default_factory=dict)  # timm constructor arguments (img_size, num_classes, …)
    pretrained: bool = False
    pretrained_file: str | None = None  # local weights through timm's loader (classifier re-initialised if needed)
    checkpoint: str | None = None
    data: str = "digits"
    augment: str = "auto"  # deit | light | none | auto (prune/recipes… train/data.py resolve_augment)
    epochs: tuple[int, int, int] = (1, 4, 4)  # warm-up, sparsify, sharpen
    batch_size: int = 64
    structure: str = "inner"  # head dims + MLP hidden: wins on accuracy and latency (README, results)
    round_to: int = 1
    io_mode: str = "auto"
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    distill_teacher: str | None = None
    teacher_checkpoint: str | None = None
    progress: bool = True
    keep_checkpoint: bool = False  # a finished run removes checkpoint.pt unless asked to keep it
    latency_table: str | None = None  # latency budget: the table (p3bkit latency-table) and p3b.target_ms …
    target_speedup: float | None = None  # … or a speedup over the table's measured dense model
    stop_after_epoch: int | None = None  # testing hook: end the run early, as a crash would
    p3b: P3BConfig = field(default_factory=P3BConfig)


def build_model(name: str, pretrained: bool, pretrained_file: str | None, checkpoint: str | None, kwargs: dict,
                say: bool = True):
    """create_model, saying when a pretrained classifier was dropped for another class count."""
    if (Path(name) / ARCH_FILE).is_file() and kwargs:
        raise P3BError(f"{name} is a saved model: its constructor arguments are fixed ({', '.join(kwargs)} given)")
    model = create_model(name, pretrained=pretrained, checkpoint=checkpoint, pretrained_file=pretrained_file, **kwargs)
    rows = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if say and pretrained_file and rows and rows != model.num_classes:
        notify(f"note: {pretrained_file} has a {rows}-class classifier; the model's {model.num_classes}-class "
               "classifier starts from random weights (everything else is loaded)")
    return model


def data_for(name: str, model, augment: str, pretrained: bool, say: bool = True):
    """The data at the model's input size, channels and classes, with the augmentation that fits."""
    size = model.patch_embed.img_size[0]
    chosen = resolve_augment(augment, pretrained, size)
    bundle = load_data(name, img_size=size, num_classes=model.num_classes,
                       in_chans=model.patch_embed.proj.in_channels, augment=chosen)
    if say and name not in ("digits", "synthetic"):
        why = "" if augment != "auto" else (" (fine-tuning a pretrained model on images ≥ 128 px)" if chosen == "deit"
                                             else " (training from scratch or images < 128 px; --augment deit for the DeiT recipe)")
        notify(f"augmentation: {chosen}{why}")
    return bundle


def _validate(job: PruneJob) -> None:
    if (Path(job.model) / ARCH_FILE).is_file() and read_arch(job.model).layers:
        raise P3BError(f"{job.model} is already pruned; pruning it again is not supported: prune its dense model "
                       "(the source named in its arch.json, with --checkpoint for fine-tuned weights) to the smaller "
                       "budget instead")
    if not 0 < job.p3b.keep <= 1:
        raise P3BError(f"keep ratio must be in (0, 1], got {job.p3b.keep}")
    if (job.p3b.target_ms is not None or job.target_speedup is not None) and job.latency_table is None:
        raise P3BError("a latency target needs --latency-table (make one with p3bkit latency-table MODEL --backend ...)")
    if any(e < 0 for e in job.epochs) or job.epochs[1] + job.epochs[2] == 0:
        raise P3BError(f"epochs (warm-up, sparsify, sharpen) = {job.epochs}: need ≥ 0 each and sparsify+sharpen ≥ 1")
    if job.p3b.update_every < 1:
        raise P3BError("mask update frequency must be ≥ 1")
    require_device(job.device)


def _latency_table(job: PruneJob, gated):
    """The job's latency table, checked against this machine and model; sets p3b.target_ms from a speedup."""
    if job.latency_table is None:
        return None
    from p3bkit.bench.harness import machine_info
    from p3bkit.models.latency import LatencyTable, model_dims

    table = LatencyTable.load(job.latency_table)
    table.check_model(model_dims(gated.spec), job.model)
    table.check_machine(machine_info(table.threads))
    if job.target_speedup is not None:
        job.p3b.target_ms = table.dense_ms / job.target_speedup
    if job.p3b.target_ms is None:
        raise P3BError("--latency-table needs a target: --target-latency-ms or --target-speedup")
    return table


def _teacher(job: PruneJob, device: str):
    if job.distill_teacher is None:
        return None
    return create_model(job.distill_teacher, checkpoint=job.teacher_checkpoint).to(device).eval()


def _warn_sparse_updates(sched: Schedule, every: int, ctx: DistContext) -> None:
    """A schedule with a handful of mask updates per phase jumps straight to its targets."""
    for phase, steps in (("sparsify", sched.sparsify_steps), ("sharpen", sched.sharpen_steps)):
        if steps and steps // every < 3 and ctx.main:
            notify(f"warning: only {steps // every} mask update(s) during {phase} ({steps} iterations, one update "
                    f"every {every}); lower --update-every (the paper scales it with the data size)")


def _check_run_folder(job: PruneJob, out: Path, resume: bool, force: bool) -> bool:
    """Refuse run folders that would mix runs or lose files; True when a checkpoint will be resumed."""
    inputs = (job.model,) if Path(job.model).is_dir() else ()
    if resume and (out / CHECKPOINT).is_file():
        check_output_folder(out, "prune", inputs, force=True)  # its own run folder: writable, not the input
        return True
    if resume and (out / "summary.json").is_file():
        raise P3BError(f"{out} holds a finished run (summary.json) and no checkpoint: nothing to resume")
    if resume:
        notify(f"note: no {CHECKPOINT} in {out}: starting from scratch")
    check_output_folder(out, "prune", inputs, force=force)
    return False


def _settings(job: PruneJob) -> dict:
    """The settings a checkpoint must be resumed with, flat and JSON-normalised (tuples → lists)."""
    d = asdict(job)
    flat = {k: v for k, v in d.items() if k not in RESUME_FREE and k != "p3b"}
    flat.update({f"p3b.{k}": v for k, v in d["p3b"].items()})
    return json.loads(json.dumps(flat))


def _clear_own_files(out: Path) -> None:
    """--force into an earlier run folder: drop that run's files so two runs never mix (nothing else)."""
    for f in (out / CHECKPOINT, out / "log.jsonl", out / "summary.json", out / "pruned" / ARCH_FILE,
              out / "pruned" / WEIGHTS_FILE):
        f.unlink(missing_ok=True)


def run_prune(job: PruneJob, resume: bool = False, force: bool = False) -> dict:
    """Prune with P3B, apply surgery, write the pruned folder; return the summary.

    The run folder must be new or empty (`force`: write into it anyway, replacing an earlier
    run's own files and keeping everything else); `resume` continues from its checkpoint when the
    settings match. Runs unchanged under `torchrun` (DDP: --batch-size is the global batch).
    """
    _validate(job)
    out = Path(job.out)
    resuming = _check_run_folder(job, out, resume, force)
    ctx = init_distributed(job.device)
    if job.batch_size % ctx.world:
        raise P3BError(f"batch size {job.batch_size} must be divisible by the {ctx.world} ranks")
    seed_everything(job.seed + ctx.rank)
    model = build_model(job.model, job.pretrained, job.pretrained_file, job.checkpoint, job.model_kwargs, ctx.main)
    gated = add_gates(model, job.structure).to(ctx.device)  # refuses unsupported models first
    data = data_for(job.data, model, job.augment, job.pretrained or job.pretrained_file is not None, ctx.main)
    if getattr(model, "dist_token", None) is not None:
        model.set_distilled_training(True)
    teacher = _teacher(job, ctx.device)
    local_batch = job.batch_size // ctx.world
    spe = len(make_loader(data.train, local_batch, True, rank=ctx.rank, world=ctx.world))
    if spe == 0:
        raise P3BError(f"the training set has fewer than {job.batch_size} samples: lower --batch-size")
    if data.mixup is not None and local_batch % 2:
        raise P3BError(f"Mixup/CutMix pair up images: the per-rank batch ({local_batch}) must be even")
    sched = Schedule(*(e * spe for e in job.epochs), tau_max=job.p3b.tau)
    _warn_sparse_updates(sched, job.p3b.update_every, ctx)
    table = _latency_table(job, gated)
    pruner = P3BPruner(gated, job.p3b, sched, hard_distillation_loss if teacher is not None else ce_loss,
                       lr_scale=job.batch_size / 512, latency_table=table).to(ctx.device)
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        pruner.set_forward(DDP(gated, broadcast_buffers=False, find_unused_parameters=True),
                           DDP(pruner.bpi, find_unused_parameters=True))
    if ctx.main:  # only now: bad models, data or checkpoints leave no folder behind
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            _clear_own_files(out)
    barrier(ctx)
    pos, log_path = (0, 0), out / "log.jsonl"
    if resuming:
        pos = _resume(pruner, out / CHECKPOINT, ctx, _settings(job))
        if ctx.main:
            _trim_log(log_path, int(pruner.step), pos[0])
    flag: dict = {}
    old = install_stop_handlers(flag)
    t0 = time.time()
    try:
        for epoch in range(pos[0], sum(job.epochs)):
            soft = _train_epoch(pruner, job, data, teacher, epoch, pos[1] if epoch == pos[0] else 0, out, ctx, flag)
            acc = evaluate(gated, data.val, device=ctx.device, ctx=ctx)
            if ctx.main:
                _append(log_path, {"type": "epoch", "epoch": epoch + 1, "val_acc": acc, "soft_target_steps": soft,
                                   "block_keep": pruner.block_keep_ratio(), "total_keep": pruner.total_keep_ratio()})
                if job.progress:
                    notify(f"epoch {epoch + 1}/{sum(job.epochs)}: val top-1 {acc:.2f}%, keeping "
                            f"{100 * pruner.total_keep_ratio():.1f}% of all parameters")
            _save(pruner, out, epoch + 1, 0, ctx, _settings(job))
            if job.stop_after_epoch is not None and epoch + 1 >= job.stop_after_epoch and epoch + 1 < sum(job.epochs):
                return {"stopped_after_epoch": epoch + 1}
    finally:
        restore_handlers(old)
    return _finish(job, pruner, data, out, time.time() - t0, ctx)


def _train_epoch(pruner: P3BPruner, job: PruneJob, data, teacher, epoch: int, start_batch: int, out: Path,
                 ctx: DistContext, flag: dict) -> int:
    """One epoch of P3B; returns how many steps trained on soft (Mixup/CutMix) targets."""
    pruner.gated.train()
    local_batch = job.batch_size // ctx.world
    loader = make_loader(data.train, local_batch, True, seed=job.seed + epoch, rank=ctx.rank, world=ctx.world,
                         start_batch=start_batch)
    bar = tqdm(loader, desc=f"prune {epoch + 1}/{sum(job.epochs)}", disable=not (job.progress and ctx.main), leave=False)
    dtype = torch.bfloat16 if job.bf16 else None
    soft = 0
    for i, (x, y) in enumerate(bar, start=start_batch):
        x, y = x.to(ctx.device), y.to(ctx.device)
        if data.mixup is not None:  # the DeiT recipe in every training step (paper, Appendix C)
            x, y = data.mixup(x, y)
        t_labels = teacher(x).argmax(-1) if teacher is not None else None
        stats = pruner.train_step(x, y, t_labels, dtype)
        soft += int(stats.pop("soft_targets"))
        if pruner.due():
            _sync_accumulators(pruner, ctx)
            record = pruner.update_masks()
            check_identical(torch.cat([g.mask for g in pruner.gated.gates.values()]), ctx, "the masks")
            if ctx.main:
                record.update(type="mask_update", epoch=epoch + 1, **stats, block_keep=pruner.block_keep_ratio())
                _append(out / "log.jsonl", record)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", keep=f"{pruner.block_keep_ratio():.3f}")
        if stop_requested(flag, ctx):
            _save(pruner, out, epoch, i + 1, ctx, _settings(job))
            raise Interrupted(f"stopped by {flag.get('signal', 'a signal on another rank')} at epoch {epoch + 1}, "
                              f"batch {i + 1}; checkpoint written to {out / CHECKPOINT}, continue with --resume")
    return soft


def _sync_accumulators(pruner: P3BPruner, ctx: DistContext) -> None:
    """Sum ΔΨ and Taylor-score accumulators over ranks so every rank computes the same masks."""
    tensors = [pruner.delta_c, pruner.delta_p, pruner.delta_count]
    for g in pruner.gated.gates.values():
        tensors += [g.score_sum, g.grad_sum, g.score_count]
    all_reduce_sum_(tensors, ctx)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _save(pruner: P3BPruner, out: Path, epoch: int, batch: int, ctx: DistContext, settings: dict) -> None:
    rng = gather_rng(ctx)
    if ctx.main:
        save_checkpoint(out / CHECKPOINT, {"epoch": epoch, "batch": batch, "pruner": pruner.state_dict(),
                                           "extra": pruner.extra_state(), "rng": rng, "world": ctx.world,
                                           "settings": json.dumps(settings, sort_keys=True)})
    barrier(ctx)


def _trim_log(path: Path, step: int, epochs_done: int) -> None:
    """Drop log records written after the checkpoint (a killed run logs steps it will replay)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if (rec.get("type") == "mask_update" and rec["step"] <= step) or \
                (rec.get("type") == "epoch" and rec["epoch"] <= epochs_done):
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)


def _resume(pruner: P3BPruner, path: Path, ctx: DistContext, settings: dict) -> tuple[int, int]:
    ck = load_checkpoint(path)
    check_resume_settings(path, json.loads(ck["settings"]) if "settings" in ck else None, settings)
    try:
        pruner.load_state_dict(ck["pruner"])
        pruner.load_extra_state(ck["extra"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise P3BError(f"{path} does not fit this run ({str(exc)[:200]}); delete it to start over") from exc
    if ck.get("world", 1) != ctx.world:
        raise P3BError(f"{path} was written by {ck.get('world', 1)} ranks; resume with the same number")
    set_rng_state(ck["rng"][ctx.rank])
    return int(ck["epoch"]), int(ck["batch"])


def _finish(job: PruneJob, pruner: P3BPruner, data, out: Path, seconds: float, ctx: DistContext) -> dict:
    gated = pruner.gated.eval()
    masked_acc = evaluate(gated, data.val, device=ctx.device, ctx=ctx)
    pruned = apply_surgery(gated, round_to=job.round_to, io_mode=job.io_mode)
    diff = check_surgery(gated, pruned)  # the reference uses the arch's (rounded) indices: exact for any round_to
    pruned_acc = evaluate(pruned, data.val, device=ctx.device, ctx=ctx)
    full, kept = float(pruner.full_sizes.sum()), float(pruner.kept_sizes().sum())
    eff = sum(p.numel() for n, p in pruned.named_parameters() if ".fn." in n)
    params = sum(p.numel() for p in pruned.parameters())
    nominal = pruner.total_keep_ratio()
    summary = {"job": asdict(job), "val_acc_masked": masked_acc, "val_acc_pruned": pruned_acc, "world": ctx.world,
               "budget": job.p3b.budget, "keep_target": job.p3b.keep, "block_keep_target": pruner.block_keep,
               "params_dense": pruner.total_params, "params_kept": round(nominal * pruner.total_params),
               "total_keep": nominal, "prune_rate_total": 1 - nominal,
               # tensors in the saved model: a read/write folded into full-width weights (io-mode) or
               # widths rounded up (round-to) store more than the kept parameters
               "params_stored": params, "total_keep_stored": params / pruner.total_params,
               "block_params_full": full, "block_params_kept": kept, "block_keep_nominal": kept / full,
               "prune_rate_blocks": 1 - kept / full, "block_params_effective": eff,
               "lr_model": pruner.optimizer.param_groups[0]["lr"], "lr_bpi": pruner.optimizer.param_groups[-1]["lr"],
               "surgery_max_abs_diff": diff, "seconds": seconds, "kappa": pruner.kappa.tolist(),
               "disabled_blocks": [i for i, d in enumerate(pruner.disabled.tolist()) if d]}
    if pruner.latency is not None:
        summary["latency"] = pruner.latency.report(pruned.p3b_arch.layers)
    if ctx.main:
        save(pruned, out / "pruned")  # save() copies tensors to the CPU; the model stays on its device
        write_json_atomic(out / "summary.json", summary)
        if not job.keep_checkpoint:  # the run is complete: the checkpoint (often 10–30× the model) goes
            (out / CHECKPOINT).unlink(missing_ok=True)
    barrier(ctx)
    return summary
