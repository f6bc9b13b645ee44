"""Accuracy study on the embedded digits set: P3B vs baselines at 50 / 75 / 90% block pruning.

Per seed: train a dense tiny ViT (digits-vit: 6 layers, width 64, 16×16 input, 4×4 patches),
then for every method prune it with the same engine, epochs, data and seed, and fine-tune the
pruned model with the same short recipe. Methods: `p3b` (BPI budgets, six-gate structure),
`p3b-inner` (P3B on head dims + MLP hidden only), `uniform` (equal κ), `global-magnitude` (one
weight-magnitude threshold), `frozen` (P3B with model lr 1e-8, Appendix G).

    python benchmarks/accuracy_digits.py            # ~25 min on 2 CPU cores
Writes benchmarks/results/accuracy_digits.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from safetensors.torch import save_file

from p3bkit.models import load
from p3bkit.models.factory import create_model
from p3bkit.models.report import describe
from p3bkit.prune.engine import P3BConfig
from p3bkit.train.data import load_data
from p3bkit.train.loop import FitConfig, evaluate, fit
from p3bkit.workflows import PruneJob, run_prune

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "p3b": {"structure": "full", "allocation": "p3b"},
    "p3b-inner": {"structure": "inner", "allocation": "p3b"},
    "uniform": {"structure": "full", "allocation": "uniform"},
    "global-magnitude": {"structure": "full", "allocation": "global-magnitude"},
    "frozen": {"structure": "full", "allocation": "p3b", "frozen": True},
    # investigation variants (not in the default list): BPI convergence and budget smoothing
    "p3b-warmup3": {"structure": "full", "allocation": "p3b", "warmup": 3},
    "p3b-noema": {"structure": "full", "allocation": "p3b", "ema_momentum": 1.0},
}
DEFAULT_METHODS = ["p3b", "p3b-inner", "uniform", "global-magnitude", "frozen"]


def run_one(work: Path, ckpt: Path, method: str, rate: int, seed: int, args) -> dict:
    m = METHODS[method]
    cfg = P3BConfig(keep=1 - rate / 100, update_every=args.update_every, allocation=m["allocation"],
                    frozen=m.get("frozen", False), ema_momentum=m.get("ema_momentum", 0.2))
    epochs = (m.get("warmup", args.epochs[0]), *args.epochs[1:])
    job = PruneJob(out=str(work / f"{method}_{rate}_{seed}"), model="digits-vit", checkpoint=str(ckpt),
                   epochs=epochs, structure=m["structure"], seed=seed, progress=False, p3b=cfg)
    s = run_prune(job)
    pruned = load(Path(job.out) / "pruned")
    data = load_data("digits")
    fit(pruned, data, FitConfig(epochs=args.finetune, lr=5e-4, warmup_epochs=0, seed=seed, progress=False))
    d = describe(pruned)
    return {"method": method, "rate": rate, "seed": seed, "acc_pruned": s["val_acc_pruned"],
            "acc_finetuned": evaluate(pruned, data.val), "params": d["params"], "flops": d["flops"],
            "block_keep": s["block_keep_nominal"], "kappa": s["kappa"]}


def summarize(rows: list[dict], dense: list[float]) -> str:
    lines = [f"Dense digits-vit: {statistics.mean(dense):.2f} ± {statistics.pstdev(dense):.2f} % top-1 "
             f"({len(dense)} seeds)\n", "| method | pruned | top-1 after prune (%) | top-1 after fine-tune (%) | params | FLOPs |",
             "|---|---|---|---|---|---|"]
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        for rate in sorted({r["rate"] for r in rows}):
            sel = [r for r in rows if r["method"] == method and r["rate"] == rate]
            if not sel:
                continue
            f = lambda k: f"{statistics.mean(r[k] for r in sel):.2f} ± {statistics.pstdev(r[k] for r in sel):.2f}"  # noqa: E731
            lines.append(f"| {method} | {rate}% | {f('acc_pruned')} | {f('acc_finetuned')} | "
                         f"{statistics.mean(r['params'] for r in sel):,.0f} | {statistics.mean(r['flops'] for r in sel) / 1e6:.2f} M |")
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
        ax.set_xlabel("block parameters pruned (%)")
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rates", nargs="+", type=int, default=[50, 75, 90])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--name", default="accuracy_digits", help="result file stem in benchmarks/results")
    ap.add_argument("--epochs", nargs=3, type=int, default=(1, 4, 4))
    ap.add_argument("--update-every", type=int, default=5)
    ap.add_argument("--finetune", type=int, default=8)
    ap.add_argument("--work", default="/tmp/p3bkit-accuracy")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md/.png from the .json")
    args = ap.parse_args()
    if args.report:
        meta = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_outputs(meta, args.name)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0, rows, dense = time.time(), [], []
    for seed in args.seeds:
        model = create_model("digits-vit")
        data = load_data("digits")
        fit(model, data, FitConfig(epochs=30, lr=2e-3, seed=seed, progress=False))
        dense.append(evaluate(model, data.val))
        ckpt = work / f"dense_{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
        for method in args.methods:
            for rate in args.rates:
                rows.append(run_one(work, ckpt, method, rate, seed, args))
                r = rows[-1]
                print(f"seed {seed} {method} {rate}%: {r['acc_pruned']:.2f} → {r['acc_finetuned']:.2f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    flags = [f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
             for k, v in vars(args).items() if k not in ("work", "report")]
    meta = {"command": "python benchmarks/accuracy_digits.py " + " ".join(flags),
            "seconds": time.time() - t0, "dense": dense, "rows": rows, "settings": vars(args)}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(meta, indent=1))
    write_outputs(meta, args.name)


def write_outputs(meta: dict, name: str) -> None:
    text = summarize(meta["rows"], meta["dense"])
    (RESULTS / f"{name}.md").write_text(f"# Accuracy on digits\n\n`{meta['command']}` "
                                        f"({meta['seconds'] / 60:.0f} min, 2 CPU cores)\n\n" + text)
    plot(meta["rows"], meta["dense"], RESULTS / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
