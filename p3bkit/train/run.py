"""One training run in an output folder: the skeleton prune, train, finetune and the demo share.

- `RunFolder`: the output rules. A folder is new or empty, or `--force` writes into it replacing
  only this command's own files (a fresh run drops an earlier run's checkpoint, log and summary;
  its model is replaced atomically when the new one is written); it never is, contains or lies inside the command's input; it is
  checked for writability before any work, and created only once the model and data are built
  (bad input leaves no folder behind). `--resume` continues a checkpoint, refuses a finished run
  and says so when there is nothing to resume.
- `Checkpoints`: the run's state, position (epochs done, batches into the next) and every rank's
  RNG states, written atomically every epoch and on SIGTERM/SIGINT; a resume must use the same
  settings and continues to the same result.
- `RunLog`: JSON lines; a resume drops the records written after its checkpoint.
- `run_epochs`: the epoch/batch loop — progress bars, one line per epoch, a time estimate for long
  runs, a warning when the loss does not fall in the first epoch, stop signals (a checkpoint at
  the current batch, then `Interrupted`), a checkpoint after every epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from p3bkit.console import notify, progress
from p3bkit.errors import Interrupted, P3BError, first_line
from p3bkit.fileio import check_output_folder, folder_lock
from p3bkit.train.checkpoint import check_resume_settings, gather_rng, read_checkpoint, set_rng_state, write_checkpoint
from p3bkit.train.dist import DistContext, all_reduce_sum_, barrier

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass
class RunFolder:
    """An output folder and the files a command writes into it."""

    path: Path
    command: str
    done: str | None = None  # the record a finished run leaves behind (its summary)
    outputs: tuple[str, ...] = ()  # what else a fresh run replaces (a prune run's pruned model)
    force: bool = False  # set by open(): a fresh run may replace an earlier run's files

    def open(self, inputs: tuple = (), resume: bool = False, force: bool = False) -> bool:
        """Check the folder before any work; True when a checkpoint will be resumed."""
        inputs = tuple(p for p in inputs if p and Path(p).exists())
        if resume and (self.path / CHECKPOINT).is_file():
            check_output_folder(self.path, self.command, inputs, force=True)  # its own run folder
            return True
        if resume and self.done and (self.path / self.done).is_file():
            raise P3BError(f"{self.path} holds a finished run ({self.done}) and no checkpoint: nothing to resume")
        if resume:
            notify(f"note: no {CHECKPOINT} in {self.path}: starting from scratch")
        check_output_folder(self.path, self.command, inputs, force=force)
        self.force = force
        return False

    @contextlib.contextmanager
    def writing(self, resuming: bool, ctx: DistContext):
        """Make the folder and hold its lock while the run writes (a second run into it is refused);
        a fresh run first removes an earlier run's state (checkpoint, log, summary and `outputs`), so
        two runs never mix. A model folder that is the run's output itself is replaced atomically
        when the new one is written, so a failed run keeps the previous model."""
        with folder_lock(self.path) if ctx.main else contextlib.nullcontext():
            if ctx.main and not resuming:
                # checked again under the lock: a run that wrote here since open() is not replaced without --force
                check_output_folder(self.path, self.command, force=self.force)
                for f in (CHECKPOINT, LOG, self.done, *self.outputs):
                    if f:
                        (self.path / f).unlink(missing_ok=True)
            barrier(ctx)
            yield self.path

    def finish(self, keep_checkpoint: bool, ctx: DistContext) -> None:
        """A complete run removes its checkpoint (often 10–30× the model) unless asked to keep it."""
        if ctx.main and not keep_checkpoint:
            (self.path / CHECKPOINT).unlink(missing_ok=True)
        barrier(ctx)


class RunLog:
    """JSON-lines records of a run, written by rank 0."""

    def __init__(self, path: Path | None, ctx: DistContext) -> None:
        self.path, self.ctx = path, ctx

    def append(self, record: dict) -> None:
        if self.path is not None and self.ctx.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def count(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path is not None and self.path.is_file() else 0

    def trim(self, count: int) -> None:
        """Keep the first `count` records (a killed run logged steps it will replay)."""
        if self.path is None or not self.ctx.main or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()[:count]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        os.replace(tmp, self.path)


class Checkpoints:
    """Where a run's checkpoint goes, and what a resume must match."""

    def __init__(self, path: Path, settings: dict, ctx: DistContext, log: RunLog | None = None) -> None:
        self.path, self.ctx, self.log = path, ctx, log
        self.settings = json.loads(json.dumps(settings))  # JSON-normalised (tuples → lists)

    def save(self, epoch: int, batch: int, state: dict) -> None:
        rng = gather_rng(self.ctx)  # a collective: every rank takes part
        if self.ctx.main:
            write_checkpoint(
                self.path,
                {
                    "epoch": epoch,
                    "batch": batch,
                    "state": state,
                    "rng": rng,
                    "world": self.ctx.world,
                    "log_records": self.log.count() if self.log else 0,
                    "settings": json.dumps(self.settings, sort_keys=True),
                },
            )
        barrier(self.ctx)

    def restore(self, load: Callable[[dict], None]) -> tuple[int, int]:
        """Load the checkpoint's state through `load`; returns (epochs done, batches into the next)."""
        ck = read_checkpoint(self.path)
        check_resume_settings(self.path, json.loads(ck["settings"]) if "settings" in ck else None, self.settings)
        if ck.get("world", 1) != self.ctx.world:
            raise P3BError(f"{self.path} was written by {ck.get('world', 1)} ranks; resume with the same number")
        try:
            load(ck["state"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise P3BError(f"{self.path} does not fit this run ({first_line(exc)}); delete it to start over") from exc
        set_rng_state(ck["rng"][self.ctx.rank])
        if self.log is not None and "log_records" in ck:
            self.log.trim(int(ck["log_records"]))
        return int(ck["epoch"]), int(ck["batch"])


def install_stop_handlers(flag: dict) -> dict:
    """SIGTERM/SIGINT set `flag["signal"]` instead of killing; returns the old handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, lambda num, frame: flag.update(signal=signal.Signals(num).name))
    return old


def restore_handlers(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def stop_requested(flag: dict, ctx: DistContext) -> bool:
    """True on every rank once any rank got a stop signal (so all ranks checkpoint the same batch)."""
    stop = torch.tensor([1.0 if flag else 0.0])
    all_reduce_sum_([stop], ctx)
    return bool(stop.item() > 0)


@dataclass
class EpochLoop:
    """What a run does per batch and per epoch; `run_epochs` does the rest."""

    epochs: int
    loader: Callable[[int, int], Iterable]  # (epoch, first batch) → the epoch's remaining batches
    step: Callable[[int, Any], dict]  # (epoch, batch) → stats for the progress bar ("loss" a float)
    end_epoch: Callable[[int, int], str | None]  # (epoch, batches in it) → evaluate, log; the epoch's line
    state: Callable[[], dict]  # what a checkpoint holds
    desc: str = "train"
    progress: bool = True
    lr_note: str | None = None  # what the run trains with; None: no warning when the first epochs' loss stays flat
    watch_epochs: int = 1  # the loss is watched over these first epochs (warm-up epochs and one more)


WATCHED_STEPS = 20  # fewer watched steps: too few to tell a flat loss from noise
ESTIMATE_ABOVE_S = 20.0  # runs estimated to take longer say so after their first steps
TIMED_STEPS = 10  # steps timed for the estimate (after one untimed step)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Watch:
    """The time estimate after the first steps and the warning when the loss did not fall over the
    first epoch after warm-up (a ramping lr barely moves the loss: those epochs are watched too)."""

    def __init__(self, loop: EpochLoop, epoch: int, first: int, remaining: int | None) -> None:
        self.loop, self.fresh = loop, epoch == 0 and first == 0
        self.steps_left = None if remaining is None else remaining + (loop.epochs - epoch - 1) * (remaining + first)
        self.losses: list[float] = []
        self.seen, self.t0, self.epoch = 0, 0.0, epoch

    def after_step(self, stats: dict) -> None:
        import time

        self.seen += 1
        if self.fresh and self.epoch < self.loop.watch_epochs and isinstance(stats.get("loss"), float):
            self.losses.append(stats["loss"])
        if self.seen == 1:
            self.t0 = time.perf_counter()
        elif self.seen == TIMED_STEPS + 1 and self.steps_left:
            per_step = (time.perf_counter() - self.t0) / TIMED_STEPS
            total = per_step * self.steps_left
            if total >= ESTIMATE_ABOVE_S:
                notify(
                    f"{self.loop.desc}: {self.steps_left:,} steps × {per_step:.3f} s/step ≈ {_duration(total)} "
                    f"(measured on the first steps; evaluations come on top)"
                )

    def after_epoch(self) -> None:
        self.epoch += 1
        n = min(self.loop.watch_epochs, self.loop.epochs)
        if not self.fresh or self.epoch < n:
            return
        self.fresh = False
        if len(self.losses) < WATCHED_STEPS or self.loop.lr_note is None:
            return
        k = max(2, len(self.losses) // 5)
        a, b = sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k
        if b >= 0.99 * a:
            when = "in epoch 1" if n == 1 else f"in epochs 1–{n} (warm-up included)"
            notify(
                f"warning: the training loss did not fall {when} ({a:.3f} → {b:.3f}): the {self.loop.lr_note} "
                "may be too low (or too high) for this model and data; see --lr and --recipe"
            )


def run_epochs(
    loop: EpochLoop,
    ctx: DistContext,
    checkpoints: Checkpoints | None = None,
    start: tuple[int, int] = (0, 0),
    stop_after_epoch: int | None = None,
) -> int | None:
    """Run the remaining epochs from `start`; None when all ran, else the epoch `stop_after_epoch`
    (a testing hook that ends the run early, as a crash would) stopped it after.

    With `checkpoints`: a checkpoint after every epoch, and on SIGTERM/SIGINT one at the current
    batch followed by `Interrupted` (a one-line message naming `--resume`). The main rank prints
    each epoch's line (with or without progress bars), an estimate of the run's time after its first
    steps when it is long, and a warning when the loss did not fall in the first epoch.
    """
    flag: dict = {}
    old = install_stop_handlers(flag) if checkpoints else {}
    epoch, first = start
    watch = None
    try:
        while epoch < loop.epochs:
            batches = loop.loader(epoch, first)
            if watch is None and ctx.main:
                watch = _Watch(loop, epoch, first, len(batches) if isinstance(batches, Sized) else None)
            bar = progress(batches, desc=f"{loop.desc} {epoch + 1}/{loop.epochs}", enabled=loop.progress and ctx.main)
            done = first
            for done, batch in enumerate(bar, start=first + 1):
                stats = loop.step(epoch, batch)
                bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in stats.items()})
                if watch is not None:
                    watch.after_step(stats)
                if checkpoints and stop_requested(flag, ctx):
                    checkpoints.save(epoch, done, loop.state())
                    raise Interrupted(
                        f"stopped by {flag.get('signal', 'a signal on another rank')} at epoch "
                        f"{epoch + 1}, batch {done}; checkpoint written to {checkpoints.path}, "
                        "continue with --resume"
                    )
            line = loop.end_epoch(epoch, done)
            if ctx.main and line:
                notify(f"{loop.desc} epoch {epoch + 1}/{loop.epochs}: {line}")
            if watch is not None:
                watch.after_epoch()
            epoch, first = epoch + 1, 0
            if checkpoints:
                checkpoints.save(epoch, 0, loop.state())
            if stop_after_epoch is not None and stop_after_epoch <= epoch < loop.epochs:
                return epoch
    finally:
        restore_handlers(old)
    return None
