"""Speed checks: the architecture a latency budget is heading for, timed on the table's runtime.

A latency table predicts random pruned models to a few percent, but the allocation picks the
architectures the table thinks cheapest, and there its error can lean one way: on DeiT-S the
onnxruntime table's allocations ran 4.7–7.3% slower than asked. During sparsify the allocation's
targets (κ at the end of the ramp) already say which widths the run ends at. At the first mask
update past each check point of sparsify (½, ¾, ⅞, … of it) those widths are built, exported like
`p3bkit export` and timed beside the dense model on the table's runtime, in a process of their own
(`latency.measure.time_beside_dense`). The runtime's speedup over the table's, r = measured over
predicted speedup, is averaged over the run's checks (r̄), and the target becomes the time at which
the table predicts S*/r̄, i.e. t ← p · r̄ · P / S* with p, P the plan's predicted time and speedup
(at most ×1.5 or ÷1.5 a check); the next updates allocate for what the runtime does rather than
what the table says. A check that fails (the runtime refuses a graph, the timing process dies) is
logged and keeps the target; so does one whose dense model stays > 10% slower than its steadiest
time over three tries (a busy host: `steady_time`). What is held is a speedup over the dense model
timed beside the pruned one (`--target-latency-ms` as the speedup it means over the table's dense
model), so a host that runs faster or slower today than the day the table was made changes
nothing. After the run the pruned model is timed the same way and summary.json reports its
measured speedup. No check runs after sparsify: sharpen trains the widths it was given.
"""

from __future__ import annotations

import torch.nn as nn

from p3bkit.errors import P3BError

MAX_STEP = 1.5  # the most one check may scale the target by (a noisy timing cannot throw the run off)
BUSY = 1.10  # a dense time this much above the steadiest one seen: the host is busy, time again
TRIES = 3  # timings per check before it gives up on a busy host (and keeps the target)


def check_points(rounds: int) -> list[float]:
    """Sparsify progress at which the checks run: ½, ¾, ⅞, …"""
    return [1 - 0.5**i for i in range(1, rounds + 1)]


def corrected_target(target_ms: float, measured_speedup: float, asked_speedup: float) -> float:
    """The target for the next allocation: scaled by measured over asked speedup (t ∝ 1/speedup),
    at most `MAX_STEP` either way."""
    factor = min(max(measured_speedup / asked_speedup, 1 / MAX_STEP), MAX_STEP)
    return target_ms * factor


def steady_time(
    dense: nn.Module, table, archs: list[list[dict]], runs: int, reference_ms: float, tries: int = TRIES
) -> tuple[float, list[float], bool]:
    """(dense ms, ms of each architecture, busy): timed beside the dense model, again while the
    dense model runs more than `BUSY` × `reference_ms` (the steadiest dense time known), at most
    `tries` times; busy says the last try was still slow.

    Measured on a shared 2-core host: while a neighbour held the CPU, dense DeiT-S ran 24.8 instead
    of 21.6 ms and a 6×-pruned model ran 5.1× its speed instead of 6.3× — contention slows small
    models more than large ones, so a ratio taken on a busy host is wrong, not merely noisy."""
    from p3bkit.latency.measure import time_beside_dense

    for _ in range(tries):
        dense_ms, times = time_beside_dense(dense, table, archs, runs)
        if dense_ms <= BUSY * reference_ms:
            return dense_ms, times, False
    return dense_ms, times, True


class SpeedChecks:
    """`rounds` speed checks during sparsify, and the measured speedup of the result (module doc)."""

    def __init__(self, dense: nn.Module | None, table, asked_ms: float, rounds: int, runs: int = 100) -> None:
        """`dense`: the model the checks time pruned versions beside (None on a rank that times nothing:
        under torchrun rank 0 times, the others only follow the schedule of checks)."""
        self.dense, self.table, self.rounds, self.runs = dense, table, rounds, runs
        self.asked_speedup = table.dense_ms / asked_ms
        self.done = 0  # check points passed
        self.records: list[dict] = []  # every check's row (summary.json)
        self.reference_ms = table.dense_ms  # the steadiest dense time seen (the table's, then the checks')

    def due(self, phase: str, progress: float) -> bool:
        """Whether the mask update at this schedule position is a check's (the next point passed)."""
        return (
            phase == "sparsify"
            and progress < 1
            and self.done < self.rounds
            and progress >= check_points(self.rounds)[self.done]
        )

    def time(self, layers: list[dict]) -> dict:
        """Measured and predicted speedup of `layers` over the dense model timed beside it
        (`host_busy`: the dense model stayed > 10% slower than its steadiest time, `steady_time`)."""
        if self.dense is None:
            raise P3BError("speed checks time on the rank that holds the dense model (rank 0)")
        dense_ms, (ms,), busy = steady_time(self.dense, self.table, [layers], self.runs, self.reference_ms)
        if not busy:
            self.reference_ms = min(self.reference_ms, dense_ms)
        predicted = self.table.predict(layers)
        return {
            "dense_ms": dense_ms,
            "pruned_ms": ms,
            "measured_speedup": dense_ms / ms,
            "predicted_ms": predicted,
            "predicted_speedup": self.table.dense_ms / predicted,
            "host_busy": busy,
        }

    def check(self, layers: list[dict], target_ms: float) -> dict:
        """Time the planned architecture, keep its row in `records`; the corrected target and what
        was measured.

        The correction is the runtime's speedup over the table's, r = measured / predicted speedup,
        averaged over this run's checks (a check's r scatters by ±3–5% on a shared host; the
        architectures checked differ little, so their r is one number measured again), applied to
        the plan's own predicted time, not the target: the plan may be faster than the target (a
        parameter budget bound it, or widths landed below a latency step), and its prediction is
        what the measurement speaks about."""
        row = self.time(layers)
        ratios = [
            rec["measured_speedup"] / rec["predicted_speedup"]
            for rec in [*self.records, row]
            if not rec.get("host_busy") and "measured_speedup" in rec
        ]
        after = (
            target_ms
            if row["host_busy"] or not ratios
            else corrected_target(
                row["predicted_ms"], sum(ratios) / len(ratios) * row["predicted_speedup"], self.asked_speedup
            )
        )
        row = {
            **row,
            "runtime_over_table": sum(ratios) / len(ratios) if ratios else None,
            "asked_speedup": self.asked_speedup,
            "target_ms_before": target_ms,
            "target_ms_after": after,
        }
        self.records.append(row)
        return row

    def passed(self, progress: float) -> None:
        """Every check point up to `progress` is done (a schedule with few updates may pass several at once)."""
        points = check_points(self.rounds)
        while self.done < self.rounds and progress >= points[self.done]:
            self.done += 1

    def state_dict(self) -> dict:
        return {"done": self.done, "records": self.records, "reference_ms": self.reference_ms}

    def load_state_dict(self, state: dict) -> None:
        self.done, self.records = int(state["done"]), list(state["records"])
        self.reference_ms = float(state.get("reference_ms", self.reference_ms))
