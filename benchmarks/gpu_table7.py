"""Table 7's GPU rows (batch 1024): DeiT-S/B dense and P3B-heads 75/90% on every GPU runtime importable.

Rows per model: torch eager and `torch.compile` (`p3bkit bench --device cuda`), ONNX Runtime's CUDA
execution provider (an exported graph, inputs and outputs bound on the GPU), TensorRT fp32 / fp16 /
INT8 (`p3bkit export --format trt`, then `p3bkit bench` of the engine; INT8 calibrated on
sklearn's digits as a 224-px ImageFolder). A row that cannot run says why (e.g. TensorRT not
importable) instead of stopping the script; rows left when `--budget-s` is spent say so too.
Weights are random (throughput depends on the architecture); widths from `results/allocations`.

    python benchmarks/gpu_table7.py -o benchmarks/results/gpu_table7.json      # a CUDA machine
    python benchmarks/gpu_table7.py --dry-run -o /tmp/gpu_table7.json          # same code path on the CPU:
        batch 2, 2 runs, ONNX Runtime on its CPU provider (what CI runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from common import DEIT, RESULTS, allocation_model, digits_image_folder, p3bkit, work_folder

from p3bkit.backends.timing import BenchConfig, Timed, time_interleaved

ROWS = ["torch eager", "torch.compile", "onnxruntime cuda", "tensorrt fp32", "tensorrt fp16", "tensorrt int8"]


def model_ref(key: str, label: str, work: Path) -> str:
    """The dense DeiT (a timm name) or a P3B-heads allocation saved as a model folder."""
    return DEIT[key] if label == "dense" else str(allocation_model(key, label, work / f"{key}_{label}"))


def bench_ms(ref: str, device: str, batch: int, runs: int, warmup: int, work: Path, *extra) -> float:
    """Median ms per batch of `p3bkit bench` on one reference."""
    out = work / f"bench-{time.monotonic_ns()}.json"
    p3bkit(
        "bench",
        ref,
        "--device",
        device,
        "--batch-size",
        batch,
        "--runs",
        runs,
        "--warmup",
        warmup,
        "--json",
        out,
        *extra,
        quiet=True,
    )
    return json.loads(out.read_text())["results"][0]["stats"]["median_ms"]


def ort_ms(ref: str, batch: int, runs: int, warmup: int, work: Path, dry_run: bool) -> float:
    """ONNX Runtime on the CUDA execution provider (the CPU one in a dry run), input and output
    bound to device memory so the timing is the graph's, not the PCIe copy's."""
    import numpy as np
    import onnxruntime as ort
    import torch

    out = work / f"onnx-{time.monotonic_ns()}"
    p3bkit("export", ref, "--format", "onnx", "-o", out, "--no-progress", quiet=True)
    provider = "CPUExecutionProvider" if dry_run else "CUDAExecutionProvider"
    if provider not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no {provider} (install onnxruntime-gpu)")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=[provider])
    if sess.get_providers()[0] != provider:  # onnxruntime falls back to the CPU when CUDA fails to load
        raise RuntimeError(f"onnxruntime could not load {provider} (it runs on {sess.get_providers()[0]})")
    device = "cpu" if dry_run else "cuda"
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.empty(batch, sess.get_outputs()[0].shape[-1], device=device)
    binding = sess.io_binding()
    binding.bind_input(sess.get_inputs()[0].name, device, 0, np.float32, tuple(x.shape), x.data_ptr())
    binding.bind_output(sess.get_outputs()[0].name, device, 0, np.float32, tuple(y.shape), y.data_ptr())
    timed = Timed("onnxruntime " + device, "onnxruntime", lambda: sess.run_with_iobinding(binding))
    if device == "cuda":
        timed.sync = torch.cuda.synchronize
    cfg = BenchConfig(runs=runs, warmup=warmup, warmup_seconds=0.0, block=runs)
    return float(np.median(time_interleaved([timed], cfg)[0]))


def trt_ms(ref: str, precision: str, batch: int, runs: int, warmup: int, work: Path, data: Path) -> float:
    out = work / f"trt-{precision}-{time.monotonic_ns()}"
    args = [
        "export",
        ref,
        "--format",
        "trt",
        "--precision",
        precision,
        "-o",
        out,
        "--no-progress",
        "--min-batch",
        1,
        "--opt-batch",
        batch,
        "--max-batch",
        batch,
    ]  # batch 1: the export's parity check
    if precision == "int8":
        args += ["--calib-data", data, "--calib-size", 256]
    p3bkit(*args, quiet=True)
    return bench_ms(str(out / "model.plan"), "cuda", batch, runs, warmup, work)


def run(args) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    batch, runs, warmup = (2, 2, 1) if args.dry_run else (args.batch, args.runs, args.warmup)
    start = time.monotonic()
    report = {
        "batch": batch,
        "runs": runs,
        "dry_run": args.dry_run,
        "device": device,
        "node": platform.node(),
        "budget": "P3B-heads, 75/90% of all parameters pruned (the paper's budget)",
        "rows": [],
    }
    with work_folder("gpu-table7-") as work:
        data = digits_image_folder(work / "digits224", 224, train=300, val=100)
        for key in args.models:
            for label in ["dense", *(f"heads_{p}" for p in args.prunes)]:
                try:
                    ref, why = model_ref(key, label, work), None
                except Exception as exc:  # every row of this model says why
                    ref, why = None, "could not run: " + (str(exc).strip().splitlines() or ["?"])[-1][:300]
                for row in args.rows:
                    entry = {"model": key, "variant": label, "row": row, "batch": batch}
                    if why:
                        entry["status"] = why
                    elif time.monotonic() - start > args.budget_s:
                        entry["status"] = f"not run: the {args.budget_s:.0f} s budget was spent"
                    else:
                        try:
                            if row.startswith("torch"):
                                ms = bench_ms(
                                    ref,
                                    device,
                                    batch,
                                    runs,
                                    warmup,
                                    work,
                                    *(["--compile"] if row == "torch.compile" else []),
                                )
                            elif row == "onnxruntime cuda":
                                ms = ort_ms(ref, batch, runs, warmup, work, args.dry_run)
                            else:
                                ms = trt_ms(ref, row.split()[1], batch, runs, warmup, work, data)
                            entry.update(status="ok", median_ms=ms, images_per_s=1e3 * batch / ms)
                        except Exception as exc:  # a row that cannot run says why; the others go on
                            entry["status"] = "could not run: " + (str(exc).strip().splitlines() or ["?"])[-1][:300]
                    print(
                        f"{key} {label:9s} {row:17s} "
                        + (f"{entry['median_ms']:9.2f} ms" if "median_ms" in entry else entry["status"]),
                        flush=True,
                    )
                    report["rows"].append(entry)
                    save(report, args.out)  # every row as soon as it is measured: a killed run keeps them
    report["seconds"] = time.monotonic() - start
    return report


def save(report: dict, out: Path) -> None:
    """The JSON (atomically) and its markdown table."""
    from p3bkit.fileio import write_json_atomic

    write_json_atomic(out, report)
    out.with_suffix(".md").write_text(format_md(report))


def format_md(report: dict) -> str:
    """Images/s per model and row, and each pruned model's speedup over its dense model on the same row."""
    lines = [
        f"# Table 7, GPU rows (`python benchmarks/gpu_table7.py`{' --dry-run' if report['dry_run'] else ''})",
        "",
        f"{report['node']}, device {report['device']}, batch {report['batch']}, median of {report['runs']} runs; "
        f"budget: {report['budget']}; random weights.",
        "",
        "| model | variant | " + " | ".join(ROWS) + " |",
        "|---|---|" + "---|" * len(ROWS),
    ]
    cells = {(r["model"], r["variant"], r["row"]): r for r in report["rows"]}
    for key, variant in dict.fromkeys((r["model"], r["variant"]) for r in report["rows"]):
        row = []
        for name in ROWS:
            r, dense = cells.get((key, variant, name)), cells.get((key, "dense", name))
            if r is None:
                row.append("")
            elif "median_ms" not in r:
                row.append(r["status"].replace("|", "/"))
            else:
                speed = (
                    f" ({dense['median_ms'] / r['median_ms']:.2f}×)"
                    if variant != "dense" and dense and "median_ms" in dense
                    else ""
                )
                row.append(f"{r['images_per_s']:.0f}/s{speed}")
        lines.append(f"| {key} | {variant} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=RESULTS / "gpu_table7.json")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at batch 2, 2 runs")
    ap.add_argument("--models", nargs="+", default=["deit_s", "deit_b"], choices=sorted(DEIT))
    ap.add_argument("--prunes", nargs="+", type=int, default=[75, 90], choices=[75, 90])
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=420.0, help="rows after this many seconds are not run")
    args = ap.parse_args()
    report = run(args)
    save(report, args.out)
    print(format_md(report))
    print(f"wrote {args.out} and its .md ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
