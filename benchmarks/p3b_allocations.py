"""Per-block widths for the Table 7 models from short, real P3B pruning runs.

Throughput depends only on the architecture, so Table 7 may use random weights; the per-block
widths must still come from the P3B engine. This runs P3B (BPI, budget, Taylor-ranked soft
masks, sharpening, surgery) on random-init DeiT-S/B with synthetic images, for both structures
(`full`: six gates; `inner`: head dims + MLP hidden) at 75% and 90% pruning, and keeps each
pruned model's arch.json. On random data the BPI sees no class signal, so the allocation is P3B's
response to noise, not to ImageNet; record that next to any number made from it.

    python benchmarks/p3b_allocations.py --device cuda -o benchmarks/results/allocations
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from p3bkit.prune.engine import P3BConfig
from p3bkit.workflows import PruneJob, run_prune

MODELS = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default="benchmarks/results/allocations")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--structures", nargs="+", default=["full", "inner"])
    ap.add_argument("--epochs", nargs=3, type=int, default=(1, 2, 1))
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key in args.models:
        for structure in args.structures:
            for prune in (75, 90):
                t0 = time.time()
                run_dir = Path("/tmp/p3b-alloc") / f"{key}_{structure}_{prune}"
                job = PruneJob(out=str(run_dir), model=MODELS[key], data="synthetic", epochs=tuple(args.epochs),
                               batch_size=args.batch_size, structure=structure, device=args.device, progress=False,
                               p3b=P3BConfig(keep=1 - prune / 100, update_every=2))
                s = run_prune(job)
                arch = json.loads((run_dir / "pruned" / "arch.json").read_text())
                arch["p3b_run"] = {"block_keep_nominal": s["block_keep_nominal"], "kappa": s["kappa"],
                                   "surgery_max_abs_diff": s["surgery_max_abs_diff"], "seconds": time.time() - t0,
                                   "device": args.device, "epochs": list(args.epochs), "data": "synthetic"}
                (out / f"{key}_{structure}_{prune}.json").write_text(json.dumps(arch))
                print(f"{key} {structure} {prune}%: kept {s['block_keep_nominal']:.4f} in {time.time() - t0:.0f} s", flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
