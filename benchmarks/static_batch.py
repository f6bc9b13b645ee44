"""What a dynamic batch axis costs at batch 1: the same DeiT graphs exported twice, timed in one run.

`p3bkit export` writes a graph with a dynamic batch axis unless `--static-batch N` is given. At
batch 1 on a CPU runtime the dynamic graph carries shape arithmetic the static one folds away,
which weighs more the smaller the model. This script exports the dense DeiT and its P3B
allocations (`results/allocations`) both ways for each runtime and times every graph interleaved
in one process (`p3bkit.bench.run_bench`, batch 1, fp32).

    python benchmarks/static_batch.py --models deit_s --labels heads_75 heads_90 speed_75 speed_90 \
        --backends openvino onnxruntime --runs 300 --threads 2

Writes results/static_batch.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import DEIT, RESULTS, allocation_model, work_folder

from p3bkit.backends import get_backend, machine_info
from p3bkit.bench import BenchConfig, run_bench
from p3bkit.export import artefact_name, export_model
from p3bkit.fileio import write_json_atomic

AXES = {"dynamic": None, "static": 1}


def export_all(key: str, labels: list[str], backends: list[str], work: Path) -> list[dict]:
    """Every model × runtime × batch axis exported; rows naming each artefact."""
    rows = []
    for label in ["dense", *labels]:
        folder = allocation_model(key, label, work / f"{key}_{label}")
        for backend in backends:
            fmt = get_backend(backend).format
            for axis, batch in AXES.items():
                out = work / f"{key}_{label}_{backend}_{axis}"
                export_model(str(folder), fmt, out, static_batch=batch)
                rows.append(
                    {
                        "model": key,
                        "label": label,
                        "backend": backend,
                        "axis": axis,
                        "artefact": str(out / artefact_name(fmt)),
                    }
                )
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# A dynamic batch axis at batch 1",
        "",
        f"`{report['command']}` ({report['minutes']:.0f} min, "
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores, {report['threads']} threads). "
        "Random-weight DeiTs with the P3B allocations of results/allocations, exported by `p3bkit export` "
        "with a dynamic batch axis (the default) and with `--static-batch 1`; fp32, batch 1, median of "
        f"{report['runs']} runs, every graph of a DeiT interleaved in one process. Speedups are over the "
        "dense model with the same axis on the same runtime.",
        "",
        "| model | runtime | dynamic ms | static ms | dynamic / static | speedup (dynamic) | speedup (static) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["model"], r["label"], r["backend"], r["axis"]): r["median_ms"] for r in report["rows"]}
    for key, label, backend in dict.fromkeys((r["model"], r["label"], r["backend"]) for r in report["rows"]):
        dyn, sta = by[(key, label, backend, "dynamic")], by[(key, label, backend, "static")]
        dense_dyn, dense_sta = by[(key, "dense", backend, "dynamic")], by[(key, "dense", backend, "static")]
        lines.append(
            f"| {key} {label} | {backend} | {dyn:.3f} | {sta:.3f} | {dyn / sta:.3f} | "
            f"{dense_dyn / dyn:.2f}× | {dense_sta / sta:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["deit_s"], choices=sorted(DEIT))
    ap.add_argument(
        "--labels",
        nargs="+",
        default=["heads_75", "heads_90", "speed_75", "speed_90"],
        help="allocations in results/allocations (<model>_<label>.json)",
    )
    ap.add_argument("--backends", nargs="+", default=["openvino", "onnxruntime"])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t0, rows = time.time(), []
    with work_folder("static-batch-") as work:
        for key in args.models:
            exported = export_all(key, args.labels, args.backends, work)
            rep = run_bench(
                [r["artefact"] for r in exported], None, "cpu", cfg=BenchConfig(runs=args.runs, threads=args.threads)
            )
            for r, res in zip(exported, rep["results"]):
                rows.append(
                    {
                        **{k: v for k, v in r.items() if k != "artefact"},
                        "median_ms": res["stats"]["median_ms"],
                        "p90_ms": res["stats"]["p90_ms"],
                    }
                )
            print(rep["table"], flush=True)
    cmd = (
        "python benchmarks/static_batch.py --models "
        + " ".join(args.models)
        + " --labels "
        + " ".join(args.labels)
        + " --backends "
        + " ".join(args.backends)
        + f" --runs {args.runs} --threads {args.threads}"
    )
    report = {
        "command": cmd,
        "minutes": (time.time() - t0) / 60,
        "machine": machine_info(args.threads),
        "threads": args.threads,
        "runs": args.runs,
        "batch": 1,
        "precision": "fp32",
        "rows": rows,
    }
    write_json_atomic(RESULTS / "static_batch.json", report)
    (RESULTS / "static_batch.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
