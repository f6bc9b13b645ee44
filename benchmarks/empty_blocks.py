"""Do P3B blocks get emptied, and does the emptied-block policy matter? (`--empty-blocks disable|regrow`)

A dense digits-vit-cls (`p3bkit train`'s pipeline: seed 0, 30 epochs, the from-scratch recipe) is
pruned with the six-gate structure at 50 / 25 / 10% of all parameters kept, once per policy, with the
quick recipe's learning rates, with branch removal off (`remove_below` 0: a block that keeps 0
parameters was emptied by accident) and at its default (there a branch below its smallest useful
width is removed on purpose); the log of every mask update tells whether any block ever kept 0
parameters.

    python benchmarks/empty_blocks.py        # ~5 min on 2 CPU cores
Writes benchmarks/results/empty_blocks.md.
"""

from __future__ import annotations

import itertools
import json

from common import RESULTS, work_folder

from p3bkit.prune.job import PruneJob, run_prune
from p3bkit.prune.pruner import P3BConfig
from p3bkit.prune.recipes import RECIPES
from p3bkit.train.jobs import run_train


def main() -> None:
    with work_folder("p3bkit-empty-") as work:
        dense = work / "dense"
        run_train("digits-vit-cls", str(dense), data="digits", epochs=30, seed=0, progress=False)
        quick = RECIPES["quick"]
        lines = [
            "# Emptied blocks on digits-vit-cls",
            "",
            "`python benchmarks/empty_blocks.py` (dense: `p3bkit train` "
            "pipeline, 30 epochs; seed 0, six gates, epochs 1/4/4, a mask update every 5 iterations, `--teacher none`, "
            "this 2-core CPU)",
            "",
            "| keep (of all params) | branch removal (remove_below) | policy | top-1 before fine-tune (%) | kept "
            "| blocks ever emptied | disabled |",
            "|---|---|---|---|---|---|---|",
        ]
        for keep, removal, policy in itertools.product(
            (0.5, 0.25, 0.1), (0.0, P3BConfig().remove_below), ("disable", "regrow")
        ):
            out = work / f"{keep}_{removal}_{policy}"
            s = run_prune(
                PruneJob(
                    out=str(out),
                    model=str(dense),
                    epochs=(1, 4, 4),
                    structure="full",
                    progress=False,
                    teacher="none",  # its committed numbers were made without a teacher (the default before)
                    p3b=P3BConfig(
                        keep=keep,
                        update_every=5,
                        lr_model=quick.lr,
                        lr_bpi=quick.lr_bpi,
                        empty_blocks=policy,
                        remove_below=removal,
                    ),
                )
            )
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            emptied = sorted(
                {i for r in log if r["type"] == "mask_update" for i, kept in enumerate(r["kept_params"]) if kept == 0}
            )
            removal_label = "off" if removal == 0 else f"{removal:g} (default)"
            lines.append(
                f"| {keep:.2f} | {removal_label} | {policy} | {s['val_acc_pruned']:.2f} | {s['total_keep']:.4f} | "
                f"{emptied or 'none'} | {s['disabled_blocks'] or 'none'} |"
            )
            print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "empty_blocks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
