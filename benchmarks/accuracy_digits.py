"""Accuracy study on the embedded digits set: P3B vs baselines at 50 / 75 / 90% pruning.

Rates are fractions of *all* parameters (the paper's budget, `--budget total`). Per seed: train a
dense tiny ViT (digits-vit: 6 layers, width 64, 16×16 input, 4×4 patches) as `p3bkit train` does
(run_train with its defaults), then for every method prune it with the same engine, epochs, data and
seed (the `quick` recipe: base lr 4e-3 → 5e-4 at batch 64, no teacher), and fine-tune the pruned
model as `p3bkit finetune` does (run_finetune with its defaults). Methods: `p3b` (the
paper's six gates), `p3b-inner` (P3B on head dims + MLP hidden only), `uniform` (equal κ),
`global-magnitude` (one weight-magnitude threshold), `frozen` (P3B with model lr 1e-8, App. G).

    python benchmarks/accuracy_digits.py --seeds 0 1 2 3 4          # ~40 s per method, rate and seed
    # or in parallel, one process per core (each with its own --work), then merge:
    python benchmarks/accuracy_digits.py --seeds 0 1 2 --threads 1 --work /tmp/a --part parts/a.json
    python benchmarks/accuracy_digits.py --seeds 3 4 --threads 1 --work /tmp/b --part parts/b.json
    python benchmarks/accuracy_digits.py --merge parts/*.json
Writes benchmarks/results/accuracy_digits.{json,md,png}, with a paired comparison per seed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS

from p3bkit.models import load
from p3bkit.models.report import describe
from p3bkit.prune.job import PruneJob, run_prune
from p3bkit.prune.pruner import P3BConfig
from p3bkit.prune.recipes import RECIPES
from p3bkit.train.jobs import run_finetune, run_train

METHODS = {
    "p3b": {"structure": "full", "allocation": "p3b"},
    "p3b-inner": {"structure": "inner", "allocation": "p3b"},
    "uniform": {"structure": "full", "allocation": "uniform"},
    "global-magnitude": {"structure": "full", "allocation": "global-magnitude"},
    "frozen": {"structure": "full", "allocation": "p3b", "frozen": True},
    # investigation variants (not in the default list): BPI convergence and budget smoothing
    "p3b-warmup3": {"structure": "full", "allocation": "p3b", "warmup": 3},
    "p3b-noema": {"structure": "full", "allocation": "p3b", "ema_momentum": 1.0},
    "p3b-inner-warmup3": {"structure": "inner", "allocation": "p3b", "warmup": 3},
    "p3b-inner-every20": {"structure": "inner", "allocation": "p3b", "update_every": 20},
    "p3b-inner-alpha1": {"structure": "inner", "allocation": "p3b", "alpha": 1.0},
    "p3b-inner-norm-head": {"structure": "inner", "allocation": "p3b", "bpi_class_head": "norm-linear"},
    # whole heads and whole branches: structure heads, --remove-below 0.05 (p3b-heads); its indicators
    # on every image of each batch, as in the paper (p3b-heads-fullbpi; the default sees 1/8 of it)
    "p3b-heads": {"structure": "heads", "allocation": "p3b", "remove_below": 0.05},
    "p3b-heads-fullbpi": {"structure": "heads", "allocation": "p3b", "remove_below": 0.05, "bpi_fraction": 1.0},
    "p3b-heads-noremove": {"structure": "heads", "allocation": "p3b"},
    "p3b-heads-hw2": {"structure": "heads", "allocation": "p3b", "remove_below": 0.05, "head_weight": 2.0},
    "p3b-heads-hw4": {"structure": "heads", "allocation": "p3b", "remove_below": 0.05, "head_weight": 4.0},
    "p3b-heads-remove10": {"structure": "heads", "allocation": "p3b", "remove_below": 0.10},
    "p3b-inner-remove10": {"structure": "inner", "allocation": "p3b", "remove_below": 0.10},
    # how a pruned head is scored, (max(m, f)·∂L/∂m)²: the default (p3b-heads) is the paper's, f = 0
    "p3b-heads-floor50": {"structure": "heads", "allocation": "p3b", "remove_below": 0.05, "head_score_floor": 0.5},
    "p3b-heads-floor1": {"structure": "heads", "allocation": "p3b", "remove_below": 0.05, "head_score_floor": 1.0},
    "p3b-heads-floor25": {"structure": "heads", "allocation": "p3b", "remove_below": 0.05, "head_score_floor": 0.25},
}
DEFAULT_METHODS = ["p3b-heads", "p3b-inner", "p3b", "uniform", "global-magnitude", "p3b-heads-fullbpi"]
QUICK = RECIPES["quick"]


def run_one(work: Path, dense: Path, method: str, rate: int, seed: int, args) -> dict:
    m = METHODS[method]
    cfg = P3BConfig(
        keep=1 - rate / 100,
        budget="total",
        update_every=m.get("update_every", args.update_every),
        allocation=m["allocation"],
        frozen=m.get("frozen", False),
        ema_momentum=m.get("ema_momentum", 0.2),
        alpha=m.get("alpha", 0.5),
        bpi_class_head=m.get("bpi_class_head", "linear"),
        remove_below=m.get("remove_below", 0.0),
        bpi_fraction=m.get("bpi_fraction", 0.125),
        head_weight=m.get("head_weight", 1.0),
        head_score_floor=m.get("head_score_floor", 0.0),
        lr_model=QUICK.lr,
        lr_bpi=QUICK.lr_bpi,
    )
    epochs = (m.get("warmup", args.epochs[0]), *args.epochs[1:])
    job = PruneJob(
        out=str(work / f"{method}_{rate}_{seed}"),
        model=str(dense),
        data="digits",
        epochs=epochs,
        structure=m["structure"],
        seed=seed,
        progress=False,
        p3b=cfg,
        teacher="none",  # no method distils: they differ only in where they cut
    )
    s = run_prune(job)
    tuned = work / f"{method}_{rate}_{seed}_ft"
    ft = run_finetune(
        str(Path(job.out) / "pruned"), str(tuned), data="digits", epochs=args.finetune, seed=seed, progress=False
    )
    pruned = load(tuned)
    d = describe(pruned)
    return {
        "method": method,
        "rate": rate,
        "seed": seed,
        "acc_pruned": s["val_acc_pruned"],
        "acc_finetuned": ft["val_acc"],
        "params": d["params"],
        "flops": d["flops"],
        "total_keep": s["total_keep"],
        "block_keep": s["block_keep_nominal"],
        "kappa": s["kappa"],
        "removed": [i for i, layer in enumerate(pruned.p3b_arch.layers) for k in ("attn", "mlp") if not layer[k]],
        "heads": [
            len(l["attn"].get("heads", range(pruned.p3b_arch.source.kwargs.get("num_heads", 4)))) if l["attn"] else 0
            for l in pruned.p3b_arch.layers
        ],
        "disabled_blocks": s["disabled_blocks"],
    }


def summarize(rows: list[dict], dense: list[float]) -> str:
    lines = [
        f"Dense digits-vit: {statistics.mean(dense):.2f} ± {statistics.pstdev(dense):.2f} % top-1 "
        f"({len(dense)} seeds)\n",
        "| method | pruned | top-1 after prune (%) | top-1 after fine-tune (%) | params | FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        for rate in sorted({r["rate"] for r in rows}):
            sel = [r for r in rows if r["method"] == method and r["rate"] == rate]
            if not sel:
                continue
            f = lambda k: f"{statistics.mean(r[k] for r in sel):.2f} ± {statistics.pstdev(r[k] for r in sel):.2f}"  # noqa: E731
            lines.append(
                f"| {method} | {rate}% | {f('acc_pruned')} | {f('acc_finetuned')} | "
                f"{statistics.mean(r['params'] for r in sel):,.0f} | {statistics.mean(r['flops'] for r in sel) / 1e6:.2f} M |"
            )
    return "\n".join(lines) + "\n\n" + paired(rows) + "\n" + structure(rows) + "\n" + kappa_agreement(rows)


def structure(rows: list[dict]) -> str:
    """What each method kept: branches removed (of 12) and heads per kept attention branch (of 4)."""
    lines = [
        "Structure of the pruned models (mean over seeds):\n",
        "| method | pruned | branches removed | heads per kept attention |",
        "|---|---|---|---|",
    ]
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        for rate in sorted({r["rate"] for r in rows}):
            sel = [r for r in rows if r["method"] == method and r["rate"] == rate and "removed" in r]
            if sel:
                heads = [h for r in sel for h in r["heads"] if h]
                lines.append(
                    f"| {method} | {rate}% | {statistics.mean(len(r['removed']) for r in sel):.1f} | "
                    f"{statistics.mean(heads) if heads else 0:.2f} |"
                )
    return "\n".join(lines) + "\n"


def kappa_agreement(rows: list[dict]) -> str:
    """The indicators on 1/8 of each batch (p3b-heads) vs on all of it (p3b-heads-fullbpi): final κ per branch."""
    by = {(r["method"], r["rate"], r["seed"]): r for r in rows}
    pairs = [
        (by[k], by[("p3b-heads-fullbpi", *k[1:])])
        for k in by
        if k[0] == "p3b-heads" and ("p3b-heads-fullbpi", *k[1:]) in by
    ]
    if not pairs:
        return ""
    lines = [
        "Indicators on 1/8 of each batch (p3b-heads) vs all of it (p3b-heads-fullbpi), per rate:\n",
        "| pruned | mean abs Δκ per branch | κ correlation | top-1 diff (1/8 − all) | per seed |",
        "|---|---|---|---|---|",
    ]
    for rate in sorted({a["rate"] for a, _ in pairs}):
        sel = [(a, b) for a, b in pairs if a["rate"] == rate]
        dk = statistics.mean(abs(x - y) for a, b in sel for x, y in zip(a["kappa"], b["kappa"]))
        corr = statistics.mean(float(np.corrcoef(a["kappa"], b["kappa"])[0, 1]) for a, b in sel)
        d = [a["acc_finetuned"] - b["acc_finetuned"] for a, b in sel]
        lines.append(
            f"| {rate}% | {dk:.3f} | {corr:.2f} | {statistics.mean(d):+.2f} | {' '.join(f'{x:+.1f}' for x in d)} |"
        )
    return "\n".join(lines) + "\n"


def paired(rows: list[dict]) -> str:
    """Per-seed differences (same dense model, data and seed) of each P3B structure against the baselines."""
    acc = {(r["method"], r["rate"], r["seed"]): r["acc_finetuned"] for r in rows}
    lines = [
        "Paired per seed, top-1 after fine-tune (points; wins = seeds where the first is higher):\n",
        "| comparison | pruned | mean diff | per seed | wins |",
        "|---|---|---|---|---|",
    ]
    variants = sorted({m for (m, _, _) in acc if m.startswith("p3b-") and m not in ("p3b-inner", "p3b-heads")})
    pairs = {
        "p3b-heads": ("p3b-inner", "global-magnitude", "uniform", "p3b"),
        "p3b": ("uniform", "global-magnitude"),
        "p3b-inner": ("uniform", "global-magnitude", "p3b"),
        **{v: ("global-magnitude", "p3b-inner", "p3b-heads") for v in variants},
    }
    for a, bs in pairs.items():
        for b in bs:
            for rate in sorted({r["rate"] for r in rows}):
                seeds = sorted(s for (m, q, s) in acc if m == a and q == rate and (b, rate, s) in acc)
                if not seeds:
                    continue
                d = [acc[(a, rate, s)] - acc[(b, rate, s)] for s in seeds]
                lines.append(
                    f"| {a} − {b} | {rate}% | {statistics.mean(d):+.2f} | "
                    f"{' '.join(f'{x:+.1f}' for x in d)} | {sum(x > 0 for x in d)}/{len(d)} |"
                )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], dense: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "acc_pruned", "after pruning"), (axes[1], "acc_finetuned", "after fine-tune")):
        for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
            rates = sorted({r["rate"] for r in rows if r["method"] == method})
            means = [statistics.mean(r[key] for r in rows if r["method"] == method and r["rate"] == q) for q in rates]
            stds = [statistics.pstdev(r[key] for r in rows if r["method"] == method and r["rate"] == q) for q in rates]
            ax.errorbar(rates, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.axhline(statistics.mean(dense), color="k", ls="--", lw=1, label="dense")
        ax.set_title(f"digits top-1 {title}")
        ax.set_xlabel("parameters pruned, of all (%)")
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--rates", nargs="+", type=int, default=[50, 75, 90])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--name", default="accuracy_digits", help="result file stem in benchmarks/results")
    ap.add_argument("--epochs", nargs=3, type=int, default=(1, 4, 4))
    ap.add_argument("--update-every", type=int, default=5)
    ap.add_argument("--finetune", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch threads (one per process when running parts in parallel)")
    ap.add_argument("--work", default="/tmp/p3bkit-accuracy")
    ap.add_argument(
        "--dense-from", help="a --work folder of an earlier run: reuse its dense model folders (dense_SEED)"
    )
    ap.add_argument("--part", help="write rows to this JSON after every run instead of the results folder")
    ap.add_argument("--merge", nargs="+", help="merge --part files and write the results")
    ap.add_argument("--machine", default="this 2-core CPU", help="recorded with the results")
    ap.add_argument("--note", help="a remark recorded with merged results (where each part ran)")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md/.png from the .json")
    args = ap.parse_args()
    if args.report:
        write_outputs(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
        return
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        dense = {s: d for p in parts for s, d in p["dense"].items()}
        commands = sorted(
            {re.sub(r"--seeds [\d ]+--rates [\d ]+", "--seeds … --rates … ", p["command"]) for p in parts}
        )
        meta = {
            **parts[0],
            "rows": [r for p in parts for r in p["rows"]],
            "dense": [dense[s] for s in sorted(dense)],
            "seconds": max(p["seconds"] for p in parts),
            "parts": len(parts),
            "machine": args.machine,
            "note": args.note,
            "command": "; ".join(commands) + f" — merged with --merge ({len(parts)} parts)",
        }
        write_outputs(meta, args.name, write_json=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = [
        f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
        for k, v in vars(args).items()
        if k in ("seeds", "rates", "methods", "epochs", "update_every", "finetune")
    ]
    meta = {
        "command": "python benchmarks/accuracy_digits.py " + " ".join(flags),
        "seconds": 0.0,
        "dense": {},
        "rows": [],
        "settings": vars(args),
        "machine": args.machine,
    }
    t0 = time.time()
    for seed in args.seeds:
        # `p3bkit train digits-vit --data digits --epochs 30 --seed SEED` (the from-scratch recipe);
        # or the same seed's dense model folder from an earlier run (same training, read back)
        dense = Path(args.dense_from or work) / f"dense_{seed}"
        if args.dense_from:
            trained = json.loads((dense / "train.json").read_text())
        else:
            trained = run_train("digits-vit", str(dense), data="digits", epochs=30, seed=seed, progress=False)
        meta["dense"][str(seed)] = trained["val_acc"]
        for method in args.methods:
            for rate in args.rates:
                meta["rows"].append(run_one(work, dense, method, rate, seed, args))
                r = meta["rows"][-1]
                meta["seconds"] = time.time() - t0
                print(
                    f"seed {seed} {method} {rate}%: {r['acc_pruned']:.2f} → {r['acc_finetuned']:.2f} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
                if args.part:
                    Path(args.part).write_text(json.dumps(meta, indent=1))
    if not args.part:
        meta["dense"] = [meta["dense"][s] for s in sorted(meta["dense"])]
        write_outputs(meta, args.name, write_json=True)


def write_outputs(meta: dict, name: str, write_json: bool = False) -> None:
    RESULTS.mkdir(exist_ok=True)
    if write_json:
        (RESULTS / f"{name}.json").write_text(json.dumps(meta, indent=1))
    text = summarize(meta["rows"], meta["dense"])
    how = meta.get("machine", "2 CPU cores")
    (RESULTS / f"{name}.md").write_text(
        f"# Accuracy on digits\n\n`{meta['command']}` (longest part "
        f"{meta['seconds'] / 60:.0f} min, "
        f"{how}; rates are fractions of all parameters, fp32; pruned with `--teacher none`)\n\n"
        + (f"{meta['note']}\n\n" if meta.get("note") else "")
        + text
    )
    plot(meta["rows"], meta["dense"], RESULTS / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
