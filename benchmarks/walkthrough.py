"""Your data on a laptop: the README walk-through, run end to end through the `p3bkit` CLI.

Writes sklearn's 1,797 handwritten digits as an ImageFolder of 32×32 RGB PNGs (train 1,437 /
val 360, the embedded set's split), then runs what a newcomer runs, each command in its own
process, with the defaults except where noted:

    p3bkit train     a 4-layer, 64-wide ViT from scratch (--epochs 30 --augment none)
    p3bkit prune     P3B to half its parameters (--prune 0.5, the quick recipe)
    p3bkit finetune  10 epochs
    p3bkit export    OpenVINO fp32, and INT8 behind the 1-point accuracy gate
    p3bkit eval      every model and artefact on val/ through its runtime
    p3bkit bench     dense vs pruned, fp32 and INT8, batch 1, interleaved

and prints each command's wall time and accuracy. Digits are not mirror-symmetric, so the
walk-through trains with `--augment none` (the default, light, flips images).

    python benchmarks/walkthrough.py [--work DIR] [--threads N]

Writes benchmarks/results/walkthrough.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, digits_image_folder, work_folder

MODEL = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "global_pool": "avg", "class_token": False}


def p3bkit(*args, env: dict) -> tuple[str, float]:
    """Run one CLI command as a user would; its stdout and wall time (stderr passed through)."""
    cmd = [sys.executable, "-m", "p3bkit", *map(str, args)]
    print("$ p3bkit " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - t0
    print(res.stdout, end="", flush=True)
    if res.returncode != 0:
        raise SystemExit(f"p3bkit {args[0]} failed (exit {res.returncode})")
    return res.stdout, seconds


def top1(ref: Path, data: Path, env: dict) -> float:
    out, _ = p3bkit("eval", ref, "--data", data, "--json", "--no-progress", env=env)
    return json.loads(out)["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="Working folder (default: a temporary one, removed afterwards).")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for training and timing.")
    ap.add_argument("--epochs", type=int, default=30, help="Dense training epochs.")
    ap.add_argument("--finetune", type=int, default=10, help="Fine-tuning epochs after pruning.")
    ap.add_argument("--runs", type=int, default=300, help="Timed runs per model in the benchmark.")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with work_folder("p3bkit-walkthrough-", Path(args.work) if args.work else None) as work:
        data = digits_image_folder(work / "digits")
        steps, times = [], {}

        def step(name: str, *cmd) -> str:
            out, seconds = p3bkit(*cmd, env=env)
            times[name] = seconds
            command = "p3bkit " + " ".join(map(str, cmd)).replace(f"{work}/", "./")  # paths in the work folder
            steps.append({"step": name, "command": command, "seconds": round(seconds, 1)})
            return out

        step(
            "train",
            "train",
            "--model",
            "vit_tiny_patch16_224",
            "--num-classes",
            10,
            "--img-size",
            32,
            "--model-kwargs",
            json.dumps(MODEL),
            "--data",
            data,
            "--epochs",
            args.epochs,
            "--augment",
            "none",
            "--no-progress",
            "-o",
            work / "dense",
        )
        step(
            "prune",
            "prune",
            "--model",
            work / "dense",
            "--data",
            data,
            "--prune",
            0.5,
            "--augment",
            "none",
            "--no-progress",
            "-o",
            work / "prune",
        )
        step(
            "finetune",
            "finetune",
            work / "prune" / "pruned",
            "--data",
            data,
            "--epochs",
            args.finetune,
            "--augment",
            "none",
            "--no-progress",
            "-o",
            work / "pruned",
        )
        step("export fp32", "export", work / "pruned", "--format", "openvino", "-o", work / "ov")
        step(
            "export int8",
            "export",
            work / "pruned",
            "--format",
            "openvino",
            "--precision",
            "int8",
            "--calib-data",
            data,
            "-o",
            work / "ov-int8",
        )
        acc = {
            "dense (torch)": top1(work / "dense", data, env),
            "pruned, before fine-tuning (torch)": top1(work / "prune" / "pruned", data, env),
            "pruned + fine-tuned (torch)": top1(work / "pruned", data, env),
            "pruned, OpenVINO fp32": top1(work / "ov" / "model.xml", data, env),
            "pruned, OpenVINO INT8": top1(work / "ov-int8" / "model.xml", data, env),
        }
        step(
            "bench",
            "bench",
            work / "dense",
            work / "ov" / "model.xml",
            work / "ov-int8" / "model.xml",
            "--dense-baselines",
            "--runs",
            args.runs,
            "--threads",
            args.threads,
            "--json",
            work / "bench.json",
        )
        bench = json.loads((work / "bench.json").read_text())
        prune = json.loads((work / "prune" / "summary.json").read_text())
        report = {
            "machine": {"cpu": bench["machine"]["cpu"], "threads": args.threads, "python": platform.python_version()},
            "data": "sklearn digits as a 32-px RGB ImageFolder (1,437 train / 360 val)",
            "model": {"timm": "vit_tiny_patch16_224", "img_size": 32, "num_classes": 10, **MODEL},
            "steps": steps,
            "top1": acc,
            "params": {"dense": prune["params_dense"], "pruned": prune["params_stored"]},
            "bench": [
                {
                    "name": r["name"].replace(f"{work}/", "./"),
                    "backend": r["backend"],
                    "precision": r["precision"],
                    "median_ms": r["stats"]["median_ms"],
                    "baseline": r["baseline"],
                }
                for r in bench["results"]
            ],
        }
        write(report)


def write(report: dict) -> None:
    from p3bkit.fileio import write_json_atomic

    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "walkthrough.json", report)
    m = report["machine"]
    dense = min(r["median_ms"] for r in report["bench"] if r["baseline"])
    lines = [
        "# Your data on a laptop",
        "",
        f"`python benchmarks/walkthrough.py` on {m['cpu']}, {m['threads']} threads; {report['data']}; "
        f"a {report['model']['depth']}-layer, {report['model']['embed_dim']}-wide ViT "
        f"({report['params']['dense']:,} parameters, {report['params']['pruned']:,} after pruning).",
        "",
        "| step | command | wall time |",
        "|---|---|---|",
    ]
    lines += [
        f"| {s['step']} | `{s['command'].split(' --data')[0].split(' --model-kwargs')[0]} …` | {s['seconds']:.0f} s |"
        for s in report["steps"]
    ]
    lines += ["", "| model | val top-1 (%) |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["top1"].items()]
    lines += [
        "",
        "Batch 1, CPU, median of interleaved runs (`p3bkit bench --dense-baselines`); speedup vs the "
        "fastest dense runtime.",
        "",
        "| model | backend | precision | median ms | speedup |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['backend']} | {r['precision']} | {r['median_ms']:.3f} | {dense / r['median_ms']:.2f}× |"
        for r in report["bench"]
    ]
    (RESULTS / "walkthrough.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
