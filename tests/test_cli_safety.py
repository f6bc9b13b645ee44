"""Nothing lost: output folders, inputs, permissions, re-runs and resumes, driven through the CLI."""
from __future__ import annotations

import json
import os
import shutil
import stat
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


@pytest.mark.parametrize("args,msg", [
    (["finetune", "{run}/pruned", "--epochs", "1", "-o", "{run}"], "over its input"),
    (["finetune", "{run}/pruned", "--epochs", "1", "-o", "{run}/pruned"], "over its input"),
    (["finetune", "{run}/pruned", "--epochs", "1", "--force", "-o", "{run}"], "over its input"),
    (["prune", "--keep", "0.5", "-o", "{run}"], "is not empty"),
    (["prune", "--model", "{run}/pruned", "--keep", "0.5", "--force", "-o", "{run}/pruned/again"], "over its input"),
    (["prune", "--keep", "0.5", "--resume", "-o", "{run}"], "finished run"),
    (["finetune", "{run}/pruned", "--epochs", "0", "-o", "{run}/../ft0"], "epochs ≥ 1"),
    (["demo", "--keep", "1.5", "-o", "{run}/../demo"], "keep ratio must be in (0, 1)"),
])
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


def test_rerun_needs_force_and_then_replaces_only_its_own_run(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    res = _invoke([*PRUNE, "--keep", "0.3", "--force", "-o", out])
    assert res.exit_code == 0, res.output
    assert (out / "NOTES.txt").read_text() == "mine"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if r["type"] == "epoch"]) == 2  # one run's log, not two
    assert json.loads((out / "summary.json").read_text())["keep_target"] == 0.3


def test_checkpoint_removed_on_success_unless_kept(run_dir, tmp_path):
    assert not (run_dir / "checkpoint.pt").exists()
    res = _invoke([*PRUNE, "--keep-checkpoint", "-o", tmp_path / "kept"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "kept" / "checkpoint.pt").is_file()


def test_resume_refuses_other_settings_and_says_when_it_starts_fresh(tmp_path):
    from p3bkit.prune.engine import P3BConfig
    from p3bkit.workflows import PruneJob, run_prune

    job = PruneJob(out=str(tmp_path / "r"), epochs=(1, 1, 1), progress=False, stop_after_epoch=1,
                   p3b=P3BConfig(keep=0.7, update_every=5))
    assert run_prune(job) == {"stopped_after_epoch": 1}
    res = _invoke(["prune", "--keep", "0.3", "--epochs", "1", "1", "1", "--update-every", "5", "--resume",
                   "-o", tmp_path / "r"])
    assert res.exit_code == 1 and "p3b.keep" in res.output and "other settings" in res.output
    res = _invoke([*PRUNE, "--resume", "-o", tmp_path / "fresh"])
    assert res.exit_code == 0, res.output
    assert "no checkpoint.pt" in res.output and "starting from scratch" in res.output
    assert (tmp_path / "fresh" / "pruned" / "arch.json").is_file()
