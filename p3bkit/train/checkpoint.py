"""Atomic checkpoint files and RNG states (temp file + rename: a crash mid-write never leaves a bad file).

A checkpoint holds a run's state (model, optimiser, pruner …), its position (completed epochs +
batches into the current one) and every rank's RNG states, so a resumed run continues exactly
where the checkpoint was taken.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from p3bkit.errors import P3BError, first_line
from p3bkit.train.dist import DistContext


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()  # timm's Mixup draws from numpy
    return {
        "torch": torch.get_rng_state(),
        "python": list(state),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": [torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    if "numpy" in s:
        keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def gather_rng(ctx: DistContext) -> list[dict]:
    if not ctx.active:
        return [rng_state()]
    states: list = [None] * ctx.world
    dist.all_gather_object(states, rng_state())
    return states


def write_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, tampered or foreign files raise many types
        raise P3BError(
            f"{path} cannot be resumed from ({type(exc).__name__}: {first_line(exc)}); delete it to start over"
        ) from exc


def check_resume_settings(path: Path, saved: dict | None, settings: dict) -> None:
    """Refuse to resume a checkpoint written with other settings, naming the ones that differ."""
    if saved is None or saved == settings:
        return
    diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    raise P3BError(
        f"{path} was written with other settings ({', '.join(diff)} differ); resume with the same "
        "settings, or start over with --force or a new folder"
    )
