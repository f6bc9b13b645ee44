"""Reproduce the paper's Table 7 (appendix E): DeiT-S/B at 0%, 75%, 90% block pruning.

Random weights (throughput depends only on the architecture); per-block widths from real P3B
runs (`p3b_allocations.py`). CPU: batch 1 on every available backend; GPU: batch 1024 (torch).

    python benchmarks/table7.py --device cpu --runs 100            # this machine, CPU rows
    python benchmarks/table7.py --device cuda --runs 50 --backends torch
    python benchmarks/table7.py --report                            # md + png from the JSONs
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from p3bkit.bench import BenchConfig, run_bench
from p3bkit.models import PrunedArch, apply_arch, create_stock_model, save

HERE = Path(__file__).parent
PAPER = {  # Table 7: speedup over dense (CPU i9-12900K batch 1; GPU RTX 3090 batch 1024)
    "deit_b": {"cpu": {75: 3.05, 90: 6.03}, "gpu": {75: 2.16, 90: 3.12}},
    "deit_s": {"cpu": {75: 2.52, 90: 4.36}, "gpu": {75: 1.48, 90: 1.88}},
}
DENSE = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}


def build_models(alloc_dir: Path, work: Path, key: str, structures: list[str]) -> dict[str, str]:
    refs = {"dense": DENSE[key]}
    for structure in structures:
        for prune in (75, 90):
            f = alloc_dir / f"{key}_{structure}_{prune}.json"
            if not f.is_file():
                continue
            arch = PrunedArch.from_json(json.loads(f.read_text()), str(f))
            model = apply_arch(create_stock_model(arch.source), arch)
            refs[f"{structure}_{prune}"] = str(save(model, work / f"{key}_{structure}_{prune}"))
    return refs


def run(args) -> None:
    machine = args.machine or platform.node()
    out = HERE / "results" / f"table7_{machine}_{args.device}.json"
    report = {"device": args.device, "machine_label": machine, "runs": args.runs, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="table7-"))
    for key in args.models:
        refs = build_models(Path(args.allocations), work, key, args.structures)
        for backend in args.backends:
            rep = run_bench(list(refs.values()), backend, "gpu" if args.device == "cuda" else "cpu",
                            cfg=BenchConfig(runs=args.runs, warmup=args.warmup, threads=args.threads))
            report["machine"] = rep["machine"]
            rows = {}
            for label, r in zip(refs, rep["results"]):
                rows[label] = {"median_ms": r["stats"]["median_ms"], "images_per_s": r["stats"]["images_per_s"],
                               "flops": r["flops"], "batch": r["batch"], "latencies_ms": r["latencies_ms"]}
            report["models"].setdefault(key, {})[backend] = rows
            print(f"{key} {backend}\n{rep['table']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


def report_md(results_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(results_dir.glob("table7_*_*.json"))
    lines, bars = [], []
    for f in files:
        rep = json.loads(f.read_text())
        dev = "gpu" if rep["device"] == "cuda" else "cpu"
        m = rep["machine"]
        where = m["gpu"] if dev == "gpu" else f"{m['cpu']}, {m['threads']} threads"
        lines += [f"\n### {f.stem}: {where}, fp32, batch {'1024' if dev == 'gpu' else '1'}, median of {rep['runs']} runs\n",
                  "| model | variant | backend | median ms | images/s | speedup | FLOP ratio | measured/ideal | paper |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, per_backend in rep["models"].items():
            for backend, rows in per_backend.items():
                base = rows["dense"]
                for label, r in rows.items():
                    speed = base["median_ms"] / r["median_ms"]
                    ideal = base["flops"] / r["flops"]
                    prune = int(label.split("_")[-1]) if label != "dense" else 0
                    paper = PAPER[key][dev].get(prune)
                    lines.append(f"| {key} | {label} | {backend} | {r['median_ms']:.2f} | {r['images_per_s']:.1f} | "
                                 f"{speed:.2f}× | {ideal:.2f}× | {speed / ideal:.2f} | {f'{paper:.2f}×' if paper else '1.00×'} |")
                    if label != "dense":
                        bars.append((f"{key} {label}\n{backend} {dev}", speed, paper))
    lines += _gpu_log_section(results_dir / "gpu_h200_log.txt", bars)
    (results_dir / "table7.md").write_text("# Table 7 reproduction\n" + "\n".join(lines) + "\n")
    if bars:
        fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(bars)), 4.5))
        xs = range(len(bars))
        ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, label="p3bkit (measured)")
        ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], 0.4, label="paper Table 7")
        ax.set_xticks(list(xs), [b[0] for b in bars], rotation=90, fontsize=6)
        ax.set_ylabel("speedup over dense")
        ax.legend()
        fig.tight_layout()
        fig.savefig(results_dir / "table7.png", dpi=130)


def _gpu_log_section(log: Path, bars: list) -> list[str]:
    """Rows that `--device cuda` printed on a GPU machine whose JSON did not come back (its log did)."""
    if not log.is_file():
        return []
    rows, key = [], None
    for line in log.read_text().splitlines():
        if line.endswith(" torch") and line.split()[0] in DENSE:
            key = line.split()[0]
        cells = [c.strip() for c in line.strip("|").split("|")]
        if key and len(cells) == 9 and cells[1] == "torch" and cells[2] == "1024":
            rows.append((key, Path(cells[0]).name, cells))
    if not rows:
        return []
    out = [f"\n### {log.name}: NVIDIA H200, torch eager, fp32, batch 1024, median of 30 runs "
           "(printed by `table7.py --device cuda` in `gpu_check.sh`; the run ended before DeiT-B)\n",
           "| model | variant | backend | median ms | images/s | speedup | FLOP ratio | measured/ideal | paper |",
           "|---|---|---|---|---|---|---|---|---|"]
    for key, name, c in rows:
        label = "dense" if name == DENSE[key] else name[len(key) + 1:]
        prune = int(label.split("_")[-1]) if label != "dense" else 0
        paper = PAPER[key]["gpu"].get(prune)
        out.append(f"| {key} | {label} | torch | {float(c[3]):.2f} | {float(c[5]):.1f} | {c[6]} | {c[7]} | {c[8]} | "
                   f"{f'{paper:.2f}×' if paper else '1.00×'} |")
        if label != "dense":
            bars.append((f"{key} {label}\ntorch gpu", float(c[6].rstrip("×")), paper))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "openvino"])
    ap.add_argument("--models", nargs="+", default=["deit_s", "deit_b"])
    ap.add_argument("--structures", nargs="+", default=["full", "inner"])
    ap.add_argument("--allocations", default=str(HERE / "results" / "allocations"))
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--machine", help="label for the result file name")
    ap.add_argument("--report", action="store_true", help="only (re)write table7.md/png from the JSONs")
    args = ap.parse_args()
    if not args.report:
        run(args)
    report_md(HERE / "results")


if __name__ == "__main__":
    main()
