"""`p3bkit demo`: the whole pipeline on the embedded digits set in a few minutes on 2 CPU cores.

Train a dense tiny ViT → prune it with P3B to the requested keep ratio of all parameters (the
paper's budget; the `quick` recipe) → fine-tune the dense pruned model — `p3bkit train`, `prune`
and `finetune` with their defaults, through the same library calls → compare
accuracy, parameters, FLOPs and CPU latency → export the pruned model (ONNX, OpenVINO where
installed), in fp32 and INT8 behind the accuracy gate, and time it against the dense model on every
CPU runtime here, interleaved in one process (`p3bkit bench --dense-baselines`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from p3bkit.backends.registry import FP32, INT8
from p3bkit.data import load_data
from p3bkit.errors import P3BError
from p3bkit.fileio import check_output_folder, folder_lock, write_json_atomic, write_text_atomic
from p3bkit.models import load
from p3bkit.models.report import describe
from p3bkit.prune.job import PruneJob, run_prune
from p3bkit.prune.pruner import P3BConfig
from p3bkit.prune.recipes import resolve_recipe
from p3bkit.train.fit import evaluate
from p3bkit.train.jobs import run_finetune, run_train

DEMO_FILES = (
    "dense",
    "prune",
    "pruned",
    "summary.json",
    "table.md",
    "export",
    "speed.json",
    "latency.json",
    "dense.safetensors",
    "dense_checkpoint.pt",
    "finetune_checkpoint.pt",
)  # what a demo writes (and wrote)


def cpu_latency_ms(model: torch.nn.Module, shape: tuple[int, ...], runs: int = 200) -> float:
    """Median eager-torch latency at batch 1 (ms), after warm-up (the one timing harness)."""
    import tempfile

    from p3bkit.backends import get_backend
    from p3bkit.backends.timing import median_ms

    with tempfile.TemporaryDirectory(prefix="p3bkit-demo-") as tmp:
        timed = get_backend("torch").time_module(model.eval(), torch.randn(1, *shape), Path(tmp), whole=False)
        return median_ms(timed, runs)


def run_demo(
    out: str,
    keep: float = 0.5,
    dense_epochs: int = 30,
    prune_epochs: tuple[int, int, int] = (1, 6, 6),
    finetune_epochs: int = 20,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    resume: bool = False,
    speed_runs: int = 300,
    target_speedup: float | None = None,
    table_settings: dict | None = None,
    teacher: str = PruneJob.teacher,
) -> dict:
    """Run the demo into `out` (new, empty, or an earlier demo's folder; `force` for anything else).

    Every stage checkpoints (each epoch and on SIGTERM/SIGINT); `resume` skips finished stages and
    continues the interrupted one exactly. `table_settings` (`TableConfig` fields, e.g. fewer timed
    runs) shape the latency table the demo measures. `target_speedup`: prune to a latency budget instead of
    `keep`, with a latency table of the model measured here on the fastest CPU runtime installed.
    `teacher`: prune's `--teacher` (its default distils from the dense model the demo trained).
    """
    if not 0 < keep < 1:
        raise P3BError(f"keep ratio must be in (0, 1), got {keep}")
    out_dir = Path(out)
    check_output_folder(out_dir, "demo", force=force, allowed=DEMO_FILES)
    with folder_lock(out_dir):
        return _run_demo(
            out_dir,
            keep,
            dense_epochs,
            prune_epochs,
            finetune_epochs,
            seed,
            progress,
            resume,
            speed_runs,
            target_speedup,
            table_settings,
            teacher,
        )


def _run_demo(
    out_dir: Path,
    keep: float,
    dense_epochs: int,
    prune_epochs: tuple[int, int, int],
    finetune_epochs: int,
    seed: int,
    progress: bool,
    resume: bool,
    speed_runs: int,
    target_speedup: float | None,
    table_settings: dict | None,
    teacher: str,
) -> dict:
    """`p3bkit train` → `prune` → `finetune` with their defaults (the library calls behind them), into
    out/dense, out/prune and out/pruned; then compare, export and time. Each stage is a run folder of
    its own: `resume` skips a finished one and continues an interrupted one from its checkpoint."""
    t0 = time.time()
    data = load_data("digits")
    dense_dir, pruned_dir = out_dir / "dense", out_dir / "pruned"
    if not (resume and (dense_dir / "train.json").is_file()):  # the demo's own run folders: force
        run_train(
            "digits-vit", str(dense_dir), epochs=dense_epochs, seed=seed, progress=progress, force=True, resume=resume
        )
    table = _latency_table(out_dir, resume, progress, table_settings or {}) if target_speedup else None
    r = resolve_recipe("quick", epochs=prune_epochs)
    job = PruneJob(
        out=str(out_dir / "prune"),
        model=str(dense_dir),
        epochs=r["epochs"],
        batch_size=r["batch_size"],
        seed=seed,
        progress=progress,
        latency_table=table,
        target_speedup=target_speedup,
        teacher=teacher,
        p3b=P3BConfig(keep=keep, update_every=r["update_every"], tau=r["tau"], lr_model=r["lr"], lr_bpi=r["lr_bpi"]),
    )
    done = out_dir / "prune" / "summary.json"
    if resume and done.is_file():
        prune_summary = json.loads(done.read_text())
    else:
        prune_summary = run_prune(job, resume=resume, force=True)
    if not (resume and (pruned_dir / "finetune.json").is_file()):
        run_finetune(
            str(out_dir / "prune" / "pruned"),
            str(pruned_dir),
            epochs=finetune_epochs,
            seed=seed,
            progress=progress,
            force=True,
            resume=resume,
        )
    dense, pruned = load(dense_dir), load(pruned_dir)
    speed = speed_table(out_dir, speed_runs) if speed_runs else None
    return _compare(out_dir, keep, dense, pruned, prune_summary, data, time.time() - t0, speed)


def _latency_table(out_dir: Path, resume: bool, progress: bool, settings: dict) -> str:
    """out/latency.json: digits-vit's latency table on OpenVINO (onnxruntime without it), batch 1."""
    from p3bkit.backends import default_table_backend, get_backend
    from p3bkit.latency.job import run_latency_table

    path = out_dir / "latency.json"
    if resume and path.is_file():
        return str(path)
    backend = default_table_backend()  # the fastest exporting CPU runtime installed here
    if not get_backend(backend).status()[0]:
        raise P3BError("a latency budget needs onnxruntime or OpenVINO: pip install 'p3bkit[onnx]'")
    run_latency_table("digits-vit", path, {"backend": backend, "progress": progress, **settings}, force=True)
    return str(path)


def speed_table(out_dir: Path, runs: int) -> dict:
    """Export the pruned model to each CPU runtime here, in fp32 and INT8 (calibrated on digits,
    behind the 1-point accuracy gate), for batch 1 (a fixed batch axis, as bench exports the dense
    baselines), and time every artefact against the dense model on all
    CPU runtimes (torch, onnxruntime plain and transformer-optimised, OpenVINO), interleaved."""
    from p3bkit.backends import cpu_backends, get_backend
    from p3bkit.bench import BenchConfig, run_bench
    from p3bkit.errors import BackendUnavailable
    from p3bkit.export import artefact_name, export_model
    from p3bkit.export.int8 import Int8Config

    refs, int8 = [str(out_dir / "dense"), str(out_dir / "pruned")], {}
    cpu_formats = [b.format for b in cpu_backends() if b.format]  # onnx, openvino
    for fmt in cpu_formats:
        for precision in (FP32, INT8):
            folder = out_dir / "export" / (fmt if precision == FP32 else f"{fmt}-{INT8}")
            calib = Int8Config("digits") if precision == INT8 else None
            try:
                rec = export_model(
                    str(out_dir / "pruned"), fmt, folder, precision=precision, int8=calib, static_batch=1, force=True
                )  # the demo's own folder; batch 1, as timed
            except BackendUnavailable:
                continue
            except P3BError as exc:  # INT8 that fails its gate or parity check is reported, not shipped
                if precision == FP32:
                    raise
                int8[get_backend(fmt).name] = {"error": str(exc)}
                continue
            refs.append(str(folder / artefact_name(fmt)))
            if precision == INT8:
                int8[get_backend(fmt).name] = rec.extra["int8"]
    report = run_bench(
        refs,
        cfg=BenchConfig(runs=runs, warmup=20, block=20),
        dense_baselines=True,
        json_out=str(out_dir / "speed.json"),
    )
    rows = [
        {
            "name": r["name"],
            "backend": r["backend"],
            "runtime": r["runtime"],
            "precision": r["precision"],
            "median_ms": r["stats"]["median_ms"],
            "baseline": r["baseline"],
        }
        for r in report["results"]
    ]
    dense = {r["runtime"]: r["median_ms"] for r in rows if r["baseline"]}
    pruned = {f"{r['backend']} {r['precision']}": r["median_ms"] for r in rows if not r["baseline"]}
    return {
        "dense_ms": dense,
        "pruned_ms": pruned,
        "cpu": report["machine"]["cpu"],
        "int8": int8,
        "threads": report["machine"]["threads"],
        "protocol": report["protocol"],
        "runs": runs,
    }


def _compare(
    out_dir: Path, keep: float, dense, pruned, prune_summary: dict, data, seconds: float, speed: dict | None = None
) -> dict:
    shape = (data.in_chans, data.img_size, data.img_size)
    rows = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        d = describe(model)
        rows[name] = {
            "val_acc": evaluate(model, data.val),
            "params": d["params"],
            "flops": d["flops"],
            "cpu_ms_batch1": cpu_latency_ms(model, shape),
        }
    rows["pruned"]["val_acc_before_finetune"] = prune_summary["val_acc_pruned"]
    blocks = describe(pruned)["blocks"]
    rows["pruned"]["branches_removed"] = [r["block"] for r in blocks if r["removed"]]
    rows["pruned"]["heads"] = [r["heads"] for r in blocks if r["block"].endswith("attn") and not r["removed"]]
    summary = {
        "keep": keep,
        "budget": prune_summary["budget"],
        "total_keep": prune_summary["total_keep"],
        "latency": prune_summary.get("latency"),
        "block_keep_nominal": prune_summary["block_keep_nominal"],
        "results": rows,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "speed": speed,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "table.md", format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    d, p = summary["results"]["dense"], summary["results"]["pruned"]
    lines = ["| model | top-1 (%) | params | FLOPs | CPU latency, batch 1 (ms) |", "|---|---|---|---|---|"]
    for name, r in (("dense", d), ("P3B pruned + fine-tuned", p)):
        lines.append(
            f"| {name} | {r['val_acc']:.2f} | {r['params']:,} | {r['flops'] / 1e6:.2f} M | {r['cpu_ms_batch1']:.3f} |"
        )
    lat = summary.get("latency")
    target = (
        f"latency budget: {lat['target_speedup']:.1f}× the dense model on {lat['backend']}, predicted "
        f"{lat['predicted_speedup']:.2f}×"
        if lat
        else f"target {100 * summary['keep']:.0f}%, the paper's budget"
    )
    lines.append(
        f"\nKept {100 * summary['total_keep']:.1f}% of all parameters ({target}) and {100 * summary['block_keep_nominal']:.1f}% of block parameters; "
        f"pruned before fine-tune: {p['val_acc_before_finetune']:.2f}%; eager-torch speedup {d['cpu_ms_batch1'] / p['cpu_ms_batch1']:.2f}×; "
        f"FLOP ratio {d['flops'] / p['flops']:.2f}×; total {summary['seconds']:.0f} s on {summary['threads']} threads."
    )
    if "heads" in p:
        removed = p["branches_removed"]
        lines.append(
            f"Structure: branches removed: {', '.join(removed) or 'none'}; heads kept per attention branch: "
            f"{', '.join(map(str, p['heads'])) or '–'}."
        )
    if summary.get("speed"):
        lines.append("\n" + format_speed(summary["speed"]))
    return "\n".join(lines) + "\n"


def format_speed(speed: dict) -> str:
    """Exported pruned model (fp32 and INT8) vs the dense model, per CPU runtime, and best against best."""
    dense, pruned = speed["dense_ms"], speed["pruned_ms"]
    fastest_dense = min(dense, key=dense.get)
    lines = [
        f"Speed, batch 1, {speed['cpu']} ({speed['threads']} threads), median of {speed['runs']} runs "
        f"interleaved in one process (dense models in fp32):",
        "",
        "| runtime | precision | dense ms | pruned ms | speedup (same runtime) | vs fastest dense |",
        "|---|---|---|---|---|---|",
    ]
    for key, ms in sorted(pruned.items(), key=lambda kv: kv[1]):
        backend, precision = key.rsplit(" ", 1) if " " in key else (key, FP32)
        same = dense.get(backend)
        lines.append(
            f"| {backend} | {precision} | {same:.3f} | {ms:.3f} | {same / ms:.2f}× | {dense[fastest_dense] / ms:.2f}× |"
        )
    for backend, ms in dense.items():
        if not any(k.split(" ")[0] == backend for k in pruned):
            lines.append(f"| {backend} | fp32 | {ms:.3f} | | | |")
    best = min(pruned, key=pruned.get)
    lines.append(
        f"\nBest: the pruned model on {best} is {dense[fastest_dense] / pruned[best]:.2f}× faster than the dense "
        f"model on its fastest runtime ({fastest_dense})."
    )
    for backend, gate in speed.get("int8", {}).items():
        if "error" in gate:
            lines.append(f"INT8 on {backend}: not exported ({gate['error']})")
            continue
        lines.append(
            f"INT8 on {backend}: top-1 {gate['int8_top1']:.2f}% vs {gate['fp32_top1']:.2f}% in fp32 through the "
            f"same runtime ({gate['val_images']} validation images, calibrated on {gate['calib_size']}; "
            f"gate: drop ≤ {gate['max_drop']:g} point)."
        )
    return "\n".join(lines)
