"""Checks of a latency table against whole models it never saw.

`validate_table`: random pruned architectures, timed whole (exported the way `p3bkit export`
does), against the table's prediction. Meant to run in a process of its own (`in_fresh_process`).
P3B's allocation checked against asked speedups is `p3bkit.bench.speedups` (it needs the pruner).
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from p3bkit.latency.measure import TableConfig, random_layers, time_whole_models
from p3bkit.latency.table import LatencyTable


def validate_table(
    model: nn.Module, table: LatencyTable, cfg: TableConfig, count: int = 20, seed: int = 1000
) -> list[dict]:
    """Time `count` random pruned versions of `model` whole and compare with the table's prediction."""
    from p3bkit.models.adapter import inspect_vit

    spec = inspect_vit(model)
    rng = np.random.default_rng(seed)
    archs = [random_layers(spec, rng, table.has_head_axis) for _ in range(count)]
    out = []
    for layers, ms in zip(archs, time_whole_models(model, cfg, archs)):
        pred = table.predict(layers)
        out.append(
            {
                "measured_ms": ms,
                "predicted_ms": pred,
                "error": (pred - ms) / ms,
                "head_dims": [len(l["attn"]["head_dim"]) if l["attn"] else 0 for l in layers],
                "heads": [len(l["attn"].get("heads", range(spec.num_heads))) if l["attn"] else 0 for l in layers],
                "hidden": [len(l["mlp"]["hidden"]) if l["mlp"] else 0 for l in layers],
            }
        )
    return out
