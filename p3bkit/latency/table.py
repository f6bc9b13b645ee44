"""Latency tables: what each residual branch of a ViT costs, in milliseconds, on one runtime.

A table holds, for one model shape, one backend, device, batch size and precision, measured on
one machine (`p3bkit latency-table`, `p3bkit.latency.measure`):

- `fixed_ms`: the model with every branch removed (patch embedding, tokens, final norm, head);
- `attn_ms[h][j]`: one attention branch (norm → qkv → softmax(QKᵀ)V → proj → residual add) with
  `heads[h]` heads of width `head_dims[j]`;
- `mlp_ms[j]`: one MLP branch (norm → fc1 → GELU → fc2 → residual add) of hidden width `hidden[j]`.

A pruned model is predicted as fixed + Σ branches (an emptied branch costs nothing), with linear
interpolation between grid points. Batch-1 CPU latency is a staircase in width (oneDNN/MLAS
blocking): `branch_curve` and `attn_grid` give the cost the allocation works with, charging a width
between two measured ones the next measured one's time (non-decreasing), so the width the
allocation keeps for that cost is the measured one, where prediction and table agree.

This module is plain data (no runtime imports): prune reads tables, `latency.measure` makes them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from p3bkit.errors import P3BError

TABLE_SCHEMA = 1
MAX_CHECK_ERROR = 0.15  # a table whose checked median error is above this warns when made; prune refuses it


@dataclass
class LatencyTable:
    """Branch costs of one model shape on one runtime (see module doc)."""

    model: str
    dims: dict  # dim, depth, num_heads, head_dim, mlp_hidden, num_tokens
    backend: str
    device: str
    batch: int
    precision: str
    threads: int
    machine: dict  # cpu, gpu, versions (machine_info)
    fixed_ms: float
    dense_ms: float  # the unpruned model, measured whole
    heads: list[int]
    head_dims: list[int]
    attn_ms: list[list[float]]  # [len(heads)][len(head_dims)]
    hidden: list[int]
    mlp_ms: list[float]
    protocol: dict = field(default_factory=dict)
    # whole = fixed + scale·Σ isolated branches + per_branch_ms·(branches kept), fitted on whole
    # random pruned models (`latency.measure.calibrate` says why isolated branches alone fall short)
    scale: float = 1.0
    per_branch_ms: float = 0.0
    schema: int = TABLE_SCHEMA

    def __post_init__(self) -> None:
        # branch cost never falls with width: a measured dip is timing noise, so each grid row is
        # replaced by its least-squares non-decreasing fit (pool adjacent violators)
        self._attn = [isotonic(r) for r in self.attn_ms]
        self._mlp = isotonic(self.mlp_ms)

    @property
    def check_error(self) -> float | None:
        """The median absolute prediction error its `--check` measured (a fraction), None when unchecked."""
        check = self.protocol.get("check")
        return None if not check else float(check["median_abs_error"])

    def attn(self, heads: int, head_dim: int) -> float:
        """One attention branch with `heads` heads of width `head_dim` (0 when either is 0)."""
        if heads <= 0 or head_dim <= 0:
            return 0.0
        rows = [float(np.interp(head_dim, self.head_dims, r)) for r in self._attn]
        if len(self.heads) == 1:
            return rows[0] * heads / self.heads[0] if heads != self.heads[0] else rows[0]
        return float(np.interp(heads, self.heads, rows))

    def mlp(self, hidden: int) -> float:
        """One MLP branch with `hidden` units (0 when 0)."""
        return 0.0 if hidden <= 0 else float(np.interp(hidden, self.hidden, self._mlp))

    def branch_curve(self, kind: str, n: int) -> np.ndarray:
        """Cost of a branch keeping k = 0..n units (head dims at the model's head count, or hidden
        units); non-decreasing, so the widest width at a given cost is the one to keep.

        A width between two measured ones costs the next measured one's time: runtimes cost in
        blocks, and linear interpolation between grid points under-charged every width off the grid
        (a latency budget then landed faster than asked). The allocation keeps the right edge of
        each flat run, a measured width."""
        points = self.head_dims if kind == "attn" else self.hidden
        raw = [self.branch_ms(kind, _measured(points, k)) if k else 0.0 for k in range(n + 1)]
        return np.maximum.accumulate(np.asarray(raw, dtype=np.float64))

    @property
    def has_head_axis(self) -> bool:
        """Measured over head counts (`--heads all`), not only at the model's own."""
        return len(self.heads) > 1

    def attn_grid(self) -> np.ndarray:
        """Cost of an attention branch keeping h = 0..H heads of d = 0..head_dim dims, [H+1, d+1];
        non-decreasing along both axes (a dip is noise), 0 for a removed branch."""
        H, d = self.dims["num_heads"], self.dims["head_dim"]
        snap = (lambda h: _measured(self.heads, h)) if self.has_head_axis else (lambda h: h)  # noqa: E731
        grid = np.array(
            [
                [
                    self.branch_ms("attn", _measured(self.head_dims, k), snap(h)) if k and h else 0.0
                    for k in range(d + 1)
                ]
                for h in range(H + 1)
            ]
        )
        return np.maximum.accumulate(np.maximum.accumulate(grid, axis=0), axis=1)

    def predict(self, layers: list[dict] | None = None) -> float:
        """Predicted ms of a model: `layers` as in `PrunedArch.layers` (None or [] = dense)."""
        raw, kept = self.branch_sum(layers)
        return self.fixed_ms + self.scale * raw + self.per_branch_ms * kept

    def branch_sum(self, layers: list[dict] | None = None) -> tuple[float, int]:
        """(Σ isolated branch ms, number of branches kept) of a model (None or [] = dense)."""
        if not layers:
            d = self.dims
            return d["depth"] * (self.attn(d["num_heads"], d["head_dim"]) + self.mlp(d["mlp_hidden"])), 2 * d["depth"]
        total, kept = 0.0, 0
        for i, layer in enumerate(layers):
            attn, mlp = layer.get("attn"), layer.get("mlp")
            for branch in (attn, mlp):
                if branch and (len(branch["in"]) < self.dims["dim"] or len(branch["out"]) < self.dims["dim"]):
                    raise P3BError(
                        f"layer {i} reads or writes a subset of the residual channels; latency tables "
                        "model heads, head dims and hidden units only (--structure inner or heads)"
                    )
            heads = len(attn["heads"]) if attn and "heads" in attn else self.dims["num_heads"]
            total += self.attn(heads, len(attn["head_dim"])) if attn else 0.0
            total += self.mlp(len(mlp["hidden"])) if mlp else 0.0
            kept += bool(attn) + bool(mlp)
        return total, kept

    def branch_ms(self, kind: str, width: int, heads: int | None = None) -> float:
        """What one branch adds to the whole model's time (calibrated): 0 when removed. `heads`:
        attention heads kept (default: the model's head count)."""
        heads = self.dims["num_heads"] if heads is None else heads
        if width <= 0 or heads <= 0:
            return 0.0
        raw = self.attn(heads, width) if kind == "attn" else self.mlp(width)
        return self.scale * raw + self.per_branch_ms

    def check_model(self, dims: dict, name: str = "the model") -> None:
        """Refuse a table made for another model shape."""
        keys = ("dim", "depth", "num_heads", "head_dim", "mlp_hidden", "num_tokens")
        diff = [f"{k} {self.dims.get(k)} vs {dims.get(k)}" for k in keys if self.dims.get(k) != dims.get(k)]
        if diff:
            raise P3BError(
                f"the latency table was measured for {self.model} and does not fit {name} ({'; '.join(diff)}); "
                f"measure one for it: p3bkit latency-table MODEL --backend {self.backend}"
            )

    def check_machine(self, here: dict) -> None:
        """Refuse a table measured on another CPU/GPU or runtime version (threads are the table's own setting).

        The CPU is its name, id and kernel instruction sets (`backends.machine_info`): hosts sold under
        one name ("AMD EPYC") differ in the kernels a runtime picks. A table made before the id was
        recorded is compared by name and said so."""
        diff = []
        for key in ("cpu", "gpu", "cores"):
            if self.machine.get(key) != here.get(key):
                diff.append(f"{key}: table {self.machine.get(key)!r}, here {here.get(key)!r}")
        for key in ("cpu_id", "isa"):
            mine, theirs = self.machine.get(key), here.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                diff.append(f"{key}: table {mine!r}, here {theirs!r}")
        if here.get("cpu_id") is not None and self.machine.get("cpu_id") is None:
            from p3bkit.console import notify

            notify(
                f"note: this latency table records its CPU by name only ({self.machine.get('cpu')!r}); hosts of "
                "one name can differ in the kernels a runtime uses, so its times hold only if it was made on "
                "this CPU kind"
            )
        from p3bkit.backends import get_backend

        pkg = get_backend(self.backend).packages[0].split(".")[0]  # the runtime's own package
        mine, theirs = (
            str(v).split("+")[0] if v else v
            for v in (self.machine.get("versions", {}).get(pkg), here.get("versions", {}).get(pkg))
        )
        if mine != theirs:  # local build tags (torch's "+cu121") are not part of the version compared
            diff.append(f"{pkg}: table {mine}, here {theirs}")
        if diff:
            raise P3BError(
                "the latency table was measured on another machine or runtime ("
                + "; ".join(diff)
                + f"); measure one here: p3bkit latency-table {self.model} --backend {self.backend}"
            )

    def save(self, path: str | os.PathLike) -> Path:
        from p3bkit.fileio import write_json_atomic

        return write_json_atomic(path, asdict(self))  # the measured values; the fits are rebuilt on load

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise P3BError(f"cannot read latency table {path}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(data, dict) or data.get("schema") != TABLE_SCHEMA:
            raise P3BError(
                f"{path} is not a p3bkit latency table (schema {TABLE_SCHEMA}); make one with p3bkit latency-table"
            )
        try:
            table = cls(**data)
        except TypeError as exc:
            raise P3BError(f"{path}: malformed latency table ({exc})") from exc
        if (
            len(table.attn_ms) != len(table.heads)
            or any(len(r) != len(table.head_dims) for r in table.attn_ms)
            or len(table.mlp_ms) != len(table.hidden)
        ):
            raise P3BError(f"{path}: malformed latency table (grid and values differ in size)")
        return table


def _measured(points: list[int], width: int) -> int:
    """The smallest measured width ≥ `width` (the widest measured one beyond the grid)."""
    i = int(np.searchsorted(np.asarray(points), width, side="left"))
    return int(points[min(i, len(points) - 1)])


def isotonic(values: list[float]) -> np.ndarray:
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks]) if blocks else np.zeros(0)


def model_dims(spec) -> dict:
    """The shape keys a table is made for, from a `ViTSpec`."""
    return {
        "dim": spec.dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "head_dim": spec.head_dim,
        "mlp_hidden": spec.mlp_hidden,
        "num_tokens": spec.num_tokens,
    }
