"""`p3bkit prune`: P3B → surgery → a pruned folder, through the run skeleton (`train.run`).

A prune run writes into its output folder: `checkpoint.pt` (atomically, every epoch and on
SIGTERM/SIGINT; `--resume` continues from it to the same result), `log.jsonl` (every mask update
and epoch), `pruned/` (arch.json + model.safetensors, and teacher.json: the dense model it was
pruned from, which `finetune` distils from) and `summary.json`. It runs unchanged under
torchrun (DDP: `batch_size` is the global batch; accumulators are all-reduced before every mask
update and every rank checks that its masks equal rank 0's).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch

from p3bkit.console import notify
from p3bkit.errors import P3BError
from p3bkit.models.teacher import TEACHER_FILE
from p3bkit.prune.config import PruneJob
from p3bkit.prune.costs import LatencyCosts
from p3bkit.prune.pruner import P3BPruner
from p3bkit.prune.schedule import Schedule
from p3bkit.prune.speed import SpeedChecks
from p3bkit.train.dist import DistContext, all_reduce_sum_, check_identical, init_distributed, require_device
from p3bkit.train.run import CHECKPOINT, LOG, Checkpoints, EpochLoop, RunFolder, RunLog, run_epochs

SUMMARY = "summary.json"
RESUME_FREE = ("out", "progress", "stop_after_epoch", "device", "keep_checkpoint", "workers")  # may change on --resume


def _validate(job: PruneJob) -> None:
    from p3bkit.models.arch import ARCH_FILE, read_arch

    if (Path(job.model) / ARCH_FILE).is_file() and read_arch(job.model).layers:
        raise P3BError(
            f"{job.model} is already pruned; pruning it again is not supported: prune its dense model "
            "(the source named in its arch.json, with --weights for fine-tuned weights) to the smaller "
            "budget instead"
        )
    if not 0 < job.p3b.keep <= 1:
        raise P3BError(f"keep ratio must be in (0, 1], got {job.p3b.keep}")
    if (job.p3b.target_ms is not None or job.target_speedup is not None) and job.latency_table is None:
        raise P3BError(
            "a latency target needs --latency-table (make one with p3bkit latency-table MODEL --backend ...)"
        )
    if any(e < 0 for e in job.epochs) or job.epochs[1] + job.epochs[2] == 0:
        raise P3BError(f"epochs (warm-up, sparsify, sharpen) = {job.epochs}: need ≥ 0 each and sparsify+sharpen ≥ 1")
    if job.p3b.update_every < 1:
        raise P3BError("mask update frequency must be ≥ 1")
    require_device(job.device)


def _latency_table(job: PruneJob, gated, say):
    """The job's latency table, checked against this machine and model; sets p3b.target_ms from a speedup."""
    if job.latency_table is None:
        return None
    from p3bkit.backends import machine_info
    from p3bkit.latency.table import MAX_CHECK_ERROR, LatencyTable, model_dims

    table = LatencyTable.load(job.latency_table)
    table.check_model(model_dims(gated.spec), job.model)
    table.check_machine(machine_info(table.threads))
    error = table.check_error
    if error is not None and error > MAX_CHECK_ERROR and not job.accept_table_error:
        raise P3BError(
            f"{job.latency_table} predicted its check models with a median error of {100 * error:.1f}% "
            f"(> {100 * MAX_CHECK_ERROR:.0f}%): measure it again on an idle machine, or pass "
            "--accept-table-error to prune to it anyway"
        )
    if error is None:
        say(f"note: {job.latency_table} was made without --check: its prediction error is unknown")
    if job.target_speedup is not None:
        job.p3b.target_ms = table.dense_ms / job.target_speedup
    if job.p3b.target_ms is None:
        raise P3BError("--latency-table needs a target: --target-latency-ms or --target-speedup")
    return table


def _teacher(job: PruneJob, device: str):
    from p3bkit.models.factory import create_model

    if job.distill_teacher is None:
        return None
    return create_model(job.distill_teacher, weights=job.teacher_weights).to(device).eval()


def _warn_sparse_updates(sched: Schedule, every: int, say) -> None:
    """A schedule with a handful of mask updates per phase jumps straight to its targets."""
    for phase, steps in (("sparsify", sched.sparsify_steps), ("sharpen", sched.sharpen_steps)):
        if steps and steps // every < 3:
            say(
                f"warning: only {steps // every} mask update(s) during {phase} ({steps} iterations, one update "
                f"every {every}); lower --update-every (the paper scales it with the data size)"
            )


def _warn_few_indicator_images(batch: int, say) -> None:
    """ΔΨ from a handful of images per step is noise, and the patch heads' BatchNorm degenerates."""
    from p3bkit.prune.bpi import MIN_INDICATOR_IMAGES

    if batch < MIN_INDICATOR_IMAGES:
        say(
            f"warning: a batch of {batch} per process gives the block performance indicators {batch} images per step "
            f"(they need {MIN_INDICATOR_IMAGES}): block budgets will be noisy; raise --batch-size"
        )


def _settings(job: PruneJob, distilling: bool) -> dict:
    """The settings a checkpoint must be resumed with, flat (p3b.* for the pruning settings).

    A run that distils from no teacher (none asked, or auto from random weights) leaves the teacher
    settings out: they do nothing, so it resumes whatever --teacher says, as do checkpoints from
    before they existed."""
    d = asdict(job)
    unused = () if distilling else ("teacher", "kd_weight", "kd_temperature")
    flat = {k: v for k, v in d.items() if k not in RESUME_FREE and k != "p3b" and k not in unused}
    flat.update({f"p3b.{k}": v for k, v in d["p3b"].items()})
    return flat


def run_prune(job: PruneJob, resume: bool = False, force: bool = False, plan: str | None = None) -> dict:
    """Prune with P3B, apply surgery, write the pruned folder; return the summary.

    The run folder must be new or empty (`force`: write into it anyway, replacing an earlier
    run's own files and keeping everything else); `resume` continues from its checkpoint when the
    settings match. Runs unchanged under `torchrun` (DDP: --batch-size is the global batch).
    `plan`: a line printed once the model, data and budget passed their checks (what the run does);
    the notes of loading the model and data come with it, so a refusal stays one line.
    """
    from p3bkit.data import load_data_for, make_loader
    from p3bkit.data.datasets import check_batch
    from p3bkit.models import add_gates
    from p3bkit.models.factory import build_user_model, loads_weights
    from p3bkit.models.teacher import dense_origin
    from p3bkit.prune.bpi import ce_loss, hard_distillation_loss
    from p3bkit.train.fit import seed_everything

    _validate(job)
    folder = RunFolder(
        Path(job.out), "prune", SUMMARY, ("pruned/arch.json", "pruned/model.safetensors", f"pruned/{TEACHER_FILE}")
    )
    inputs = ((job.model,) if Path(job.model).is_dir() else ()) + (job.teacher,)  # a teacher PATH is read too
    resuming = folder.open(inputs, resume, force)
    ctx = init_distributed(job.device)
    if job.batch_size % ctx.world:
        raise P3BError(f"batch size {job.batch_size} must be divisible by the {ctx.world} ranks")
    seed_everything(job.seed + ctx.rank)
    notes: list[str] = []
    say = notes.append
    model = build_user_model(job.model, job.pretrained, job.pretrained_file, job.weights, job.model_kwargs, say)
    origin = dense_origin(model, job.model, job.model_kwargs, job.pretrained, job.pretrained_file, job.weights)
    from p3bkit.train.distill import choose_prune_teacher

    kd_teacher, distill = choose_prune_teacher(job.teacher, model, origin, job.kd_weight, job.kd_temperature, say)
    # what speed checks time pruned versions of (prune.speed), before gates go in
    dense = copy.deepcopy(model).eval() if job.latency_table is not None and job.speed_checks and ctx.main else None
    gated = add_gates(model, job.structure).to(ctx.device)  # refuses unsupported models first
    from p3bkit.models.presets import default_data
    from p3bkit.models.source import model_source

    data_name = job.data or default_data(model_source(model, fallback="arch"), say)
    loaded = loads_weights(job.model, job.pretrained, job.pretrained_file, job.weights)
    data = load_data_for(model, data_name, job.augment, loaded, say)  # augmentation as `train` picks it
    if job.train_images is not None:
        from torch.utils.data import Subset

        data.train = Subset(data.train, range(min(job.train_images, len(data.train))))
    if getattr(model, "dist_token", None) is not None:
        model.set_distilled_training(True)
    teacher = _teacher(job, ctx.device)
    if kd_teacher is not None:
        kd_teacher.to(ctx.device)
        say(
            f"distilling from the dense model while pruning (weight {job.kd_weight:g}, temperature "
            f"{job.kd_temperature:g})"
        )
    check_batch(data, job.batch_size, ctx.world, data.mixup is not None)
    spe = len(make_loader(data.train, job.batch_size // ctx.world, True, rank=ctx.rank, world=ctx.world))
    warmup, sparsify, sharpen = job.epochs
    sched = Schedule(warmup * spe, sparsify * spe, sharpen * spe, tau_max=job.p3b.tau)
    _warn_sparse_updates(sched, job.p3b.update_every, say)
    _warn_few_indicator_images(job.batch_size // ctx.world, say)
    table = _latency_table(job, gated, say)
    checks = (
        SpeedChecks(dense, table, job.p3b.target_ms, job.speed_checks)
        if table is not None and job.p3b.target_ms is not None and job.speed_checks
        else None
    )  # a table has a target
    pruner = P3BPruner(
        gated,
        job.p3b,
        sched,
        hard_distillation_loss if teacher is not None else ce_loss,
        lr_scale=job.batch_size / 512,
        latency_table=table,
    ).to(ctx.device)
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        pruner.set_forward(
            DDP(gated, broadcast_buffers=False, find_unused_parameters=True),
            DDP(pruner.bpi, find_unused_parameters=True),
        )
    for note in [*notes, *([plan] if plan else [])] if ctx.main else ():
        notify(note)
    with folder.writing(resuming, ctx):  # only now: bad models, data or checkpoints leave no folder behind
        log = RunLog(folder.path / LOG, ctx)
        checkpoints = Checkpoints(folder.path / CHECKPOINT, _settings(job, kd_teacher is not None), ctx, log)
        t0 = time.time()
        start = checkpoints.restore(_loader_of_state(pruner, checks)) if resuming else (0, 0)
        loop = _epoch_loop(job, pruner, data, (teacher, kd_teacher), log, ctx, checks)
        stopped = run_epochs(loop, ctx, checkpoints, start, job.stop_after_epoch)
        if stopped is not None:
            return {"stopped_after_epoch": stopped}
        summary = _finish(job, pruner, data, folder.path, time.time() - t0, ctx, origin, checks, distill)
        folder.finish(job.keep_checkpoint, ctx)
    return summary


def _loader_of_state(pruner: P3BPruner, checks: SpeedChecks | None):
    def load(state: dict) -> None:
        pruner.load_state_dict(state["pruner"])
        pruner.load_extra_state(state["extra"])
        if checks is not None:
            checks.load_state_dict(state["speed"])

    return load


def _speed_check(
    pruner: P3BPruner, checks: SpeedChecks, layers: list[dict], record: dict, ctx: DistContext, log: RunLog
) -> None:
    """Time the architecture this update's targets lead to (rank 0), correct the latency target on
    every rank, log what was measured."""
    _, progress, _ = pruner.schedule.at(record["step"] - 1)
    row = None
    if ctx.main:
        try:
            row = checks.check(layers, pruner.latency().target_ms)
        except Exception as e:  # a check is advice: the run goes on with the target it has (and says so)
            notify(
                f"speed check at {100 * progress:.0f}% of sparsify failed ({type(e).__name__}: {e}); "
                f"latency target kept at {pruner.latency().target_ms:.3f} ms"
            )
            log.append({"type": "speed_check", "step": record["step"], "progress": progress, "error": str(e)})
    mine = (row["target_ms_after"] if row else pruner.latency().target_ms) if ctx.main else 0.0
    target = torch.tensor([mine], dtype=torch.float64)
    all_reduce_sum_([target], ctx)  # rank 0's correction, everywhere
    used = pruner.retarget(float(target))
    checks.passed(progress)
    if row:
        row.update(step=record["step"], progress=progress, target_ms_after=used)  # the row `records` holds
        log.append({"type": "speed_check", **row})
        notify(
            f"speed check at {100 * progress:.0f}% of sparsify: {row['measured_speedup']:.2f}× measured on "
            f"{checks.table.backend} ({row['predicted_speedup']:.2f}× predicted, {checks.asked_speedup:.2f}× asked); "
            f"latency target {row['target_ms_before']:.3f} → {used:.3f} ms"
            + (_busy_note(row["dense_ms"], checks) if row["host_busy"] else "")
        )


def _busy_note(dense_ms: float, checks: SpeedChecks) -> str:
    """Why a check kept the target: the dense model stayed slow; far off the table's time, the CPU
    may not be the kind the table was made on (hosts of one name differ)."""
    note = (
        f" (host busy: the dense model ran {dense_ms:.2f} ms, > 10% over its steadiest {checks.reference_ms:.2f} ms, "
        "in 3 tries; target kept"
    )
    if dense_ms > 1.5 * checks.table.dense_ms:
        note += f"; {dense_ms / checks.table.dense_ms:.1f}× the table's dense time: is this the CPU it was made on?"
    return note + ")"


def _epoch_loop(
    job: PruneJob,
    pruner: P3BPruner,
    data,
    teachers: tuple,
    log: RunLog,
    ctx: DistContext,
    checks: SpeedChecks | None = None,
) -> EpochLoop:
    """One P3B training step per batch; mask updates when due; an evaluation and a log record per epoch.
    `teachers`: the DeiT hard-distillation teacher and the dense model distilled from (each or None)."""
    from p3bkit.data import make_loader
    from p3bkit.models.outputs import logits_of
    from p3bkit.prune.pruner import SoftTargets
    from p3bkit.train.fit import evaluate

    teacher, kd_teacher = teachers

    dtype = torch.bfloat16 if job.bf16 else None
    total = sum(job.epochs)
    soft: dict[int, int] = {}  # steps per epoch that trained on soft (Mixup/CutMix) targets

    def loader(epoch: int, first: int):
        pruner.gated.train()
        return make_loader(
            data.train,
            job.batch_size // ctx.world,
            True,
            seed=job.seed + epoch,
            rank=ctx.rank,
            world=ctx.world,
            start_batch=first,
            workers=job.workers,
        )

    def step(epoch: int, batch) -> dict:
        x, y = (t.to(ctx.device) for t in batch)
        if data.mixup is not None:  # the DeiT recipe in every training step (paper, Appendix C)
            x, y = data.mixup(x, y)
        t_labels = teacher(x).argmax(-1) if teacher is not None else None
        taught = None
        if kd_teacher is not None:
            with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                taught = SoftTargets(logits_of(kd_teacher(x)), job.kd_weight, job.kd_temperature)
        stats = pruner.train_step(x, y, t_labels, dtype, taught)
        soft[epoch] = soft.get(epoch, 0) + int(stats.pop("soft_targets"))
        if pruner.due():
            all_reduce_sum_(pruner.accumulators(), ctx)  # every rank computes the same masks
            phase, progress, _ = pruner.schedule.at(int(pruner.step) - 1)
            record = pruner.update_masks(plan=checks is not None and checks.due(phase, progress))
            layers = record.pop("plan", None)
            check_identical(torch.cat([g.mask for g in pruner.gated.gates.values()]), ctx, "the masks")
            log.append(
                {
                    **record,
                    "type": "mask_update",
                    "epoch": epoch + 1,
                    **stats,
                    "block_keep": pruner.kept_branch_params_ratio(),
                }
            )
            if layers is not None and checks is not None:  # a plan is asked for by a speed check only
                _speed_check(pruner, checks, layers, record, ctx, log)
        return {"loss": float(stats["loss"]), "keep": pruner.kept_branch_params_ratio()}

    def end_epoch(epoch: int, batches: int) -> str:
        acc = evaluate(pruner.gated, data.val, device=ctx.device, ctx=ctx)
        log.append(
            {
                "type": "epoch",
                "epoch": epoch + 1,
                "val_acc": acc,
                "soft_target_steps": soft.pop(epoch, 0),
                "block_keep": pruner.kept_branch_params_ratio(),
                "total_keep": pruner.total_keep_ratio(),
            }
        )
        return f"val top-1 {acc:.2f}%, keeping {100 * pruner.total_keep_ratio():.1f}% of all parameters"

    def state() -> dict:
        return {
            "pruner": pruner.state_dict(),
            "extra": pruner.extra_state(),
            **({"speed": checks.state_dict()} if checks is not None else {}),
        }

    from p3bkit.models.factory import loads_weights

    lr = job.p3b.lr_model * job.batch_size / 512
    scratch = not loads_weights(job.model, job.pretrained, job.pretrained_file, job.weights)
    return EpochLoop(
        total, loader, step, end_epoch, state, "prune", job.progress, lr_note=f"model lr {lr:.2e}" if scratch else None
    )


def _finish(
    job: PruneJob,
    pruner: P3BPruner,
    data,
    out: Path,
    seconds: float,
    ctx: DistContext,
    origin: dict,
    checks: SpeedChecks | None = None,
    distill: dict | None = None,
) -> dict:
    from p3bkit.fileio import write_json_atomic
    from p3bkit.models import save
    from p3bkit.models.teacher import write_origin
    from p3bkit.surgery import apply_surgery, check_surgery
    from p3bkit.train.dist import barrier
    from p3bkit.train.fit import evaluate

    gated = pruner.gated.eval()
    masked_acc = evaluate(gated, data.val, device=ctx.device, ctx=ctx)
    pruned = apply_surgery(gated, round_to=job.round_to, io_mode=job.io_mode)
    diff = check_surgery(gated, pruned)  # the reference uses the arch's (rounded) indices: exact for any round_to
    pruned_acc = evaluate(pruned, data.val, device=ctx.device, ctx=ctx)
    full, kept = float(pruner.params.linear_full.sum()), float(pruner.params.linear_kept().sum())
    eff = sum(p.numel() for n, p in pruned.named_parameters() if ".fn." in n)
    params = sum(p.numel() for p in pruned.parameters())
    nominal = pruner.total_keep_ratio()
    total = pruner.params.total_params
    summary = {
        "job": asdict(job),
        "distillation": distill or {"teacher": None},
        "val_acc_masked": masked_acc,
        "val_acc_pruned": pruned_acc,
        "world": ctx.world,
        "train_images": len(data.train),
        "budget": job.p3b.budget,
        "keep_target": job.p3b.keep,
        "block_keep_target": pruner.budget_share,
        "params_dense": total,
        "params_kept": round(nominal * total),
        "total_keep": nominal,
        "prune_rate_total": 1 - nominal,
        # tensors in the saved model: a read/write folded into full-width weights (io-mode) or
        # widths rounded up (round-to) store more than the kept parameters
        "params_stored": params,
        "total_keep_stored": params / total,
        "block_params_full": full,
        "block_params_kept": kept,
        "block_keep_nominal": kept / full,
        "prune_rate_blocks": 1 - kept / full,
        "block_params_effective": eff,
        "lr_model": pruner.optimizer.param_groups[0]["lr"],
        "lr_bpi": pruner.optimizer.param_groups[-1]["lr"],
        "surgery_max_abs_diff": diff,
        "seconds": seconds,
        "kappa": pruner.kappa.tolist(),
        "disabled_blocks": [i for i, d in enumerate(pruner.disabled.tolist()) if d],
    }
    if isinstance(pruner.costs, LatencyCosts):
        summary["latency"] = pruner.costs.report(pruned.p3b_arch.layers)
        if pruner.both_budgets:
            summary["latency"]["bound"] = pruner.bound
        if checks is not None and ctx.main:  # the result, timed beside the dense model (prune.speed)
            summary["latency"]["speed_checks"] = checks.records
            try:
                summary["latency"]["measured"] = checks.time(pruned.p3b_arch.layers)
            except Exception as e:  # the pruned model is still saved; the summary says why it is not timed
                summary["latency"]["measured"] = {"error": f"{type(e).__name__}: {e}"}
                notify(f"the pruned model could not be timed beside the dense one: {type(e).__name__}: {e}")
    if ctx.main:
        save(pruned, out / "pruned", overwrite=True)  # the run's own folder (tensors are copied to the CPU)
        write_origin(out / "pruned", origin)  # what finetune distils from (models/teacher.py)
        write_json_atomic(out / SUMMARY, summary)
    barrier(ctx)
    return summary
