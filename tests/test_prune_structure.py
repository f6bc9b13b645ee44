"""Whole heads and whole branches: the head gate, the (heads, head dims) choice, branch removal with
hysteresis, the carry through removed branches, and the engine details around them."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from helpers import tiny_model

import p3bkit
from p3bkit.cli import main
from p3bkit.prune.allocation import AllocationInput, P3BAllocation, allocate_keep_ratios
from p3bkit.prune.pruner import P3BConfig, P3BPruner
from p3bkit.prune.schedule import Schedule
from p3bkit.surgery import apply_surgery, check_surgery

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
Y = torch.tensor([0, 1, 2, 3])


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_head_gate_scores_are_the_taylor_scores_of_whole_heads(floor):
    """The head gate ranks whole heads by (max(m, f)·∂L/∂m)², autograd's mask gradient at the current
    masks (f = 0 by default: the paper's (m·∂L/∂m)²; f = ½ counts a pruned head at the threshold's
    strength); the other gates keep the paper's (m·∂L/∂m)²."""
    gated = p3bkit.add_gates(tiny_model(), "heads")
    gate, dims = gated.model.blocks[1].attn.gate_heads, gated.model.blocks[1].attn.gate_head_dim
    assert gate.score_floor == 0.0
    gate.track = dims.track = True
    gate.score_floor = floor
    m = torch.tensor([1.0, 0.7, 0.3], requires_grad=True)
    d = torch.linspace(0.2, 1.0, dims.size).requires_grad_(True)
    gate.mask, dims.mask = m, d  # the same buffers, as leaves autograd can differentiate
    gated(X).pow(2).sum().backward()
    assert torch.allclose(gate.scores(), (m.clamp(min=floor) * m.grad).detach().pow(2), rtol=1e-4, atol=1e-8)
    assert torch.allclose(dims.scores(), (d * d.grad).detach().pow(2), rtol=1e-4, atol=1e-8)


def _heads_pruner(kappa: float) -> P3BPruner:
    gated = p3bkit.add_gates(tiny_model(), "heads")
    return P3BPruner(gated, P3BConfig(keep_ratios=[kappa] * 6, update_every=1), Schedule(0, 1, 0))


def test_the_pair_of_heads_and_head_dims_that_keeps_the_most_importance_within_the_cost():
    """One dominant head: keep it with every dim that fits; equal heads but five useful dims: keep
    every head with those five dims (the cheapest pair at that importance)."""
    pr = _heads_pruner(0.35)
    flat = {name: torch.ones(g.size) for name, g in pr.gated.gates.items()}
    flat["blocks.0.attn.heads"] = torch.tensor([1e4, 1e-4, 1e-4])
    flat["blocks.1.attn.head_dim"] = torch.cat([torch.full((5,), 100.0), torch.zeros(11)])
    pr.record_measurements(torch.ones(6), torch.ones(6), flat)
    pr.update_masks(step=pr.schedule.total)
    w0, w1 = pr.branches[0].widths(), pr.branches[2].widths()
    assert (w0.heads, w0.inner) == (1, 16)
    assert (w1.heads, w1.inner) == (3, 5)
    assert pr.gated.gates["blocks.0.attn.heads"].mask.tolist() == [1.0, 0.0, 0.0]
    for i in (0, 2):  # within κ·cost of each branch
        assert pr.costs.kept()[i] <= 0.35 * pr.costs.full[i] + 1e-6
    pruned = apply_surgery(pr.gated.eval())
    assert check_surgery(pr.gated, pruned) <= 1e-5 and pruned.blocks[0].attn.fn.num_heads == 1


def test_a_floor_removes_a_branch_and_re_solves_the_others():
    """The mirror of the clip at 1: κ·|W| below the useful width → κ = 0, the others re-solved."""
    imp, sizes = torch.tensor([10.0, 1.0, 1.0, 0.05]), torch.full((4,), 100.0)
    plain = allocate_keep_ratios(imp, sizes, 0.3)
    assert plain.tolist() == pytest.approx([120 / 1205 * 10, 120 / 1205, 120 / 1205, 120 / 1205 * 0.05])
    floored = allocate_keep_ratios(imp, sizes, 0.3, floor=torch.full((4,), 5.0))
    assert floored.tolist() == pytest.approx([1.0, 0.1, 0.1, 0.0])
    assert float((floored * sizes).sum()) == pytest.approx(0.3 * 400)


def _input(delta: list[float], kept: torch.Tensor, full_window: bool = True) -> AllocationInput:
    n = len(delta)
    return AllocationInput(
        torch.tensor(delta),
        torch.tensor(delta),
        kept,
        torch.full((n,), 100.0),
        torch.full((n,), 1.0),
        torch.zeros(n, dtype=torch.bool),
        0.3,
        lambda: [],
        torch.full((n,), 8.0),
        full_window,
    )


def test_removal_needs_patience_and_then_holds():
    alloc = P3BAllocation(remove_below=0.08, patience=2)
    kept = torch.full((4,), 30.0)
    weak = [1.0, 1.0, 1.0, 0.02]
    first = alloc.targets(_input(weak, kept))
    assert first[3] > 0 and not alloc.removed[3]  # one window below the useful width: kept
    second = alloc.targets(_input(weak, kept))
    assert second[3] == 0 and alloc.removed[3] and float((second * 100).sum()) == pytest.approx(120)
    third = alloc.targets(_input([1.0, 1.0, 1.0, 1.0], kept))
    assert third[3] == 0  # removed for good
    fresh = P3BAllocation(remove_below=0.08, patience=2)
    fresh.targets(_input(weak, kept))
    fresh.targets(_input([1.0, 1.0, 1.0, 1.0], kept))  # recovered: the streak starts over
    fresh.targets(_input(weak, kept))
    assert not fresh.removed.any()


def test_a_partial_window_never_seeds_the_ema():
    alloc = P3BAllocation()
    kept = torch.full((3,), 50.0)
    alloc.targets(_input([1.0, 0.1, 0.5], kept, full_window=False))
    assert alloc.ema.value is None
    alloc.targets(_input([1.0, 0.1, 0.5], kept))
    assert alloc.ema.value is not None


def test_an_emptied_branch_regrows_at_most_to_a_useful_width():
    alloc = P3BAllocation()
    kept = torch.tensor([30.0, 30.0, 0.0])  # branch 2 emptied, still competing (--empty-blocks regrow)
    kappa = alloc.targets(_input([0.1, 0.1, 1.0], kept))
    assert kappa[2] == pytest.approx(8.0 / 100.0) and kappa[2] * 100 <= 8.0 + 1e-6


def test_mask_updates_count_from_the_end_of_warm_up():
    pr = P3BPruner(p3bkit.add_gates(tiny_model()), P3BConfig(update_every=4), Schedule(3, 10, 10))
    due = []
    for step in range(1, pr.schedule.total + 1):
        pr.step.fill_(step)
        due += [step] if pr.due() else []
    assert due == [7, 11, 15, 19, 23]  # whole windows of 4 after the 3 warm-up steps, and the last step


def test_the_carry_passes_through_removed_branches():
    """A κ = 0 branch keeps nothing and hands its carry on: the model still meets its budget."""
    gated = p3bkit.add_gates(tiny_model(), "inner")
    ratios = [0.33, 0.0, 0.37, 0.29, 0.0, 0.41]
    pr = P3BPruner(gated, P3BConfig(keep_ratios=ratios, update_every=1), Schedule(0, 1, 0))
    pr.train_step(X, Y)
    pr.update_masks(step=pr.schedule.total)
    kept, full = pr.costs.kept(), pr.costs.full
    assert kept[1] == 0 and kept[4] == 0
    step = float(pr.costs.unit.max())
    assert abs(float(kept.sum()) - float((torch.tensor(ratios, dtype=torch.float64) * full).sum())) <= step


@pytest.mark.slow
def test_removed_branches_take_their_norms_along(tmp_path):
    """Under the total budget a branch's LayerNorm (and LayerScale) are part of its cost: what the
    pruner reports kept is what the saved model stores, removed branches included."""
    from p3bkit.prune.job import PruneJob, run_prune

    s = run_prune(
        PruneJob(
            out=str(tmp_path / "r"),
            model="digits-vit-cls",
            epochs=(0, 2, 1),
            structure="heads",
            progress=False,
            p3b=P3BConfig(keep=0.12, update_every=4, remove_below=0.15),
        )
    )
    pruned = p3bkit.load(tmp_path / "r" / "pruned")
    removed = sum(isinstance(b, torch.nn.Identity) for blk in pruned.blocks for b in (blk.attn, blk.mlp))
    assert removed >= 1 and s["surgery_max_abs_diff"] <= 1e-5
    assert s["params_stored"] == s["params_kept"] and s["total_keep"] == pytest.approx(0.12, abs=0.01)
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    heads = [r["heads"] for r in log if r["type"] == "mask_update"][-1]
    assert heads[::2] == [
        b.attn.fn.num_heads if not isinstance(b.attn, torch.nn.Identity) else 0 for b in pruned.blocks
    ]


def test_cifar100_gets_mixup_under_the_deit_recipe(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    from p3bkit.data import load_data

    root = tmp_path / "cifar"
    (root / "cifar-100-python").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        with open(root / "cifar-100-python" / split, "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                    "fine_labels": rng.integers(0, 100, n).tolist(),
                },
                f,
            )
    with open(root / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)  # no md5 of the real files here
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    assert load_data(str(root), img_size=32, augment="deit").mixup is not None
    assert load_data(str(root), img_size=32, augment="light").mixup is None
    res = _cli(
        [
            "prune",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            32,
            "--num-classes",
            100,
            "--model-kwargs",
            '{"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}',
            "--data",
            root,
            "--recipe",
            "paper",
            "--epochs",
            0,
            1,
            0,
            "--batch-size",
            8,
            "--update-every",
            1,
            "--keep",
            0.6,
            "--no-progress",
            "-o",
            tmp_path / "run",
        ]
    )
    assert res.exit_code == 0, res.output
    epochs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["soft_target_steps"] for e in epochs if e["type"] == "epoch"] == [2]  # every step: Mixup/CutMix


SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 5},
        {"num_classes": 5, "global_pool": "avg", "class_token": False},
        {"num_classes": 3, "reg_tokens": 2, "init_values": 0.1},
        {"num_classes": 6, "qkv_bias": False},
        {"num_classes": 5, "global_pool": "map", "class_token": False},
    ],
    ids=["cls", "avgpool", "registers", "no-qkv-bias", "attention-pool"],
)
def test_a_users_vit_with_heads_and_branches_removed_round_trips_and_exports(kwargs, tmp_path):
    pytest.importorskip("openvino")
    from p3bkit.export import export_model

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **SMALL, **kwargs).eval()
    gated = p3bkit.add_gates(model, "heads")
    for name, gate in gated.gates.items():
        gate.mask.zero_()
        gate.mask[: max(gate.size // 2, 1)] = 1.0
    gated.gates["blocks.0.attn.heads"].mask.copy_(torch.tensor([0.0, 0.0, 1.0]))
    gated.gates["blocks.1.mlp.hidden"].mask.zero_()  # a whole branch removed
    pruned = p3bkit.apply_surgery(gated)
    assert check_surgery(gated, pruned) <= 1e-5
    p3bkit.save(pruned, tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    torch.save({"x": x, "y": pruned(x)}, tmp_path / "io.pt")
    code = (
        "import sys, torch, p3bkit; io = torch.load(sys.argv[2]); m = p3bkit.load(sys.argv[1]); "
        "ok = torch.equal(m(io['x']), io['y']) and m.blocks[0].attn.fn.num_heads == 1; sys.exit(0 if ok else 3)"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "io.pt")]).returncode == 0
    for fmt in ("onnx", "openvino"):
        rec = export_model(str(tmp_path / "m"), fmt, tmp_path / fmt)
        assert all(s["logits"]["max_abs_diff"] <= 1e-4 for s in rec.parity.values())


def test_info_shows_heads_and_removed_branches(tmp_path):
    gated = p3bkit.add_gates(tiny_model(), "heads")
    gated.gates["blocks.0.attn.heads"].mask.copy_(torch.tensor([1.0, 0.0, 1.0]))
    gated.gates["blocks.2.mlp.hidden"].mask.zero_()
    folder = p3bkit.save(apply_surgery(gated), tmp_path / "m")
    res = _cli(["info", folder])
    assert res.exit_code == 0, res.output
    assert "1 of 6 branches removed" in res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines() if line.strip()[:2] in ("0.", "1.", "2.")}
    assert rows["0.attn"][1] == "2" and rows["1.attn"][1] == "3" and rows["2.mlp"][1] == "removed"
    data = json.loads(_cli(["info", folder, "--json"]).output)
    assert [r["heads"] for r in data["blocks"][::2]] == [2, 3, 3] and data["blocks"][5]["removed"]
