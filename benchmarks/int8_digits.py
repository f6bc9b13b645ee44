"""INT8 accuracy of P3B-pruned digits models (the demo's model at 75% and 90% pruned), per runtime.

For each seed and budget: the demo pipeline (dense training → P3B at keep 0.25 / 0.10 of all
parameters → fine-tuning) → `p3bkit export --precision int8 --calib-data digits` on onnxruntime
and OpenVINO. Both top-1s come from the export's accuracy gate: the fp32 graph and the INT8
artefact on the 360 validation images, through the same runtime. Target: INT8 within 1 point.

    python benchmarks/int8_digits.py --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import json

import torch
from common import RESULTS, work_folder

from p3bkit.demo import run_demo
from p3bkit.errors import P3BError
from p3bkit.export import export_model
from p3bkit.export.int8 import Int8Config

BUDGETS = {75: 0.25, 90: 0.10}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        for rate, keep in BUDGETS.items():
            with work_folder(f"int8-digits-{rate}-{seed}-") as work:
                run_demo(
                    str(work / "demo"), keep=keep, seed=seed, progress=False, speed_runs=0, teacher="none"
                )  # its committed numbers were made without a teacher (prune's default before)
                for fmt in ("onnx", "openvino"):
                    row = {"seed": seed, "prune_rate": rate, "format": fmt}
                    try:
                        rec = export_model(
                            str(work / "demo" / "pruned"),
                            fmt,
                            work / fmt,
                            precision="int8",
                            int8=Int8Config("digits", args.calib_size, max_drop=args.max_drop, progress=False),
                        )
                        row.update(rec.extra["int8"])
                    except P3BError as exc:  # a tripped gate is a result, not a crash
                        row["error"] = str(exc)
                    rows.append(row)
                    print(
                        json.dumps(
                            {
                                k: row.get(k)
                                for k in ("seed", "prune_rate", "format", "fp32_top1", "int8_top1", "drop", "error")
                            }
                        ),
                        flush=True,
                    )
    report = {
        "rows": rows,
        "calib_size": args.calib_size,
        "max_drop": args.max_drop,
        "threads": args.threads,
        "budget": "fraction of all parameters pruned (the paper's)",
        "model": "digits-vit (demo)",
    }
    (RESULTS / "int8_digits.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "int8_digits.md").write_text(format_report(report))
    print(format_report(report))


def format_report(report: dict) -> str:
    lines = [
        "# INT8 accuracy on digits (`python benchmarks/int8_digits.py`)",
        "",
        f"The demo's model pruned by P3B (`--teacher none`), fine-tuned, then INT8 (calibration: {report['calib_size']} digits "
        "train images; top-1 on the 360 validation images through each runtime, fp32 graph vs INT8 artefact).",
        "",
        "| prune rate | runtime | seeds | fp32 top-1 | INT8 top-1 | drop (mean) | worst drop | within 1 point |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in BUDGETS:
        for fmt in ("onnx", "openvino"):
            rs = [r for r in report["rows"] if r["prune_rate"] == rate and r["format"] == fmt]
            ok = [r for r in rs if "drop" in r]
            if not rs:
                continue
            mean = lambda k: sum(r[k] for r in ok) / max(len(ok), 1)  # noqa: E731
            worst = max((r["drop"] for r in ok), default=float("nan"))
            within = sum(r["drop"] <= 1.0 for r in ok)
            lines.append(
                f"| {rate}% | {fmt} | {len(rs)} | {mean('fp32_top1'):.2f} | {mean('int8_top1'):.2f} | "
                f"{mean('drop'):+.2f} | {worst:+.2f} | {within} of {len(rs)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--max-drop", type=float, default=100.0, help="gate for this study (report every drop)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
