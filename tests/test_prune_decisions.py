"""Decisions P3B can take back and the budget's edges: branch removal on the evidence of more than
one window, reversible while sparsify runs and frozen after it; pruned heads that can return; the
floor loop, the rounding carry and the blocks budget never empty or miscount the model; the
indicators never see a degenerate handful of images."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

import p3bkit
from p3bkit.prune.allocation import AllocationInput, P3BAllocation, allocate_keep_ratios
from p3bkit.prune.bpi import MIN_INDICATOR_IMAGES, indicator_images
from p3bkit.prune.masks import soft_mask_values
from p3bkit.prune.pruner import P3BConfig, P3BPruner
from p3bkit.prune.schedule import Schedule

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
Y = torch.tensor([0, 1, 2, 3])


def _input(delta: list[float], budget: float = 0.1, sparsify: bool = True) -> AllocationInput:
    """Six branches of 100 units, one unit each, a useful width of 5% (the removal floor)."""
    n = len(delta)
    full = torch.full((n,), 100.0, dtype=torch.float64)
    return AllocationInput(
        torch.tensor(delta),
        torch.tensor(delta),
        full.clone(),
        full,
        torch.ones(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.bool),
        budget,
        lambda: [],
        torch.full((n,), 5.0, dtype=torch.float64),
        True,
        sparsify,
    )


def test_a_branch_that_leads_the_second_window_is_not_removed():
    """Window 1 says the branch hurts (ΔΨ < 0), window 2 says it is the most useful of all: the EMA
    alone (seeded by window 1, 80% of it left) would remove it at the second update."""
    alloc = P3BAllocation(remove_below=0.05, patience=2)
    alloc.targets(_input([1.0] * 5 + [-0.05]))
    assert alloc.streak[5] == 1
    kappa = alloc.targets(_input([1.0] * 5 + [3.0]))
    assert not alloc.removed[5] and alloc.streak[5] == 0 and kappa[5] > 0


def test_a_removed_branch_comes_back_while_sparsify_runs():
    alloc = P3BAllocation(remove_below=0.05, patience=2)
    weak, strong = [1.0] * 5 + [-0.05], [1.0] * 5 + [3.0]
    for _ in range(2):
        kappa = alloc.targets(_input(weak))
    assert alloc.removed[5] and kappa[5] == 0
    back = [bool(alloc.targets(_input(strong))[5] > 0) for _ in range(10)]
    assert back[0] is False  # one good window is not enough: the smoothed evidence must agree
    assert any(back) and back[-1] and not alloc.removed[5]
    assert float((alloc.targets(_input(strong)) * 100).sum()) == pytest.approx(0.1 * 600)


def test_removals_are_frozen_once_the_ramp_is_complete():
    """In sharpen and at the last, hard update no training follows to check a decision (the budget,
    met by the branches left at their useful widths, needs none either)."""
    alloc = P3BAllocation(remove_below=0.05, patience=2)
    weak = [1.0] * 5 + [-0.05]
    for _ in range(3):
        kappa = alloc.targets(_input(weak, sparsify=False))
    assert not alloc.removed.any() and kappa[5] > 0
    for _ in range(2):
        alloc.targets(_input(weak))
    assert alloc.removed[5]
    for _ in range(10):  # evidence for it, but too late to bring it back
        alloc.targets(_input([1.0] * 5 + [3.0], sparsify=False))
    assert alloc.removed[5]


def test_after_sparsify_removals_settle_only_what_the_budget_needs():
    """Branches left that cannot all fit the budget at their useful widths (6 × 5 units > 24): the
    least important go once sparsify is over, down to what fits; no further decisions after that."""
    alloc = P3BAllocation(remove_below=0.05, patience=2)
    alloc.targets(_input([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], budget=0.04))
    kappa = alloc.targets(_input([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], budget=0.04, sparsify=False))
    assert alloc.removed.tolist() == [False] * 4 + [True] * 2 and alloc.settled
    assert float((kappa * 100).sum()) == pytest.approx(24.0) and bool((kappa[:4] * 100 >= 5 - 1e-9).all())
    alloc.targets(_input([0.1, 0.9, 0.8, 0.7, 0.6, 2.0], budget=0.04, sparsify=False))
    assert alloc.removed.tolist() == [False] * 4 + [True] * 2


def test_removals_over_several_windows_never_leave_too_little_for_the_budget():
    alloc = P3BAllocation(remove_below=0.05, patience=2)
    for _ in range(2):
        alloc.targets(_input([1.0, 1.0, 1.0, 1.0, -0.05, -0.05], budget=0.5))
    assert alloc.removed.tolist() == [False] * 4 + [True] * 2
    for _ in range(3):  # now two others look useless too: removing them would leave 200 for a budget of 300
        kappa = alloc.targets(_input([-0.05, -0.05, 1.0, 1.0, -0.05, -0.05], budget=0.5))
    assert int((~alloc.removed).sum()) * 100 >= 300
    assert float((kappa * 100).sum()) == pytest.approx(300.0)


def test_kept_branches_get_their_minimum_and_the_capped_ones_give_way():
    """κ = clip(λ·I, minimum, cap) meets the budget: fixing the weak ones at their minimum lowers λ,
    so the strong one comes down from its cap."""
    kappa = allocate_keep_ratios(torch.tensor([10.0, 0.01, 0.01]), torch.ones(3), 0.5, minimum=torch.full((3,), 0.3))
    assert kappa.tolist() == pytest.approx([0.9, 0.3, 0.3])


def test_the_floor_loop_never_empties_the_model_or_misses_the_budget():
    """A budget between one unit and the removal floor: removing one branch after another would end
    with nothing kept; the last ones stay, narrower than the floor, and the budget is met."""
    sizes = torch.full((4,), 100.0)
    kappa = allocate_keep_ratios(torch.ones(4), sizes, 0.04, floor=torch.full((4,), 20.0))
    assert float((kappa * sizes).sum()) == pytest.approx(16.0)
    assert (kappa > 0).sum() >= 1
    capped = allocate_keep_ratios(
        torch.tensor([1.0, 1.0, 0.01]), torch.full((3,), 100.0), 0.9, floor=torch.full((3,), 50.0)
    )
    assert float((capped * 100).sum()) == pytest.approx(270.0)  # the others cannot hold 270 alone


def test_a_branch_with_kappa_above_zero_keeps_at_least_one_unit():
    """A tiny κ or a negative rounding carry never empties a branch: only the allocation removes one."""
    gated = p3bkit.add_gates(tiny_model(), "inner")
    ratios = [0.52, 0.001, 0.47, 0.002, 0.43, 0.001]
    pr = P3BPruner(gated, P3BConfig(keep_ratios=ratios, update_every=1), Schedule(0, 1, 0))
    pr.train_step(X, Y)
    pr.update_masks(step=pr.schedule.total)
    assert all(w.inner >= 1 for w in (b.widths() for b in pr.branches))


def test_the_blocks_budget_counts_a_removed_branchs_norms_out():
    """What `total_keep_ratio` reports is what the surgically pruned model stores, under either scope."""
    for scope in ("blocks", "total"):
        gated = p3bkit.add_gates(tiny_model(), "inner")
        pr = P3BPruner(
            gated,
            P3BConfig(keep=0.5, budget=scope, keep_ratios=[0.5, 0.0, 0.5, 0.5, 0.0, 0.5], update_every=1),
            Schedule(0, 1, 0),
        )
        pr.train_step(X, Y)
        pr.update_masks(step=pr.schedule.total)
        pruned = p3bkit.apply_surgery(gated.eval(), io_mode="index")
        stored = sum(p.numel() for p in pruned.parameters())
        assert pr.total_keep_ratio() * pr.params.total_params == pytest.approx(stored), scope


def _heads_pruner(ratios: list[float], floor: float = 0.5) -> P3BPruner:
    gated = p3bkit.add_gates(tiny_model(), "heads")
    return P3BPruner(
        gated, P3BConfig(keep_ratios=ratios, update_every=1, tau=0.1, head_score_floor=floor), Schedule(0, 4, 4)
    )


@pytest.mark.parametrize("floor,back", [(0.5, True), (1.0, True), (0.0, False)])
def test_a_pruned_head_given_five_times_the_gradient_comes_back(floor, back):
    """Head 0 is pruned (its soft mask a few percent); over the next window its mask gradient is 5×
    every other head's: the next update keeps it. Ranked by the paper's (m·∂L/∂m)² (floor 0) it
    scores 5²·m² ≪ 1 and never returns."""
    pr = _heads_pruner([0.6] * 6, floor)
    gate = pr.gated.gates["blocks.0.attn.heads"]
    gate.record(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]))
    for g in pr.gated.gates.values():
        if g is not gate:
            g.record(torch.ones(g.size), torch.ones(g.size))
    pr.update_masks(step=2)  # sparsify, τ = 0.1
    assert gate.mask[0] < 0.5 < float(gate.mask[1:].min())
    m0 = float(gate.mask[0])
    grad_sq = torch.tensor([25.0, 1.0, 1.0])
    gate.record(grad_sq * gate.mask.pow(2), grad_sq)  # what a training step records: (m·g)² and g²
    for g in pr.gated.gates.values():
        if g is not gate:
            g.record(torch.ones(g.size), torch.ones(g.size))
    pr.update_masks(step=3)
    assert bool(gate.mask[0] > 0.5) is back, f"pruned head (mask {m0:.3f}), floor {floor}"


def test_head_masks_put_the_half_point_between_heads():
    """The last kept head is above 0.5 during the soft phase and a single head runs at full strength;
    the first pruned one stays reachable (a few percent up to tens), τ = 0 is hard."""
    three = soft_mask_values(3, 1, 0.1, between=True)
    assert three[0] < 0.5 < three[1] and three[2] > three[1]
    assert float(soft_mask_values(1, 0, 0.1, between=True)[0]) == pytest.approx(1.0, abs=1e-3)
    assert 0.01 < float(soft_mask_values(12, 4, 0.1, between=True)[3]) < 0.5
    assert soft_mask_values(4, 2, 0.0, between=True).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert float(soft_mask_values(100, 40, 0.1)[40]) == pytest.approx(0.5)  # other gates: the paper's


def test_the_indicators_see_enough_images():
    assert indicator_images(64, 0.125) == MIN_INDICATOR_IMAGES == 16
    assert indicator_images(512, 0.125) == 64
    assert indicator_images(8, 0.125) == 8  # the whole batch when it is smaller


def test_prune_warns_when_the_batch_leaves_the_indicators_too_few_images(tmp_path):
    from click.testing import CliRunner
    from helpers import digit_image_folder

    from p3bkit.cli import main

    data = digit_image_folder(tmp_path / "data", n_per_class=6, classes=3)
    args = [
        "prune",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        '{"img_size": 32, "patch_size": 8, "depth": 2}',
        "--num-classes",
        "3",
        "--data",
        data,
        "--keep",
        "0.5",
        "--batch-size",
        "8",
        "--epochs",
        "0",
        "1",
        "1",
        "--update-every",
        "1",
        "--no-progress",
        "-o",
        tmp_path / "run",
    ]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "a batch of 8 per process gives the block performance indicators 8 images per step" in res.output


def test_prune_on_the_first_training_images_only(tmp_path):
    """PruneJob.train_images: a quick allocation search on a subset (the DeiT allocations use it)."""
    from p3bkit.prune.job import PruneJob, run_prune
    from p3bkit.prune.pruner import P3BConfig

    s = run_prune(
        PruneJob(
            out=str(tmp_path / "run"),
            epochs=(0, 1, 0),
            batch_size=32,
            train_images=64,
            progress=False,
            p3b=P3BConfig(keep=0.5, update_every=1),
        )
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert s["train_images"] == 64 and s["job"]["train_images"] == 64
    assert max(r.get("step", 0) for r in log) == 2  # 64 images at batch 32: two steps, not the whole split
