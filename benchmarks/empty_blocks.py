"""Do P3B blocks get emptied, and does the emptied-block policy matter? (`--empty-blocks disable|regrow`)

A dense digits-vit-cls (seed 0, 30 epochs) is pruned with the six-gate structure at 50 / 25 / 10% of
all parameters kept, once per policy, with the quick recipe's learning rates; the log of every mask
update tells whether any block ever kept 0 parameters.

    python benchmarks/empty_blocks.py        # ~2 min on 2 CPU cores
Writes benchmarks/results/empty_blocks.md.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from p3bkit.data import load_data
from p3bkit.models.factory import create_model
from p3bkit.prune.job import PruneJob, run_prune
from p3bkit.prune.pruner import P3BConfig
from p3bkit.prune.recipes import RECIPES
from p3bkit.train.fit import FitConfig, fit, seed_everything

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="p3bkit-empty-"))
    atexit.register(shutil.rmtree, work, True)  # exported models and runs go with the process
    seed_everything(0)
    dense = create_model("digits-vit-cls")
    fit(dense, load_data("digits"), FitConfig(epochs=30, lr=2e-3, seed=0, progress=False))
    ckpt = work / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, ckpt)
    quick = RECIPES["quick"]
    lines = ["# Emptied blocks on digits-vit-cls", "", "`python benchmarks/empty_blocks.py` (seed 0, six gates, "
             "epochs 1/4/4, a mask update every 5 iterations, this 2-core CPU)", "",
             "| keep (of all params) | policy | top-1 before fine-tune (%) | kept | blocks ever emptied | disabled |",
             "|---|---|---|---|---|---|"]
    for keep in (0.5, 0.25, 0.1):
        for policy in ("disable", "regrow"):
            out = work / f"{keep}_{policy}"
            s = run_prune(PruneJob(out=str(out), model="digits-vit-cls", weights=str(ckpt), epochs=(1, 4, 4),
                                   structure="full", progress=False,
                                   p3b=P3BConfig(keep=keep, update_every=5, lr_model=quick.lr, lr_bpi=quick.lr_bpi,
                                                 empty_blocks=policy)))
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            emptied = sorted({i for r in log if r["type"] == "mask_update"
                              for i, kept in enumerate(r["kept_params"]) if kept == 0})
            lines.append(f"| {keep:.2f} | {policy} | {s['val_acc_pruned']:.2f} | {s['total_keep']:.4f} | "
                         f"{emptied or 'none'} | {s['disabled_blocks'] or 'none'} |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "empty_blocks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
