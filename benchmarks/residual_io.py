"""How a pruned block should read and write the residual stream, per backend.

Takes one P3B allocation (default: DeiT-S, six-gate structure, 75% pruned) and builds the same
function four ways: gather + ScatterND(add) writes, gather + Concat/Gather writes, everything
folded into zero weight rows/columns ('dense'), and the default cost model ('auto': fold a read or
write when ≥ 75% of the channels are kept). Benchmarks them interleaved with the dense model on
onnxruntime and OpenVINO (CPU, batch 1, fp32) with per-op-type profiles.

    python benchmarks/residual_io.py --runs 50
Writes benchmarks/results/residual_io.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from common import work_folder

from p3bkit.bench import BenchConfig, run_bench
from p3bkit.export import export_model
from p3bkit.models import PrunedArch, apply_arch, create_stock_model, save
from p3bkit.surgery import FOLD_MIN_KEEP

HERE = Path(__file__).parent


def variant(arch: PrunedArch, mode: str, dim: int) -> PrunedArch:
    new = copy.deepcopy(arch)
    for layer in new.layers:
        for branch in (layer["attn"], layer["mlp"]):
            if branch is None:
                continue
            if mode == "auto":
                branch["read"] = "dense" if len(branch["in"]) >= FOLD_MIN_KEEP * dim else "gather"
                branch["write"] = "dense" if len(branch["out"]) >= FOLD_MIN_KEEP * dim else "scatter"
            else:
                branch["read"] = "dense" if mode == "dense" else "gather"
                branch["write"] = "dense" if mode == "dense" else "scatter"
    return new


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--allocation", default=str(HERE / "results" / "allocations" / "deit_s_full_75.json"))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    arch = PrunedArch.from_json(json.loads(Path(args.allocation).read_text()))
    with work_folder("residual-io-") as work:
        dim = create_stock_model(arch.source).embed_dim
        refs = {"dense": arch.source.name}  # the unpruned timm model (random weights)
        for mode in ("index", "dense", "auto"):
            model = apply_arch(create_stock_model(arch.source), variant(arch, mode, dim))
            refs["folded" if mode == "dense" else mode] = str(save(model, work / mode))
        out_rows, report = [], {"allocation": args.allocation, "runs": args.runs, "backends": {}}
        for backend, fmt, write_ops in (
            ("onnxruntime", "onnx", ("scatter", "gather")),
            ("openvino", "openvino", ("scatter", "gather")),
        ):
            arts = {}
            for label, ref in refs.items():
                for op in write_ops if label in ("index", "auto") else ("scatter",):
                    name = f"{label}/{op}" if label in ("index", "auto") else label
                    rec = export_model(ref, fmt, work / f"{fmt}-{label}-{op}", write_op=op)
                    arts[name] = str(work / f"{fmt}-{label}-{op}" / rec.files[0])
            rep = run_bench(
                list(arts.values()),
                backend,
                "cpu",
                cfg=BenchConfig(runs=args.runs, warmup=10, threads=args.threads),
                profile=True,
            )
            report["machine"] = rep["machine"]
            rows = {}
            base = rep["results"][0]["stats"]["median_ms"]
            for (name, art), r in zip(arts.items(), rep["results"]):
                prof = rep["profile"][art]
                top = dict(sorted(prof.items(), key=lambda kv: -kv[1])[:6])
                rows[name] = {
                    "median_ms": r["stats"]["median_ms"],
                    "speedup": base / r["stats"]["median_ms"],
                    "flops": r["flops"],
                    "top_ops_ms": top,
                }
                out_rows.append(
                    f"| {backend} | {name} | {r['stats']['median_ms']:.2f} | {base / r['stats']['median_ms']:.2f}× | "
                    + ", ".join(f"{k} {v:.2f}" for k, v in top.items())
                    + " |"
                )
            report["backends"][backend] = rows
            print(rep["table"], flush=True)
    m = report["machine"]
    md = [
        f"# Residual read/write formulations — {Path(args.allocation).stem}\n",
        f"{m['cpu']}, {m['threads']} threads, fp32, batch 1, median of {args.runs} interleaved runs. "
        "Time per op type from the backend's own profiler (ms per inference; profiling adds overhead).\n",
        "| backend | variant (read-write / write op) | median ms | speedup vs unpruned | top op types (ms) |",
        "|---|---|---|---|---|",
        *out_rows,
    ]
    (HERE / "results" / "residual_io.md").write_text("\n".join(md) + "\n")
    (HERE / "results" / "residual_io.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
