"""Defects found while checking the landed code, each pinned by a test."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from p3bkit.cli import main
from p3bkit.data.transforms import resolve_augment, train_transform


def test_deit_augmentation_never_crashes_at_its_top_magnitude():
    t = train_transform(32, "deit")
    img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    for i in range(2000):  # the magnitude noise reaches the cap in about half of the draws
        random.seed(i)
        torch.manual_seed(i)
        assert t(img).shape == (3, 32, 32)


def test_augmentation_default_fits_the_task():
    assert resolve_augment("auto", pretrained=True, img_size=224) == "deit"
    assert resolve_augment("auto", pretrained=False, img_size=224) == "light"
    assert resolve_augment("auto", pretrained=True, img_size=28) == "light"
    assert resolve_augment("none", pretrained=True, img_size=224) == "none"


def test_every_command_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "p3bkit", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("analyze", "bench", "demo", "doctor", "eval", "export", "finetune", "info", "latency-table", "prune",
                    "train"):
        assert f"  {command} " in out
    res = subprocess.run([sys.executable, "-m", "p3bkit.cli", "analyze", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "Block Performance" in res.stdout


@pytest.mark.slow
def test_surgery_is_checked_with_rounded_widths(tmp_path):
    from p3bkit.prune.pruner import P3BConfig
    from p3bkit.prune.job import PruneJob, run_prune

    s = run_prune(PruneJob(out=str(tmp_path / "r"), epochs=(0, 1, 1), round_to=8, progress=False,
                           p3b=P3BConfig(keep=0.4, update_every=5)))
    assert s["surgery_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("args,msg", [
    (["--backend", "onnxruntime", "--precision", "bf16"], "onnxruntime runner cannot run --precision bf16"),
    (["--backend", "torch", "--precision", "int8"], "torch runner cannot run --precision int8"),
    (["--backend", "openvino", "--precision", "int8"], "INT8 needs calibration images"),
    (["--backend", "openvino", "--precision", "fp64"], "openvino runner cannot run --precision fp64"),
])
def test_bench_refuses_a_precision_it_would_ignore(args, msg):
    res = CliRunner().invoke(main, ["bench", "digits-vit", *args, "--runs", "2"])
    assert res.exit_code == 1 and msg in res.output


@pytest.mark.slow
def test_bench_records_what_ran_and_leaves_no_temp_folders(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("p3bkit-bench-*"))
    res = CliRunner().invoke(main, ["bench", "digits-vit", "--backend", "onnxruntime", "--runs", "3", "--warmup", "1",
                                    "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert set(Path(tempfile.gettempdir()).glob("p3bkit-bench-*")) == before
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["precision"] == "fp32"


def test_info_counts_block_parameters_as_stored():
    import timm

    from p3bkit.models.report import describe

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              qkv_bias=False)
    rows = describe(model)["blocks"]
    want = [sum(p.numel() for m in br.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
            for blk in model.blocks for br in (blk.attn, blk.mlp)]
    assert [r["params"] for r in rows] == want
