"""Latency budget vs parameter budget on digits, at equal predicted latency (5 seeds, paired).

Per seed: train the dense digits-vit (`p3bkit train`'s pipeline, 30 epochs), prune it with
P3B-inner at a parameter budget (`--rate`, fraction of all parameters), predict that model's latency
with the latency table, then prune the same dense model with the latency budget set to that
prediction (`--target-latency-ms`); fine-tune both with `p3bkit finetune`'s defaults. At the end every pruned model (and the
dense one) is exported and timed on the table's runtime, interleaved in one process, so the
comparison is at measured as well as predicted latency.

    python benchmarks/latency_budget_digits.py --seeds 0 1 2 3 4 --rate 75 --backend openvino

Writes benchmarks/results/latency_budget_digits.{json,md} and results/latency/digits_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RESULTS, work_folder

from p3bkit.backends import get_backend
from p3bkit.bench import BenchConfig, run_bench
from p3bkit.export import artefact_name, export_model
from p3bkit.latency.measure import TableConfig, in_fresh_process, measure_latency_table
from p3bkit.latency.table import LatencyTable
from p3bkit.models.factory import create_model
from p3bkit.prune.job import PruneJob, run_prune
from p3bkit.prune.pruner import P3BConfig
from p3bkit.prune.recipes import RECIPES
from p3bkit.train.jobs import run_finetune, run_train

QUICK = RECIPES["quick"]
FORMAT = {b: get_backend(b).format for b in ("onnxruntime", "openvino")}


def prune_and_finetune(
    work: Path, dense: Path, seed: int, name: str, cfg: P3BConfig, table: str | None, finetune: int, speed_checks: int
):
    """`p3bkit prune` of the dense folder, then `p3bkit finetune` with its defaults (run_prune, run_finetune)."""
    job = PruneJob(
        out=str(work / f"{name}_{seed}"),
        model=str(dense),
        data="digits",
        epochs=(1, 4, 4),
        structure="inner",
        seed=seed,
        progress=False,
        latency_table=table,
        p3b=cfg,
        speed_checks=speed_checks,
        teacher="none",  # its committed numbers were made without a teacher (the default before)
    )
    s = run_prune(job)
    ft = run_finetune(
        str(Path(job.out) / "pruned"),
        str(work / f"{name}_{seed}_ft"),
        data="digits",
        epochs=finetune,
        seed=seed,
        progress=False,
    )
    return {
        "acc_pruned": s["val_acc_pruned"],
        "acc_finetuned": ft["val_acc"],
        "params": s["params_kept"],
        "arch": json.loads((work / f"{name}_{seed}_ft" / "arch.json").read_text())["layers"],
        "disabled_blocks": s["disabled_blocks"],
        "folder": str(work / f"{name}_{seed}_ft"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rate", type=int, default=75)
    ap.add_argument("--backend", default="openvino", choices=list(FORMAT))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--finetune", type=int, default=8)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument(
        "--speed-checks",
        type=int,
        default=0,
        help="prune's speed checks for the latency budget (default 0: they would correct the target away "
        "from the parameter-budget model's predicted time, the point of equal latency)",
    )
    args = ap.parse_args()
    lut = RESULTS / "latency" / f"digits_{args.backend}.json"
    lut.parent.mkdir(parents=True, exist_ok=True)
    table = measure_latency_table(
        create_model("digits-vit").eval(),
        "digits-vit",
        TableConfig(backend=args.backend, threads=args.threads, progress=False),
    )
    table.save(lut)
    with work_folder("latency-digits-") as work:
        rows, t0 = [], time.time()
        for seed in args.seeds:
            dense = work / f"dense_{seed}"  # `p3bkit train` with its defaults (the from-scratch recipe)
            trained = run_train("digits-vit", str(dense), data="digits", epochs=30, seed=seed, progress=False)
            base = dict(update_every=10, lr_model=QUICK.lr, lr_bpi=QUICK.lr_bpi)
            params = prune_and_finetune(
                work, dense, seed, "params", P3BConfig(keep=1 - args.rate / 100, **base), None, args.finetune, 0
            )
            target = LatencyTable.load(lut).predict(params["arch"])
            latency = prune_and_finetune(
                work,
                dense,
                seed,
                "latency",
                P3BConfig(target_ms=target, **base),
                str(lut),
                args.finetune,
                args.speed_checks,
            )
            rows.append(
                {
                    "seed": seed,
                    "dense_acc": trained["val_acc"],
                    "target_ms": target,
                    "params_budget": params,
                    "latency_budget": latency,
                }
            )
            print(
                f"seed {seed}: params {params['acc_finetuned']:.2f}% vs latency {latency['acc_finetuned']:.2f}% "
                f"at {target:.3f} ms predicted ({time.time() - t0:.0f} s)",
                flush=True,
            )
        refs = [str(dense)]  # the last seed's dense model: every seed's has the same architecture
        for r in rows:
            for key in ("params_budget", "latency_budget"):
                fmt = FORMAT[args.backend]
                export_model(r[key]["folder"], fmt, work / f"{Path(r[key]['folder']).name}_{fmt}")
                r[key]["artefact"] = str(work / f"{Path(r[key]['folder']).name}_{fmt}" / artefact_name(fmt))
                refs.append(r[key]["artefact"])
        dense_art = work / f"dense_{FORMAT[args.backend]}"
        export_model(str(dense), FORMAT[args.backend], dense_art)
        refs[0] = str(dense_art / artefact_name(FORMAT[args.backend]))
        rep = in_fresh_process(
            run_bench,
            refs,
            args.backend,
            "cpu",
            None,
            "fp32",
            BenchConfig(runs=args.runs, warmup=20, block=20, threads=args.threads),
            False,
            None,
            False,
            False,
            str(lut),
        )
    by_ref = {r["name"]: r for r in rep["results"]}
    for r in rows:
        for key in ("params_budget", "latency_budget"):
            b = by_ref[r[key]["artefact"]]
            r[key]["measured_ms"], r[key]["predicted_ms"] = b["stats"]["median_ms"], b["predicted_ms"]
            del r[key]["arch"]
    report = {
        "command": "python benchmarks/latency_budget_digits.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v is not None
        ),
        "machine": rep["machine"],
        "protocol": rep["protocol"],
        "dense_ms": by_ref[refs[0]]["stats"]["median_ms"],
        "rows": rows,
        "seconds": time.time() - t0,
        "table": str(lut.relative_to(RESULTS)),
    }
    (RESULTS / "latency_budget_digits.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "latency_budget_digits.md").write_text(render(report, args))
    print((RESULTS / "latency_budget_digits.md").read_text())


def render(report: dict, args) -> str:
    m = report["machine"]
    lines = [
        f"# Latency budget vs parameter budget on digits (P3B-inner, {args.backend}, batch 1, fp32)",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads. Command: `{report['command']}`. Dense model "
        f"{report['dense_ms']:.3f} ms measured. The latency budget's target is the parameter-budget model's "
        f"predicted time; both are pruned with `--teacher none` and fine-tuned {args.finetune} epochs. Protocol: {report['protocol']}.",
        "",
        "| seed | params budget top-1 | latency budget top-1 | Δ | params-budget ms (meas / pred) | "
        "latency-budget ms (meas / pred) | params kept (params / latency) | blocks emptied (params / latency) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    diffs = []
    for r in report["rows"]:
        p, q = r["params_budget"], r["latency_budget"]
        diffs.append(q["acc_finetuned"] - p["acc_finetuned"])
        lines.append(
            f"| {r['seed']} | {p['acc_finetuned']:.2f} | {q['acc_finetuned']:.2f} | {diffs[-1]:+.2f} | "
            f"{p['measured_ms']:.3f} / {p['predicted_ms']:.3f} | {q['measured_ms']:.3f} / {q['predicted_ms']:.3f} | "
            f"{p['params']:,} / {q['params']:,} | {len(p['disabled_blocks'])} / {len(q['disabled_blocks'])} |"
        )
    wins = sum(d >= 0 for d in diffs)
    lines += [
        "",
        f"Mean Δ (latency − params) {statistics.mean(diffs):+.2f} points; latency budget ≥ params budget on "
        f"{wins} of {len(diffs)} seeds.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
