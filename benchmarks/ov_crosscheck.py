"""Cross-check `p3bkit bench` against OpenVINO's own `benchmark_app` on the same IR.

Exports DeiT-S (dense) and its P3B 75% allocation to OpenVINO IR, then times each with
`p3bkit bench` (batch 1, f32, pinned threads) and with `benchmark_app -hint latency` (all cores,
= the same threads here; `-hint none -nstreams 1 -nthreads N` otherwise; f32 inference precision, shape 1×3×224×224) and reports both medians.

    python benchmarks/ov_crosscheck.py --threads 2
Writes benchmarks/results/ov_crosscheck.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from common import work_folder

from p3bkit.bench import BenchConfig, run_bench
from p3bkit.export import export_model
from p3bkit.models import PrunedArch, apply_arch, create_stock_model, save

HERE = Path(__file__).parent


def benchmark_app(xml: Path, threads: int, seconds: int) -> dict:
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    # benchmark_app refuses -nthreads together with a hint: with every core in use the latency hint
    # already runs one stream on all of them; otherwise pin one stream to `threads` threads explicitly
    tuning = (
        ["-hint", "latency"]
        if threads == os.cpu_count()
        else ["-hint", "none", "-nstreams", "1", "-nthreads", str(threads)]
    )
    cmd = [
        exe,
        "-m",
        str(xml),
        "-d",
        "CPU",
        *tuning,
        "-t",
        str(seconds),
        "-infer_precision",
        "f32",
        "-shape",
        "[1,3,224,224]",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    grab = lambda name: float(re.search(rf"{name}:\s+([\d.]+)\s*ms", out).group(1))  # noqa: E731
    return {"median_ms": grab("Median"), "average_ms": grab("Average"), "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--allocation", default=str(HERE / "results" / "allocations" / "deit_s_full_75.json"))
    args = ap.parse_args()
    with work_folder("ov-cross-") as work:
        arch = PrunedArch.from_json(json.loads(Path(args.allocation).read_text()))
        pruned = save(apply_arch(create_stock_model(arch.source), arch), work / "pruned")
        rows = {}
        for label, ref in (("dense", arch.source.name), ("p3b_75", str(pruned))):
            rec = export_model(ref, "openvino", work / f"ov-{label}")
            xml = work / f"ov-{label}" / rec.files[0]
            ours = run_bench([str(xml)], cfg=BenchConfig(runs=args.runs, warmup=10, threads=args.threads))
            rows[label] = {
                "p3bkit_median_ms": ours["results"][0]["stats"]["median_ms"],
                "benchmark_app": benchmark_app(xml, args.threads, args.seconds),
            }
    machine = ours["machine"]
    lines = [
        "# p3bkit bench vs OpenVINO benchmark_app\n",
        f"{machine['cpu']}, {args.threads} threads, f32, batch 1; p3bkit: median of {args.runs} runs; "
        f"benchmark_app: -hint latency, {args.seconds} s.\n",
        "| model | p3bkit bench median ms | benchmark_app median ms | ratio |",
        "|---|---|---|---|",
    ]
    for label, r in rows.items():
        b = r["benchmark_app"]["median_ms"]
        lines.append(f"| {label} | {r['p3bkit_median_ms']:.2f} | {b:.2f} | {r['p3bkit_median_ms'] / b:.2f} |")
    (HERE / "results" / "ov_crosscheck.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "ov_crosscheck.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
