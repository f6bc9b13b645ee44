"""Export DeiT-S dense and P3B-pruned (75%, both structures) to ONNX and OpenVINO from the CLI.

Random weights; widths from `results/allocations`. Records each export's time, parity and the
ONNX graph's op types in benchmarks/results/export_deit.md.

    python benchmarks/export_deit.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import work_folder

from p3bkit.models import PrunedArch, apply_arch, create_stock_model, save

HERE = Path(__file__).parent


def main() -> None:
    with work_folder("export-deit-") as work:
        refs = {"deit_s dense": "deit_small_patch16_224"}
        for structure in ("full", "inner"):
            f = HERE / "results" / "allocations" / f"deit_s_{structure}_75.json"
            arch = PrunedArch.from_json(json.loads(f.read_text()), str(f))
            refs[f"deit_s {structure} 75%"] = str(
                save(apply_arch(create_stock_model(arch.source), arch), work / structure)
            )
        lines = [
            "# DeiT-S exports (CLI, random weights, fp32, this 2-core CPU)\n",
            "| model | format | write op | seconds | max abs diff (batch 1 / 4) | ONNX op types |",
            "|---|---|---|---|---|---|",
        ]
        for label, ref in refs.items():
            for fmt in ("onnx", "openvino"):
                out = work / f"{label.replace(' ', '_').replace('%', '')}_{fmt}"
                subprocess.run(
                    [sys.executable, "-m", "p3bkit.cli", "export", ref, "--format", fmt, "-o", str(out)], check=True
                )
                rec = json.loads(next(out.glob("*.json")).read_text())
                diffs = " / ".join(f"{b['logits']['max_abs_diff']:.1e}" for b in rec["parity"].values())
                ops = ", ".join(f"{k} {v}" for k, v in rec["op_types"].items())
                lines.append(f"| {label} | {fmt} | {rec['write_op']} | {rec['seconds']:.1f} | {diffs} | {ops} |")
    (HERE / "results" / "export_deit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
