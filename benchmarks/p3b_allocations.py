"""Per-branch widths for the Table 7 models from short, real P3B pruning runs.

Throughput depends only on the architecture, so Table 7 may use random weights; the per-branch
widths (and heads, and which branches are removed) must still come from the P3B engine. This runs
P3B (BPI, budget, Taylor-ranked soft masks, sharpening, surgery) on random-init DeiT-S/B
(1000-class heads, as in Table 7) for the asked structures — `heads` (whole heads + head dims +
MLP hidden, with branch removal: P3B-heads, the default), `inner` (head dims + MLP hidden,
P3B-inner), `full` (the paper's six gates, P3B) — at 75% and 90% of *all* parameters pruned (the
paper's budget), and keeps each pruned model's arch.json. Data: the embedded digits set upsampled
to 224×224 (gray repeated to RGB; real images with a class signal, no download) — not ImageNet, so
the allocation is P3B's response to digits at DeiT width. `--train-images N` prunes on the first N
training digits (fewer steps per epoch: a CPU run).

`speed` (P3B-heads under both budgets) prunes to the same parameter budget and a latency target at
once (`p3bkit prune --keep … --target-speedup … --latency-table …`): `--speed-targets 75=4.8 90=11.5`
asks for those speedups over the table's dense model, with the tables in `--latency-tables`
(deit_s=… deit_b=…, from `p3bkit latency-table MODEL --heads all` on the runtime timed), with
`p3bkit prune`'s default speed checks (the summary's measured speedup is kept in arch.json).

    python benchmarks/p3b_allocations.py --device cuda --bf16 -o benchmarks/results/allocations
    python benchmarks/p3b_allocations.py --structures heads --train-images 320 --batch-size 16 --epochs 1 2 1 \
        --update-every 3 --threads 2                         # this 2-core CPU
    python benchmarks/p3b_allocations.py --structures speed --speed-targets 75=4.8 90=11.5 \
        --latency-tables deit_s=benchmarks/results/latency/deit_s_openvino.json \
        deit_b=benchmarks/results/latency/deit_b_openvino.json --train-images 320 --batch-size 16 --epochs 1 2 1 \
        --update-every 3 --threads 2                         # both budgets, this 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from p3bkit.fileio import write_json_atomic
from p3bkit.prune.job import PruneJob, run_prune
from p3bkit.prune.pruner import P3BConfig
from p3bkit.prune.recipes import RECIPES

MODELS = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}
STRUCTURES = {
    "heads": {"structure": "heads", "remove_below": 0.05},
    "inner": {"structure": "inner"},
    "full": {"structure": "full"},
    "speed": {"structure": "heads", "remove_below": 0.05},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default="benchmarks/results/allocations")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--structures", nargs="+", default=["heads", "inner", "full"], choices=list(STRUCTURES))
    ap.add_argument("--epochs", nargs=3, type=int, default=(1, 5, 4))
    ap.add_argument("--update-every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--rates", nargs="+", type=int, default=[90, 75])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--train-images", type=int, help="prune on the first N training images (PruneJob.train_images)")
    ap.add_argument("--threads", type=int, help="torch threads (CPU)")
    ap.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    ap.add_argument(
        "--speed-targets",
        nargs="+",
        default=[],
        metavar="RATE=SPEEDUP",
        help="structure speed: the speedup asked at each pruning rate",
    )
    ap.add_argument(
        "--latency-tables",
        nargs="+",
        default=[],
        metavar="MODEL=TABLE",
        help="structure speed: the latency table of each model",
    )
    args = ap.parse_args()
    speed = {int(k): float(v) for k, v in (a.split("=") for a in args.speed_targets)}
    tables = dict(a.split("=") for a in args.latency_tables)
    if "speed" in args.structures and (set(args.rates) - set(speed) or set(args.models) - set(tables)):
        ap.error("--structures speed needs --speed-targets for every rate and --latency-tables for every model")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    for key in args.models:
        for prune in args.rates:
            for structure in args.structures:
                t0 = time.time()
                run_dir = Path("/tmp/p3b-alloc") / f"{key}_{structure}_{prune}"
                resume = args.resume and (run_dir / "checkpoint.pt").is_file()
                if not resume:
                    shutil.rmtree(run_dir, ignore_errors=True)
                quick = RECIPES["quick"]
                job = PruneJob(
                    out=str(run_dir),
                    model=MODELS[key],
                    data=data,
                    epochs=tuple(args.epochs),
                    batch_size=args.batch_size,
                    structure=STRUCTURES[structure]["structure"],
                    device=args.device,
                    progress=False,
                    bf16=args.bf16,
                    augment="none",
                    train_images=args.train_images,
                    latency_table=tables[key] if structure == "speed" else None,
                    target_speedup=speed[prune] if structure == "speed" else None,
                    p3b=P3BConfig(
                        keep=1 - prune / 100,
                        budget="total",
                        update_every=args.update_every,
                        lr_model=quick.lr,
                        lr_bpi=quick.lr_bpi,
                        remove_below=STRUCTURES[structure].get("remove_below", 0.0),
                        keep_too=structure == "speed",
                    ),
                )
                s = run_prune(job, resume=resume)
                arch = json.loads((run_dir / "pruned" / "arch.json").read_text())
                arch["p3b_run"] = {
                    k: s[k]
                    for k in (
                        "budget",
                        "total_keep",
                        "block_keep_nominal",
                        "params_dense",
                        "params_kept",
                        "kappa",
                        "disabled_blocks",
                        "val_acc_pruned",
                        "surgery_max_abs_diff",
                    )
                }
                if "latency" in s:
                    arch["p3b_run"]["latency"] = s["latency"]
                arch["p3b_run"].update(
                    seconds=time.time() - t0,
                    device=args.device,
                    epochs=list(args.epochs),
                    data=args.data
                    if not args.train_images
                    else f"{args.data}, first {args.train_images} training images",
                    update_every=args.update_every,
                    bf16=args.bf16,
                    batch_size=args.batch_size,
                    **STRUCTURES[structure],
                )
                write_json_atomic(out / f"{key}_{structure}_{prune}.json", arch)
                print(
                    f"{key} {structure} {prune}%: kept {s['total_keep']:.4f} of all ({s['params_kept']:,}), "
                    f"{s['block_keep_nominal']:.4f} of blocks, digits top-1 {s['val_acc_pruned']:.1f}, "
                    f"in {time.time() - t0:.0f} s",
                    flush=True,
                )
                if "latency" in s:
                    lat = s["latency"]
                    print(
                        f"  predicted {lat['predicted_ms']:.2f} ms = {lat['predicted_speedup']:.2f}× (asked "
                        f"{lat['target_speedup']:.2f}×; {lat['bound']} bound; fastest at this parameter budget "
                        f"{lat['fastest_at_parameter_budget_speedup']:.2f}×)",
                        flush=True,
                    )
                    if "measured_speedup" in lat.get("measured", {}):
                        print(
                            f"  measured {lat['measured']['measured_speedup']:.2f}× beside the dense model after "
                            f"{len(lat['speed_checks'])} speed check(s)",
                            flush=True,
                        )
                shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
