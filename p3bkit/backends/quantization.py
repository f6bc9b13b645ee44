"""What every runtime's INT8 quantiser works with, and how accuracy is measured through a runner.

`Int8Data` holds calibration and validation images as arrays (the export stage loads them from
the user's data); a backend's `quantize` returns a `QuantResult` (top-1 of the fp32 graph and of
the INT8 artefact through the runtime, what stayed in fp32, every attempt); the export stage's
gate judges it. `runner_top1` is the one accuracy loop: the gate, the record and `p3bkit eval`
score an artefact with it, so they agree on the same images.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from p3bkit.errors import ExportError


def fixed_batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    """`x` cut into batches of exactly `size` for a static-batch graph, the last one filled by
    repeating images (callers keep the first `len(x)` outputs)."""
    return [np.resize(x[i : i + size], (size, *x.shape[1:])) for i in range(0, len(x), size)]


def batches(x: np.ndarray, size: int, static_batch: int | None = None) -> list[np.ndarray]:
    """`x` in batches of `size`, or of exactly `static_batch` when the graph has a fixed batch."""
    return fixed_batches(x, static_batch) if static_batch else [x[i : i + size] for i in range(0, len(x), size)]


def run_logits(runner, x: np.ndarray, batch: int = 64, static_batch: int | None = None) -> np.ndarray:
    """The first output (logits) of `runner` on every image of `x`, in batches."""
    outs = [np.asarray(next(iter(runner(b).values())), dtype=np.float32) for b in batches(x, batch, static_batch)]
    return np.concatenate(outs)[: len(x)] if outs else np.zeros((0,), dtype=np.float32)


def top_hits(logits: np.ndarray, y: np.ndarray, k: int = 5) -> tuple[int, int]:
    """How many rows of `logits` have their label `y` first, and within the first `k` (ties broken as
    argmax breaks them: the lower class first; ties are common in INT8 logits)."""
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return int((top[:, 0] == y).sum()), int((top == y[:, None]).any(-1).sum())


def runner_top1(runner, x: np.ndarray, y: np.ndarray, batch: int = 64, static_batch: int | None = None) -> float:
    """Top-1 in percent of a runner on images `x` with labels `y`."""
    if not len(y):
        return 0.0
    return 100.0 * top_hits(run_logits(runner, x, batch, static_batch), y, k=1)[0] / len(y)


@dataclass
class Int8Data:
    """Calibration and validation images at the model's input size, and the gate's limit."""

    calib: np.ndarray  # [N, C, H, W] float32
    val_x: np.ndarray
    val_y: np.ndarray
    max_drop: float = 1.0  # top-1 points; above it a quantiser applies its remedy
    static_batch: int | None = None  # a graph with a fixed batch takes exactly this many images

    def chunks(self, x: np.ndarray, size: int) -> list[np.ndarray]:
        """`x` in batches of `size` (of the static batch, when the graph has one; the last one
        padded, callers trim to `len(x)`)."""
        return batches(x, size, self.static_batch)

    def top1(self, runner, batch: int = 64) -> float:
        return runner_top1(runner, self.val_x, self.val_y, batch, self.static_batch)


@dataclass
class QuantResult:
    """What a quantiser did: both accuracies through the runtime, what stayed in fp32, every attempt."""

    fp32_top1: float
    int8_top1: float
    kept_in_fp32: list[str] = field(default_factory=list)
    remedy: str = "nothing (within the gate)"
    attempts: list[dict] = field(default_factory=list)
    op_profile: dict = field(default_factory=dict)  # ms per op type (kernel), fp32 graph vs INT8 artefact

    @property
    def drop(self) -> float:
        return self.fp32_top1 - self.int8_top1

    def check(self, max_drop: float) -> None:
        """The accuracy gate: raise when the drop is above `max_drop` top-1 points (nothing is written)."""
        if self.drop > max_drop:
            raise ExportError(
                f"INT8 accuracy gate failed: top-1 {self.int8_top1:.2f}% vs {self.fp32_top1:.2f}% in "
                f"fp32 (drop {self.drop:.2f} > --max-drop {max_drop:g}) after {self.remedy}; "
                "nothing was written"
            )


def keep_worst_in_fp32(
    fp32: float, int8: float, ranked: list[str], max_drop: float, quantize_keeping
) -> tuple[float, list[str], list[dict]]:
    """The remedy every CPU quantiser shares: while the drop is above `max_drop`, quantise again keeping
    the 1, 2, 4 … layers of `ranked` (most error-adding first) in fp32, at most a quarter of them.
    `quantize_keeping(kept)` writes the artefact and returns its top-1. Returns the last top-1, the
    layers kept and every attempt."""
    attempts, kept, k = [{"kept": 0, "int8_top1": int8}], [], 1
    while ranked and fp32 - int8 > max_drop and k <= max(1, len(ranked) // 4):
        kept = ranked[:k]
        int8 = quantize_keeping(kept)
        attempts.append({"kept": len(kept), "int8_top1": int8})
        k *= 2
    return int8, kept, attempts


def remedy_name(attempts: list[dict]) -> str:
    return (
        "nothing (within the gate)"
        if len(attempts) == 1
        else f"keeping up to {attempts[-1]['kept']} most error-adding layers in fp32"
    )


def op_profile(fp32, int8, runs: int = 20, top: int = 10) -> dict:
    """Where the time goes in the fp32 graph and in its INT8 artefact (the runtime's per-op
    profiler, batch of the timers, `runs` runs): the `top` op types of each and both totals."""
    out = {"runs": runs, "runtime": fp32.backend}
    for name, timed in (("fp32", fp32), ("int8", int8)):
        ms = timed.profile(runs) if timed.profile else {}
        out[name] = dict(sorted(ms.items(), key=lambda kv: -kv[1])[:top])
        out[f"{name}_total_ms"] = sum(ms.values())
    return out


@contextlib.contextmanager
def quiet():
    """Quantisers print progress bars and INFO lines; restored afterwards."""
    logs = [logging.getLogger(), logging.getLogger("nncf")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
