"""The benchmarks: public API only, and the GPU script's CPU dry run.

Benchmarks are what a user reruns to check a number, so they use what a user can: p3bkit's public
names (nothing starting with an underscore, no module patched at run time) and its CLI; shared
pieces live in benchmarks/common.py. `benchmarks/gpu_table7.py --dry-run` walks the GPU script's
every step on the CPU, so the script a lent GPU runs has run before.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def private_uses(source: str) -> list[str]:
    """Private p3bkit names a script imports or reads, and p3bkit module attributes it assigns."""
    tree = ast.parse(source)
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "p3bkit":
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"from {node.module}")
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "p3bkit"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{node.value.id}.{node.attr}")
            if isinstance(node.ctx, ast.Store):
                found.append(f"assigns {node.value.id}.{node.attr}")
    return found


def test_the_check_finds_private_names_and_patches():
    src = (
        "from p3bkit.train.fit import FitConfig, _optimizer\nimport p3bkit.data.datasets as datasets\n"
        "from p3bkit.data import datasets as ds\nds.load_digits_data = None\nx = ds._pick\n"
    )
    assert private_uses(src) == ["from p3bkit.train.fit import _optimizer", "assigns ds.load_digits_data", "ds._pick"]
    assert private_uses("from p3bkit.export import export_model\nexport_model('a', 'onnx', 'b')\n") == []


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmarks_use_public_names_only(script):
    assert private_uses((BENCHMARKS / script).read_text()) == []
    assert "sys.path.insert" not in (BENCHMARKS / script).read_text()  # shared code lives in common.py


@pytest.mark.slow
def test_gpu_table7_dry_run_walks_every_row(tmp_path):
    """The GPU script on the CPU (batch 2): torch eager, torch.compile and ONNX Runtime run (on its
    CPU provider); TensorRT cannot run here and its rows say why; JSON and markdown are written."""
    out = tmp_path / "gpu_table7.json"
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_table7.py",
            "--dry-run",
            "--models",
            "deit_s",
            "--prunes",
            "90",
            "-o",
            str(out),
        ],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["variant"], r["row"]): r for r in report["rows"]}
    assert report["dry_run"] and report["batch"] == 2 and len(rows) == 12
    for variant in ("dense", "heads_90"):
        for row in ("torch eager", "torch.compile", "onnxruntime cuda"):
            assert rows[variant, row]["status"] == "ok" and rows[variant, row]["median_ms"] > 0, rows[variant, row]
        for row in ("tensorrt fp32", "tensorrt fp16", "tensorrt int8"):
            assert (
                rows[variant, row]["status"].startswith("could not run: ") and "ensorRT" in rows[variant, row]["status"]
            )
    md = out.with_suffix(".md").read_text()
    assert "| deit_s | heads_90 |" in md and "×)" in md
