"""Nothing lost: output folders, inputs, permissions, re-runs and resumes, driven through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from p3bkit.cli import main

PRUNE = ["prune", "--model", "digits-vit", "--keep", "0.5", "--epochs", "0", "1", "1", "--update-every", "5"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished prune run folder with a user's note in it."""
    out = tmp_path_factory.mktemp("safety") / "run"
    res = _invoke([*PRUNE, "-o", out])
    assert res.exit_code == 0, res.output
    (out / "NOTES.txt").write_text("mine")
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,msg",
    [
        (["finetune", "{run}/pruned", "--epochs", "1", "-o", "{run}"], "over its input"),
        (["finetune", "{run}/pruned", "--epochs", "1", "-o", "{run}/pruned"], "over its input"),
        (["finetune", "{run}/pruned", "--epochs", "1", "--force", "-o", "{run}"], "over its input"),
        (["prune", "--keep", "0.5", "-o", "{run}"], "is not empty"),
        (["prune", "--model", "{run}/pruned", "--keep", "0.5", "--force", "-o", "{run}/pruned/again"], "not supported"),
        (["prune", "--keep", "0.5", "--resume", "-o", "{run}"], "finished run"),
        (["finetune", "{run}/pruned", "--epochs", "1", "-o", "{run}/.."], "over its input"),
    ],
)
def test_commands_never_touch_what_they_did_not_write(run_dir, args, msg):
    before = _tree(run_dir.parent)
    res = _invoke([a.format(run=run_dir) for a in args])
    assert res.exit_code == 1, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert _tree(run_dir.parent) == before


def test_finetune_refuses_foreign_folder_and_force_keeps_its_files(run_dir, tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "NOTES.txt").write_text("keep me")
    res = _invoke(["finetune", run_dir / "pruned", "--epochs", "1", "-o", out])
    assert res.exit_code == 1 and "is not empty (NOTES.txt)" in res.output
    res = _invoke(["finetune", run_dir / "pruned", "--epochs", "1", "--force", "-o", out])
    assert res.exit_code == 0, res.output
    assert (out / "NOTES.txt").read_text() == "keep me"
    assert {"arch.json", "model.safetensors", "finetune.json"} <= {p.name for p in out.iterdir()}


def test_saved_models_get_the_usual_permissions(run_dir, tmp_path):
    old = os.umask(0o022)
    try:
        res = _invoke(["finetune", run_dir / "pruned", "--epochs", "1", "-o", tmp_path / "ft"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE((tmp_path / "ft").stat().st_mode) == 0o755
    for f in ("arch.json", "model.safetensors", "finetune.json"):
        assert stat.S_IMODE((tmp_path / "ft" / f).stat().st_mode) == 0o644
    assert stat.S_IMODE((run_dir / "pruned" / "model.safetensors").stat().st_mode) & 0o044 == 0o044


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_unwritable_output_fails_before_any_work(run_dir, tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    args = [*PRUNE] if command == "prune" else ["finetune", run_dir / "pruned", "--epochs", "1"]
    res = _invoke([*args, "-o", blocker / "out"])
    assert res.exit_code == 1 and "cannot write to" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_rerun_needs_force_and_then_replaces_only_its_own_run(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    res = _invoke([*PRUNE, "--keep", "0.3", "--force", "-o", out])
    assert res.exit_code == 0, res.output
    assert (out / "NOTES.txt").read_text() == "mine"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if r["type"] == "epoch"]) == 2  # one run's log, not two
    assert json.loads((out / "summary.json").read_text())["keep_target"] == 0.3


@pytest.mark.slow
def test_checkpoint_removed_on_success_unless_kept(run_dir, tmp_path):
    assert not (run_dir / "checkpoint.pt").exists()
    res = _invoke([*PRUNE, "--keep-checkpoint", "-o", tmp_path / "kept"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "kept" / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_resume_refuses_other_settings_and_says_when_it_starts_fresh(tmp_path):
    from p3bkit.prune.job import PruneJob, run_prune
    from p3bkit.prune.pruner import P3BConfig

    job = PruneJob(
        out=str(tmp_path / "r"),
        epochs=(1, 1, 1),
        progress=False,
        stop_after_epoch=1,
        p3b=P3BConfig(keep=0.7, update_every=5),
    )
    assert run_prune(job) == {"stopped_after_epoch": 1}
    res = _invoke(
        ["prune", "--keep", "0.3", "--epochs", "1", "1", "1", "--update-every", "5", "--resume", "-o", tmp_path / "r"]
    )
    assert res.exit_code == 1 and "p3b.keep" in res.output and "other settings" in res.output
    res = _invoke([*PRUNE, "--resume", "-o", tmp_path / "fresh"])
    assert res.exit_code == 0, res.output
    assert "no checkpoint.pt" in res.output and "starting from scratch" in res.output
    assert (tmp_path / "fresh" / "pruned" / "arch.json").is_file()


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_finetune_resumes_exactly_after_a_stop(run_dir, tmp_path, sig):
    import torch

    args = ["finetune", str(run_dir / "pruned"), "--epochs", "4", "--seed", "3"]
    ref = subprocess.run(
        [sys.executable, "-m", "p3bkit.cli", *args, "-o", str(tmp_path / "ref")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "ft"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p3bkit.cli", *args, "-o", str(out)], stderr=subprocess.PIPE, text=True
    )
    t0 = time.time()
    while not (out / "checkpoint.pt").exists():  # epoch 1 done: the stop lands in epoch 2
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 600
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 1 and "stopped by SIGTERM" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()
    res = _invoke([*args, "--resume", "-o", out])
    assert res.exit_code == 0, res.output
    a, b = _weights(out), _weights(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not (out / "checkpoint.pt").exists()
    hist = json.loads((out / "finetune.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb")
    for split in ("train", "val"):
        for c in range(10):  # as many classes as the digits preset, so only the channels differ
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (40 * i, 20 * c, 200)).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (["prune", "--keep", "0.5", "--batch-size", "0", "-o", "{tmp}/p"], 2, "'--batch-size': 0 is not in the range"),
        (["prune", "--keep", "0.5", "--round-to", "0", "-o", "{tmp}/p"], 2, "'--round-to'"),
        (["prune", "--keep", "0.5", "--tau", "-1", "-o", "{tmp}/p"], 2, "'--tau'"),
        (["prune", "--keep", "0.5", "--alpha", "7", "-o", "{tmp}/p"], 2, "'--alpha'"),
        (["prune", "--prune", "1", "-o", "{tmp}/p"], 2, "'--prune'"),
        (["prune", "--keep", "0.5", "--device", "banana", "-o", "{tmp}/p"], 2, "is not a device"),
        (["prune", "--keep", "0.5", "--device", "gpu", "-o", "{tmp}/p"], 1, "no CUDA GPU"),
        (["finetune", "{run}/pruned", "--device", "cuda", "-o", "{tmp}/f"], 1, "no CUDA GPU"),
        (["prune", "--keep", "0.5", "--data", "{rgb}", "-o", "{tmp}/p"], 1, "3-channel images, but the model takes 1"),
        (["export", "digits-vit", "--format", "onnx", "--static-batch", "-3", "-o", "{tmp}/e"], 2, "'--static-batch'"),
        (["bench", "digits-vit", "--duration", "-1"], 2, "'--duration'"),
        (["demo", "--keep", "0", "-o", "{tmp}/d"], 2, "'--keep'"),
        (["demo", "--keep", "1.5", "-o", "{tmp}/d"], 2, "'--keep'"),
        (["finetune", "{run}/pruned", "--epochs", "0", "-o", "{tmp}/f"], 2, "'--epochs'"),
        (["analyze", "digits-vit", "--steps", "0", "-o", "{tmp}/a"], 2, "'--steps'"),
        (["info", "resnet18"], 1, "not a timm VisionTransformer"),
        (["info", "vit_small_patch16_18x2_224"], 1, "only timm's standard Block"),
        (
            ["export", "vit_pwee_patch16_reg1_gap_256", "--format", "onnx", "-o", "{tmp}/e"],
            1,
            "only timm's standard Block",
        ),
        (["bench", "resnet18", "--runs", "1"], 1, "not a timm VisionTransformer"),
        (["info", "{run}"], 1, "did you mean"),
        (["info", "{tmp}/nope/model"], 1, "no such file or folder"),
        (
            ["prune", "--model", "{run}/pruned", "--keep", "0.5", "-o", "{tmp}/p"],
            1,
            "pruning it again is not supported",
        ),
        (["prune", "--keep", "0.01", "-o", "{tmp}/p"], 1, "leaves nothing for the blocks"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run_dir, rgb_folder, tmp_path, args, code, msg):
    import torch

    if any(a in ("gpu", "cuda") for a in args) and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = _invoke([a.format(run=run_dir, tmp=tmp_path, rgb=rgb_folder) for a in args])
    assert res.exit_code == code, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # nothing created, not even an empty run folder


def test_analyze_works_on_a_pruned_folder(run_dir, tmp_path):
    res = _invoke(["analyze", run_dir / "pruned", "--steps", "4", "-o", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "a" / "block_performance.json").read_text())
    assert len(data[0]["delta_c"]) == 12


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_demo_resumes_after_a_stop(tmp_path, sig):
    from p3bkit.demo import run_demo

    small = dict(dense_epochs=3, prune_epochs=(0, 1, 1), finetune_epochs=2, progress=False, speed_runs=0)
    ref = run_demo(str(tmp_path / "ref"), **small)
    out = tmp_path / "demo"
    code = f"from p3bkit.demo import run_demo; run_demo({str(out)!r}, **{small!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "dense" / "checkpoint.pt").exists():  # the dense stage's first epoch is done
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 600
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and (sig == signal.SIGKILL or "stopped by SIGTERM" in err)
    got = run_demo(str(out), resume=True, **small)
    for name in ("dense", "pruned"):
        for key in ("val_acc", "params", "flops"):
            assert got["results"][name][key] == ref["results"][name][key]
    assert got["results"]["pruned"]["val_acc_before_finetune"] == ref["results"]["pruned"]["val_acc_before_finetune"]
    assert not list(out.rglob("checkpoint.pt"))


@pytest.mark.slow
def test_honest_prune_and_export_messages(tmp_path):
    res = _invoke(
        [
            "prune",
            "--keep",
            "0.5",
            "--epochs",
            "0",
            "1",
            "1",
            "--update-every",
            "1000",
            "--round-to",
            "8",
            "--no-progress",
            "-o",
            tmp_path / "p",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "warning: only 0 mask update(s) during sparsify" in res.output
    assert "the saved model stores" in res.output and "--round-to" in res.output
    res = _invoke(["export", "digits-vit", "--format", "onnx", "--no-verify", "-o", tmp_path / "e"])
    assert res.exit_code == 0, res.output
    assert "not verified against torch" in res.output and "nan" not in res.output


@pytest.mark.slow
def test_bench_takes_an_export_folder_and_warns_about_mixed_comparisons(tmp_path):
    res = _invoke(["export", "digits-vit", "--format", "onnx", "-o", tmp_path / "e"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "digits-vit",
            str(tmp_path / "e"),
            "deit_tiny_patch16_224",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "b.json").read_text())
    assert [r["backend"] for r in rep["results"]] == ["torch", "onnxruntime", "torch"]
    assert any("different backends" in w for w in rep["warnings"])
    assert any("different architectures (deit_tiny_patch16_224, vit_tiny_patch16_224)" in w for w in rep["warnings"])
    assert "warning: the models run on different backends" in res.output
