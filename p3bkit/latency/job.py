"""`p3bkit latency-table` end to end: build the model, measure, check on unseen models, write."""

from __future__ import annotations

from pathlib import Path

from p3bkit.errors import P3BError
from p3bkit.fileio import check_writable
from p3bkit.latency.table import LatencyTable


def run_latency_table(
    model_ref: str, out: str | Path, cfg_kw: dict, check: int = 0, model_kwargs: dict | None = None, force: bool = False
) -> tuple[LatencyTable, list[float]]:
    """Measure MODEL's table on this machine; `check` > 0 also times that many unseen random pruned
    models and stores the prediction errors in the table. Nothing is written unless all of it worked.

    Latency depends on the architecture only, so the model is built with random weights."""
    import numpy as np

    from p3bkit.latency.check import validate_table
    from p3bkit.latency.measure import TableConfig, in_fresh_process, measure_latency_table
    from p3bkit.models.arch import ARCH_FILE, read_arch
    from p3bkit.models.factory import build_user_model

    out = Path(out)
    if out.is_dir():
        raise P3BError(f"{out} is a folder; give the table's file name, e.g. {out / 'latency.json'}")
    if out.exists() and not force:
        raise P3BError(f"{out} exists; use --force to replace it")
    check_writable(out.parent)
    if (Path(model_ref) / ARCH_FILE).is_file() and read_arch(model_ref).layers:
        raise P3BError(
            f"{model_ref} is a pruned model; measure the table of the dense model it came from "
            f"({read_arch(model_ref).source.name})"
        )
    cfg = TableConfig(**cfg_kw)
    model = build_user_model(model_ref, kwargs=model_kwargs).eval()
    table = measure_latency_table(model, model_ref, cfg)
    errors: list[float] = []
    if check:
        rows = in_fresh_process(validate_table, model, table, cfg, check)
        errors = [r["error"] for r in rows]
        e = np.abs(np.asarray(errors))
        table.protocol["check"] = {
            "models": check,
            "median_abs_error": float(np.median(e)),
            "max_abs_error": float(e.max()),
            "rows": rows,
        }
    table.save(out)
    return table, errors
