"""What training and pruning cost per step, split into data loading, the model's forward/backward and
P3B's extras (the block performance indicators), and the P3B step's ratio to a plain training step.

For each model: a plain training step (forward, backward, AdamW — `p3bkit train`), a P3B step
with the indicators on the whole batch (`--bpi-fraction 1`, the paper's) and on the default share
(`P3BConfig.bpi_fraction`), timed interleaved in one process on the same random batch; and the time
to load one batch from an ImageFolder of PNGs (digits, upsampled to the model's size) with 0 and
with N loader workers. Models: the digits-vit preset (16 px), DeiT-Tiny at 32 px, DeiT-S at 224 px.

    python benchmarks/training_cost.py --threads 2
Writes benchmarks/results/training_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, digits_image_folder, work_folder

from p3bkit.backends import machine_info
from p3bkit.backends.timing import BenchConfig, Timed, time_interleaved
from p3bkit.data import make_loader
from p3bkit.data.datasets import load_image_folder
from p3bkit.models import add_gates
from p3bkit.models.factory import create_model
from p3bkit.prune.pruner import P3BConfig, P3BPruner
from p3bkit.prune.schedule import Schedule
from p3bkit.train.fit import FitConfig, TrainStep

MODELS = {  # name: (timm model or preset, constructor arguments, image size, batch)
    "digits-vit": ("digits-vit", {}, 16, 64),
    "deit-tiny-32": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 10}, 32, 64),
    "deit-s-224": ("deit_small_patch16_224", {"num_classes": 10}, 224, 32),
}


def step_times(name: str, rounds: int, fractions: list[float]) -> dict:
    """Median seconds of a plain step and of P3B steps at each indicator fraction, interleaved."""
    model_ref, kwargs, size, batch = MODELS[name]
    torch.manual_seed(0)
    c = 1 if model_ref == "digits-vit" else 3
    x, y = torch.randn(batch, c, size, size), torch.randint(0, 10, (batch,))
    plain = TrainStep(create_model(model_ref, **kwargs).train(), FitConfig(epochs=10), 10)  # `p3bkit train`'s step
    pruners = []
    for f in fractions:
        gated = add_gates(create_model(model_ref, **kwargs), "heads").train()
        pruners.append(P3BPruner(gated, P3BConfig(keep=0.25, update_every=10**6, bpi_fraction=f), Schedule(0, 100, 0)))
    steps = [
        Timed("plain", "torch", lambda: plain(x, y)),
        *(Timed(f"p3b@{f:g}", "torch", lambda p=p: p.train_step(x, y)) for f, p in zip(fractions, pruners)),
    ]
    # one untimed step each (allocations, first-call costs), then one step of each in turn per round
    ms = time_interleaved(steps, BenchConfig(runs=rounds, warmup=1, warmup_seconds=0.0, block=1, block_warmup=0))
    times = {t.name: [v / 1e3 for v in lat] for t, lat in zip(steps, ms)}
    return {"batch": batch, "img_size": size, **{k: statistics.median(v) for k, v in times.items()}}


def load_times(name: str, root: Path, workers: list[int], batches: int) -> dict:
    """Seconds to load one training batch from the PNG ImageFolder (light augmentation), per worker count."""
    _, _, size, batch = MODELS[name]
    data = load_image_folder(root, size, 10, augment="light")
    out = {}
    for w in workers:
        loader = make_loader(data.train, batch, True, seed=0, workers=w)
        it = iter(loader)
        next(it)  # workers start
        t = time.perf_counter()
        n = 0
        for _ in range(batches):
            try:
                next(it)
                n += 1
            except StopIteration:
                break
        out[f"workers={w}"] = (time.perf_counter() - t) / max(n, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, P3BConfig().bpi_fraction])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fractions = list(dict.fromkeys(args.fractions))
    report = {
        "machine": machine_info(args.threads),
        "command": "python benchmarks/training_cost.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
        ),
        "models": {},
    }
    earlier = RESULTS / "training_cost.json"
    if earlier.is_file():  # keep the other models of an earlier run (each row names its command)
        old = json.loads(earlier.read_text())
        report["models"] = {name: {"command": old.get("command"), **r} for name, r in old["models"].items()}
    with work_folder("training-cost-") as work:
        for name in args.models:
            steps = step_times(name, args.rounds, fractions)
            folder = digits_image_folder(work / name, MODELS[name][2], train=600, val=100)
            loads = load_times(name, folder, args.workers, batches=5)
            report["models"][name] = {"steps": steps, "load": loads, "command": report["command"]}
            print(name, json.dumps(report["models"][name]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_cost.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "training_cost.md").write_text(render(report, fractions))
    print(render(report, fractions))


def render(report: dict, fractions: list[float]) -> str:
    m = report["machine"]
    lines = [
        "# Training and pruning cost per step",
        "",
        f"{m['cpu']}, {m['threads']} threads; `python benchmarks/training_cost.py` (each model's command below). "
        "Median seconds per step on one fixed random "
        "batch, every variant timed interleaved in one process; data loading timed separately from an ImageFolder "
        "of PNGs (light augmentation). P3B runs with structure `heads`; `p3b@f`: the indicators see a share f of "
        "each batch.",
        "",
        "| model | batch | plain step s | "
        + " | ".join(f"P3B step s (f={f:g})" for f in fractions)
        + " | "
        + " | ".join(f"P3B / plain (f={f:g})" for f in fractions)
        + " | images/s train | images/s prune (default f) |"
        + " load s/batch (workers 0 / 1) |",
        "|---" * (6 + 2 * len(fractions)) + "|",
    ]
    for name, r in report["models"].items():
        s, load = r["steps"], r["load"]
        p3b = [s[f"p3b@{f:g}"] for f in fractions]
        lines.append(
            f"| {name} | {s['batch']} | {s['plain']:.3f} | "
            + " | ".join(f"{t:.3f}" for t in p3b)
            + " | "
            + " | ".join(f"{t / s['plain']:.2f}×" for t in p3b)
            + f" | {s['batch'] / s['plain']:.1f} | "
            f"{s['batch'] / p3b[-1]:.1f} | " + " / ".join(f"{v:.3f}" for v in load.values()) + " |"
        )
    lines += [
        "",
        "Commands: "
        + "; ".join(f"{name}: `{r.get('command', report['command'])}`" for name, r in report["models"].items()),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
