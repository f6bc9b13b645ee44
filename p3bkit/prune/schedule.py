"""The P3B phase schedule (Appendix C, Table 5): warm-up → sparsify → sharpen.

Warm-up: dense, the BPI learns. Sparsify: keep ratios ramp linearly from 1 to their targets at
τ = τ_max. Sharpen: targets reached, τ falls linearly from τ_max to 0 (hard masks at the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Phase = Literal["warmup", "sparsify", "sharpen", "done"]


@dataclass(frozen=True)
class Schedule:
    warmup_steps: int
    sparsify_steps: int
    sharpen_steps: int
    tau_max: float = 0.1

    @property
    def total(self) -> int:
        return self.warmup_steps + self.sparsify_steps + self.sharpen_steps

    def at(self, step: int) -> tuple[Phase, float, float]:
        """(phase, keep-ratio progress in [0, 1], τ) at global step `step` (0-based)."""
        if step < self.warmup_steps:
            return "warmup", 0.0, self.tau_max
        s = step - self.warmup_steps
        if s < self.sparsify_steps:
            return "sparsify", (s + 1) / self.sparsify_steps, self.tau_max
        s -= self.sparsify_steps
        if s < self.sharpen_steps:
            return "sharpen", 1.0, self.tau_max * (1 - (s + 1) / self.sharpen_steps)
        return "done", 1.0, 0.0
