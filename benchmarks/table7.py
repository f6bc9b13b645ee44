"""Reproduce the paper's Table 7 (appendix E): DeiT-S/B with 0%, 75%, 90% of all parameters pruned.

Random weights (throughput depends only on the architecture); per-block widths from real P3B
runs at the paper's budget (`p3b_allocations.py`: fractions of all parameters). CPU: batch 1 on
every available backend; GPU: batch 1024 (torch). Each row shows its parameter count next to the
paper's (DeiT-S 22.1 → 5.4 → 2.2 M, DeiT-B 86.6 → 21.5 → 8.7 M).

    python benchmarks/table7.py --device cpu --runs 100            # this machine, CPU rows
    python benchmarks/table7.py --device cuda --runs 50 --backends torch
    python benchmarks/table7.py --report                            # md + png from the JSONs
    python benchmarks/table7.py --device cpu --one-run --runs 30    # every model × runtime in ONE interleaved
                                                                    # run, + dense on every runtime, + predictions
    python benchmarks/table7.py --device cpu --one-run --runs 30 --threads 2 --machine cpu2-budgets \
        --structures heads speed --pruned-on openvino               # pruned models on OpenVINO only

`--one-run` (CPU): per DeiT, the dense model on every runtime installed (torch, onnxruntime plain and
transformer-optimised, OpenVINO) and every pruned model on torch, onnxruntime and OpenVINO are timed
interleaved in one process (`p3bkit bench --dense-baselines`), so "vs fastest dense" is a ratio from
one run; every graph has a fixed batch axis (`p3bkit export --static-batch 1`, as bench exports the
dense baselines: a dynamic axis made the pruned DeiT-S 5–12% slower on OpenVINO, static_batch.py);
with latency tables in results/latency/<model>_<backend>.json from this CPU, each row also shows the
table's prediction.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from common import work_folder

from p3bkit.backends import describe_cpu, machine_info
from p3bkit.bench import BenchConfig, run_bench
from p3bkit.models import PrunedArch, apply_arch, create_stock_model, save

HERE = Path(__file__).parent
PAPER = {  # Table 7: speedup over dense (CPU i9-12900K batch 1; GPU RTX 3090 batch 1024)
    "deit_b": {"cpu": {75: 3.05, 90: 6.03}, "gpu": {75: 2.16, 90: 3.12}},
    "deit_s": {"cpu": {75: 2.52, 90: 4.36}, "gpu": {75: 1.48, 90: 1.88}},
}
PAPER_PARAMS_M = {"deit_s": {0: 22.1, 75: 5.4, 90: 2.2}, "deit_b": {0: 86.6, 75: 21.5, 90: 8.7}}
DENSE = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}
# six gates; head dims + MLP hidden; + whole heads/branches; P3B-heads under a latency target too
NAMES = {"full": "P3B", "inner": "P3B-inner", "heads": "P3B-heads", "speed": "P3B-heads+latency"}


def variant_name(label: str) -> str:
    """Row label `inner_90` → `P3B-inner 90%`."""
    if label == "dense":
        return "dense"
    structure, prune = label.rsplit("_", 1)
    return f"{NAMES.get(structure, structure)} {prune}%"


def shape_of(layers: list[dict], num_heads: int) -> str:
    """'removed 5/24, heads 2.3' — what a pruned architecture kept, for the table."""
    removed = sum(not layer[k] for layer in layers for k in ("attn", "mlp"))
    heads = [len(l["attn"].get("heads", range(num_heads))) for l in layers if l["attn"]]
    return f"removed {removed}/{2 * len(layers)}, heads {sum(heads) / max(len(heads), 1):.1f}"


def build_models(alloc_dirs: list[Path], work: Path, key: str, structures: list[str]) -> tuple[dict, dict, dict]:
    """Bench references (timm name or pruned folder), parameter counts and shapes per row label; each
    allocation from the first folder that holds it."""
    from p3bkit.models.arch import ModelSource

    refs = {"dense": DENSE[key]}
    params = {"dense": sum(p.numel() for p in create_stock_model(ModelSource(DENSE[key], {})).parameters())}
    shapes = {"dense": ""}
    for structure in structures:
        for prune in (75, 90):
            found = [d / f"{key}_{structure}_{prune}.json" for d in alloc_dirs]
            f = next((x for x in found if x.is_file()), None)
            if f is None:
                continue
            arch = PrunedArch.from_json(json.loads(f.read_text()), str(f))
            stock = create_stock_model(arch.source)
            shapes[f"{structure}_{prune}"] = shape_of(arch.layers, stock.blocks[0].attn.num_heads)
            model = apply_arch(stock, arch)
            refs[f"{structure}_{prune}"] = str(save(model, work / f"{key}_{structure}_{prune}"))
            params[f"{structure}_{prune}"] = sum(p.numel() for p in model.parameters())
    return refs, params, shapes


def run(args, work: Path) -> None:
    machine = args.machine or platform.node()
    out = HERE / "results" / f"table7_{machine}{'-compile' if args.compile else ''}_{args.device}.json"
    report = {
        "device": args.device,
        "machine_label": machine + (" torch.compile" if args.compile else ""),
        "runs": args.runs,
        "models": {},
        "budget": "fractions of all parameters (the paper's)",
        "precision": "fp32",
    }
    for key in args.models:
        refs, params, shapes = build_models([Path(a) for a in args.allocations], work, key, args.structures)
        for backend in args.backends:
            rep = run_bench(
                list(refs.values()),
                backend,
                "gpu" if args.device == "cuda" else "cpu",
                cfg=BenchConfig(runs=args.runs, warmup=args.warmup, threads=args.threads),
                compile=args.compile and backend == "torch",
            )
            report["machine"] = rep["machine"]
            rows = {}
            for label, r in zip(refs, rep["results"]):
                rows[label] = {
                    "median_ms": r["stats"]["median_ms"],
                    "images_per_s": r["stats"]["images_per_s"],
                    "flops": r["flops"],
                    "batch": r["batch"],
                    "params": params[label],
                    "shape": shapes[label],
                    "latencies_ms": r["latencies_ms"],
                }
            report["models"].setdefault(key, {})[backend] = rows
            print(f"{key} {backend}\n{rep['table']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


def tables_here(key: str, threads: int | None) -> list[str]:
    """The model's committed latency tables made on this CPU kind, one per runtime: a table that
    records the CPU's id before one that records its name only."""
    from p3bkit.errors import P3BError
    from p3bkit.latency.table import LatencyTable

    here, chosen = machine_info(threads), {}
    for path in sorted((HERE / "results" / "latency").glob(f"{key}_*.json")):
        table = LatencyTable.load(path)
        try:
            table.check_machine(here)
        except P3BError:  # another machine's table: its predictions say nothing about this one
            continue
        if table.backend not in chosen or table.machine.get("cpu_id") is not None:
            chosen[table.backend] = str(path)
    return list(chosen.values())


def run_one(args, work: Path) -> None:
    """All runtimes of a DeiT in one interleaved run (see the module doc); exports go under `work`."""
    from p3bkit.export import artefact_name, export_model

    machine = args.machine or platform.node()
    out = HERE / "results" / f"table7_{machine}-one-run_cpu.json"
    report = {
        "device": "cpu",
        "machine_label": machine,
        "runs": args.runs,
        "models": {},
        "one_run": True,
        "export": "fixed batch axis (batch 1): p3bkit export --static-batch 1",
        "budget": "fractions of all parameters (the paper's)",
        "precision": "fp32",
    }
    for key in args.models:
        refs, params, shapes = build_models([Path(a) for a in args.allocations], work, key, args.structures)
        labels, bench_refs = ["dense"], [refs["dense"]]
        formats = {"onnxruntime": "onnx", "openvino": "openvino"}
        for label, ref in list(refs.items())[1:]:
            if "torch" in args.pruned_on:
                labels.append(label)
                bench_refs.append(ref)
            for fmt in (formats[b] for b in args.pruned_on if b in formats):
                export_model(ref, fmt, work / f"{key}_{label}_{fmt}", static_batch=1)  # as bench exports the dense
                labels.append(label)
                bench_refs.append(str(work / f"{key}_{label}_{fmt}" / artefact_name(fmt)))
        tables = tables_here(key, args.threads)
        rep = run_bench(
            bench_refs,
            None,
            "cpu",
            cfg=BenchConfig(runs=args.runs, warmup=args.warmup, threads=args.threads),
            dense_baselines=True,
            latency_table=tables or None,
        )
        report["machine"], report["protocol"] = rep["machine"], rep["protocol"]
        rows: dict = {}
        results = rep["results"]
        for label, r in zip(labels + ["dense"] * (len(results) - len(labels)), results):
            backend = r["runtime"]
            rows.setdefault(backend, {})[label] = {
                "median_ms": r["stats"]["median_ms"],
                "images_per_s": r["stats"]["images_per_s"],
                "flops": r["flops"],
                "batch": r["batch"],
                "params": params[label],
                "predicted_ms": r.get("predicted_ms"),
                "shape": shapes[label],
                "latencies_ms": r["latencies_ms"],
            }
        report["models"][key] = rows
        print(f"{key}\n{rep['table']}", flush=True)
        for w in rep["warnings"]:
            print(f"warning: {w}", flush=True)
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
        where = m["gpu"] if dev == "gpu" else f"{describe_cpu(m)}, {m['threads']} threads"
        one = rep.get("one_run", False)
        lines += [
            f"\n### {f.stem}: {where}, fp32, batch {'1024' if dev == 'gpu' else '1'}, median of {rep['runs']} runs, "
            f"budget: {rep.get('budget', 'fractions of block parameters (before the paper budget)')}"
            + (f"; {rep['protocol']}" if one else "")
            + "\n",
            "| model | variant | backend | params (M) | paper params (M) | median ms | images/s | speedup | "
            "FLOP ratio | measured/ideal | paper speedup |" + (" vs fastest dense | predicted ms |" if one else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if one else ""),
        ]
        for key, per_backend in rep["models"].items():
            fastest = min(rows["dense"]["median_ms"] for rows in per_backend.values() if "dense" in rows)
            for backend, rows in per_backend.items():
                base = rows["dense"]
                for label, r in rows.items():
                    speed = base["median_ms"] / r["median_ms"]
                    ideal = base["flops"] / r["flops"]
                    prune = int(label.split("_")[-1]) if label != "dense" else 0
                    paper = PAPER[key][dev].get(prune)
                    extra = ""
                    if one:
                        pred = r.get("predicted_ms")
                        extra = f" {fastest / r['median_ms']:.2f}× | {f'{pred:.2f}' if pred else ''} |"
                    shape = f" ({r['shape']})" if r.get("shape") else ""
                    lines.append(
                        f"| {key} | {variant_name(label)}{shape} | {backend} | {r['params'] / 1e6:.2f} | "
                        f"{PAPER_PARAMS_M[key][prune]:.1f} | {r['median_ms']:.2f} | {r['images_per_s']:.1f} | "
                        f"{speed:.2f}× | {ideal:.2f}× | {speed / ideal:.2f} | {f'{paper:.2f}×' if paper else '1.00×'} |"
                        + extra
                    )
                    if label != "dense":
                        bars.append((f"{key} {variant_name(label)}\n{backend} {dev}", speed, paper))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime", "openvino"])
    ap.add_argument("--models", nargs="+", default=["deit_s", "deit_b"])
    ap.add_argument("--structures", nargs="+", default=["full", "inner", "heads"])
    ap.add_argument(
        "--allocations",
        nargs="+",
        default=[str(HERE / "results" / "allocations")],
        help="folders of allocations; each is taken from the first folder that holds it",
    )
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compile", action="store_true", help="torch.compile the torch backend's models")
    ap.add_argument("--machine", help="label for the result file name")
    ap.add_argument("--report", action="store_true", help="only (re)write table7.md/png from the JSONs")
    ap.add_argument("--one-run", action="store_true", help="CPU: all runtimes of a model in one interleaved run")
    ap.add_argument(
        "--pruned-on",
        nargs="+",
        default=["torch", "onnxruntime", "openvino"],
        choices=["torch", "onnxruntime", "openvino"],
        help="--one-run: the runtimes the pruned models are timed on (dense: every runtime)",
    )
    args = ap.parse_args()
    if args.one_run or not args.report:
        with work_folder("table7-") as work:  # exported models and runs go with the run
            (run_one if args.one_run else run)(args, work)
    report_md(HERE / "results")


if __name__ == "__main__":
    main()
