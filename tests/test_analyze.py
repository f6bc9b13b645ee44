"""Baseline allocations and `p3bkit analyze` on a real tiny run."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from p3bkit.cli import main
from p3bkit.prune.job import PruneJob, run_prune
from p3bkit.prune.pruner import P3BConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("alloc")
    out = {}
    for alloc in ("uniform", "global-magnitude"):
        job = PruneJob(
            out=str(root / alloc),
            epochs=(0, 1, 1),
            progress=False,
            p3b=P3BConfig(keep=0.4, budget="blocks", update_every=5, allocation=alloc),
        )
        out[alloc] = (root / alloc, run_prune(job))
    return out


@pytest.mark.slow
def test_uniform_gives_equal_kappa(runs):
    _, s = runs["uniform"]
    assert s["kappa"] == pytest.approx([0.4] * len(s["kappa"]), abs=1e-6)
    assert abs(s["block_keep_nominal"] - 0.4) <= 0.02


@pytest.mark.slow
def test_global_magnitude_meets_budget_with_uneven_blocks(runs):
    _, s = runs["global-magnitude"]
    assert abs(s["block_keep_nominal"] - 0.4) <= 0.02
    assert max(s["kappa"]) - min(s["kappa"]) > 0.05  # one global threshold: blocks differ


def test_analyze_writes_figures_with_the_logs_numbers(runs, tmp_path):
    run_dir, _ = runs["uniform"]
    res = CliRunner().invoke(main, ["analyze", str(run_dir), str(runs["global-magnitude"][0]), "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for f in ("block_performance.png", "keep_ratios.png", "kept_widths.png", "index.html"):
        assert (tmp_path / f).stat().st_size > 1000
    updates = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    updates = [u for u in updates if u["type"] == "mask_update"]
    mean_c = [sum(u["delta_c"][i] for u in updates) / len(updates) for i in range(len(updates[0]["delta_c"]))]
    page = (tmp_path / "index.html").read_text()
    table = page.split(f"<h2>{run_dir.name}</h2>")[1].split("</table>")[0]
    cells = re.findall(r"<tr><td>[\d.a-z]+</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", table)
    assert [float(c[0]) for c in cells] == pytest.approx(mean_c, rel=1e-5, abs=1e-12)
    assert [float(c[2]) for c in cells] == pytest.approx(updates[-1]["kappa"], rel=1e-5)


@pytest.mark.slow
def test_analyze_plain_model_trains_bpi_only(tmp_path):
    res = CliRunner().invoke(main, ["analyze", "digits-vit", "--steps", "30", "--no-progress", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "analyze epoch 1/1: 30 steps, BPI loss" in res.output  # the run skeleton's line for the epoch
    data = json.loads((tmp_path / "block_performance.json").read_text())
    assert len(data[0]["delta_c"]) == 12 and (tmp_path / "block_performance.png").is_file()
    first, last = data[0]["bpi_loss"]
    assert last < first  # the indicators learned ...
    assert data[0]["model_change"] == 0.0  # ... and the model they measure did not move


def test_analyze_follows_the_output_rule(tmp_path):
    """Refused before any work: a folder holding other files, or one inside its input; its own
    report is replaced on a second run; nothing half-written is left beside it."""
    from p3bkit.models import save
    from p3bkit.models.factory import create_model

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    res = CliRunner().invoke(main, ["analyze", "digits-vit", "-o", str(tmp_path / "busy")])
    assert res.exit_code == 1 and "is not empty (notes.txt)" in res.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    model = save(create_model("digits-vit"), tmp_path / "model")
    res = CliRunner().invoke(main, ["analyze", str(model), "-o", str(model / "report")])
    assert res.exit_code == 1 and "over its input" in res.output and not (model / "report").exists()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "kept_widths.png").write_bytes(b"an earlier report's figure")  # the report's own file ...
    for _ in range(2):  # the second run replaces its own report
        res = CliRunner().invoke(main, ["analyze", "digits-vit", "--steps", "3", "-o", str(tmp_path / "r")])
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(
        ["block_performance.json", "block_performance.png", "index.html"]
    )  # ... gone: this one has none
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
