"""Checks of a latency table against whole models it never saw (issue 12).

`validate_table`: random head-dim/hidden-pruned architectures, timed whole (exported the way
`p3bkit export` does), against the table's prediction. `check_speedups`: P3B's latency allocation
(prune/budget.py `LatencyBudget`, importance from random ΔΨ — this checks the latency side, not
accuracy) asked for given speedups; the chosen architectures are timed with the dense model.
Both are meant to run in a process of their own (`in_fresh_process`).
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from p3bkit.bench.harness import torch_threads
from p3bkit.bench.latency_table import TableConfig, prepare_module, random_layers, time_prepared, time_whole_models
from p3bkit.models.latency import LatencyTable


def validate_table(model: nn.Module, table: LatencyTable, cfg: TableConfig, count: int = 20,
                   seed: int = 1000) -> list[dict]:
    """Time `count` random pruned versions of `model` whole and compare with the table's prediction."""
    from p3bkit.models.adapter import inspect_vit

    spec = inspect_vit(model)
    rng = np.random.default_rng(seed)
    archs = [random_layers(spec, rng) for _ in range(count)]
    out = []
    for layers, ms in zip(archs, time_whole_models(model, cfg, archs)):
        pred = table.predict(layers)
        out.append({"measured_ms": ms, "predicted_ms": pred, "error": (pred - ms) / ms,
                    "head_dims": [len(l["attn"]["head_dim"]) if l["attn"] else 0 for l in layers],
                    "hidden": [len(l["mlp"]["hidden"]) if l["mlp"] else 0 for l in layers]})
    return out


def allocate_for_speedup(model: nn.Module, table: LatencyTable, speedup: float, seed: int) -> nn.Module:
    """P3B's latency allocation for `speedup` over the table's dense model, from random ΔΨ."""
    from p3bkit.models import add_gates
    from p3bkit.prune.engine import P3BConfig, P3BPruner
    from p3bkit.prune.schedule import Schedule
    from p3bkit.surgery import apply_surgery

    gated = add_gates(copy.deepcopy(model), "inner")
    cfg = P3BConfig(target_ms=table.dense_ms / speedup)
    pruner = P3BPruner(gated, cfg, Schedule(0, 1, 0), latency_table=table)
    gen = torch.Generator().manual_seed(seed)
    n = len(pruner.branches)
    pruner.delta_c.copy_(torch.rand(n, generator=gen))
    pruner.delta_p.copy_(torch.rand(n, generator=gen))
    pruner.delta_count.fill_(1)
    for gate in gated.gates.values():  # Taylor scores: random, so unit choice is arbitrary (latency only)
        gate.score_sum.copy_(torch.rand(gate.size, generator=gen))
        gate.score_count.fill_(1)
    pruner.step.fill_(1)
    pruner.update_masks()  # the last step of the schedule: κ at its target, hard masks
    return apply_surgery(gated.eval(), io_mode="auto")


def check_speedups(model: nn.Module, table: LatencyTable, cfg: TableConfig, speedups: list[float]) -> list[dict]:
    """Allocate for each asked speedup, then time dense and pruned models interleaved."""
    image = torch.randn(cfg.batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    pruned = [allocate_for_speedup(model, table, s, i) for i, s in enumerate(speedups)]
    with torch_threads(cfg.threads), tempfile.TemporaryDirectory() as tmp:
        prepared = [prepare_module(m, image, cfg, Path(tmp), whole=True) for m in [model] + pruned]
        dense, *times = time_prepared(prepared, cfg.runs * 2, passes=3)
    rows = []
    for s, m, t in zip(speedups, pruned, times):
        predicted = table.predict(m.p3b_arch.layers)
        rows.append({"asked": s, "measured_speedup": dense / t, "predicted_ms": predicted, "measured_ms": t,
                     "dense_ms": dense, "miss": (dense / t - s) / s,
                     "head_dims": [len(l["attn"]["head_dim"]) if l["attn"] else 0 for l in m.p3b_arch.layers],
                     "hidden": [len(l["mlp"]["hidden"]) if l["mlp"] else 0 for l in m.p3b_arch.layers]})
    return rows
