"""Which augmentation fits small images trained from scratch: `p3bkit train --augment light|deit|none`.

The embedded digits set written as an ImageFolder of 28×28 RGB PNGs (1,437 train / 360 val, 10
classes), a 6-layer ViT (width 64, 4×4 patches) trained from scratch with each augmentation, same
seed and epochs; top-1 on the validation split. This is the setting where the DeiT recipe
(RandomResizedCrop down to 8%, RandAugment, random erasing, Mixup/CutMix) is the wrong default.

    python benchmarks/augment_digits.py --epochs 15      # ~10 min on 2 CPU cores
Writes benchmarks/results/augment_digits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, digits_image_folder, work_folder

from p3bkit.train.jobs import run_train

KWARGS = {"img_size": 28, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4, "num_classes": 10}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--augments", nargs="+", default=["light", "deit", "none"])
    ap.add_argument("--lr", type=float, default=8e-3, help="base lr at batch 512 (1e-3 at batch 64)")
    args = ap.parse_args()
    with work_folder("p3bkit-augment-") as work:
        data = digits_image_folder(work / "data", 28, resample="bilinear")
        rows = []
        for aug in args.augments:
            t0 = time.time()
            s = run_train(
                "vit_tiny_patch16_224",
                str(work / aug),
                data=str(data),
                epochs=args.epochs,
                lr=args.lr,
                model_kwargs=KWARGS,
                augment=aug,
                progress=False,
            )
            rows.append(
                {"augment": aug, "val_top1": s["val_acc"], "history": s["history"], "seconds": time.time() - t0}
            )
            print(f"{aug}: top-1 {s['val_acc']:.2f}% after {args.epochs} epochs ({time.time() - t0:.0f} s)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "command": f"python benchmarks/augment_digits.py --epochs {args.epochs} --lr {args.lr}",
        "rows": rows,
        "model": KWARGS,
        "machine": "this 2-core CPU, 2 threads, fp32",
    }
    (RESULTS / "augment_digits.json").write_text(json.dumps(meta, indent=1))
    lines = [
        "# Augmentation for small images trained from scratch",
        "",
        f"`{meta['command']}` ({meta['machine']}; digits as a 28×28 RGB ImageFolder, 6-layer ViT from scratch, seed 0)",
        "",
        "| --augment | val top-1 (%) | best epoch top-1 (%) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['augment']} | {r['val_top1']:.2f} | {max(h['val_acc'] for h in r['history']):.2f} |" for r in rows]
    (RESULTS / "augment_digits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
