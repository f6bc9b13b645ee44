"""P3B formulas against hand-computed values, and the engine end to end on digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_model

import p3bkit
from p3bkit.models.cost import BranchWidths, branch_params
from p3bkit.prune.allocation import allocate_keep_ratios, ramp
from p3bkit.prune.costs import kept_cost_curve
from p3bkit.prune.importance import block_importance, gamma, normalised_ranks
from p3bkit.prune.masks import soft_mask_values, threshold_count
from p3bkit.prune.pruner import P3BConfig, P3BPruner
from p3bkit.prune.schedule import Schedule


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_gamma_hand_values():
    x = torch.tensor([0.0, 0.5, 1.0, -1.0])
    want = [sp(0) - sp(-10), sp(7) - sp(-3), sp(14) - sp(4), sp(-14) - sp(-24)]
    assert gamma(x).tolist() == pytest.approx(want, rel=1e-5)
    assert want[0] == pytest.approx(0.69310, abs=1e-4) and want[2] == pytest.approx(9.98185, abs=1e-4)


def test_allocation_meets_budget_and_clips():
    imp = torch.tensor([10.0, 1.0, 1.0, 0.0])
    sizes = torch.tensor([100.0, 300.0, 200.0, 400.0])
    k = allocate_keep_ratios(imp, sizes, keep=0.5)
    # block 0 saturates at 1; the rest share 500 - 100 = 400 in proportion to I·|W|: λ = 400/500
    assert k.tolist() == pytest.approx([1.0, 0.8, 0.8, 0.0])
    assert float((k * sizes).sum()) == pytest.approx(0.5 * float(sizes.sum()), rel=0.005)
    assert allocate_keep_ratios(torch.ones(4), sizes, 0.3).tolist() == pytest.approx([0.3] * 4)
    assert ramp(torch.tensor([0.2]), 0.5).item() == pytest.approx(0.6)


def test_block_importance_prefers_discriminative_blocks():
    d = torch.tensor([0.1, 1.0, -0.2])
    imp = block_importance(d, d, torch.tensor([100.0, 100.0, 100.0]))
    assert imp[1] > imp[0] > imp[2] >= 0


def test_soft_mask_transform():
    n, t, tau = 100, 40, 0.1
    m = soft_mask_values(n, t, tau, m_ref=0.9)
    assert m[t].item() == pytest.approx(0.5)
    assert m[t + int(tau * n)].item() == pytest.approx(0.9, abs=1e-6)
    assert torch.all(m[1:] >= m[:-1])
    hard = soft_mask_values(n, t, 0.0)
    assert hard.sum().item() == n - t and hard[t].item() == 1.0 and hard[t - 1].item() == 0.0


def test_ranks_and_threshold_search_meet_cost():
    assert normalised_ranks(torch.tensor([3.0, 1.0, 2.0])).tolist() == pytest.approx([1.0, 1 / 3, 2 / 3])
    gen = torch.Generator().manual_seed(0)
    names = ["in", "hidden", "out"]
    order = torch.cat([torch.zeros(48), torch.ones(192), 2 * torch.ones(48)]).long()[torch.randperm(288, generator=gen)]
    full = {"in": 48, "hidden": 192, "out": 48}
    cost = kept_cost_curve(order, names, "mlp", 1, (True, True), full)
    assert cost[-1] == branch_params(BranchWidths("mlp", 48, 192, 48), 1, True, True)
    target = 0.37 * float(cost[-1])
    k = threshold_count(cost, target)
    step = max(float(cost[k] - cost[k - 1]), float(cost[k + 1] - cost[k]))
    assert abs(float(cost[k]) - target) <= step


def _pruner(keep=0.5, **kw):
    gated = p3bkit.add_gates(tiny_model())
    return P3BPruner(gated, P3BConfig(keep=keep, update_every=1, **kw), Schedule(0, 4, 4))


def test_masks_are_buffers_untouched_by_the_optimizer():
    pr = _pruner()
    gates = pr.gated.gates.values()
    assert all(not g.mask.requires_grad for g in gates)
    assert not any(p is g.mask for p in pr.optimizer.param_groups[0]["params"] for g in gates)
    before = [g.mask.clone() for g in gates]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    pr.train_step(x, y)
    assert all(torch.equal(a, g.mask) for a, g in zip(before, gates))
    assert all(int(g.score_count) == 1 and g.score_sum.abs().sum() > 0 for g in gates)


def test_pruned_element_comes_back_when_kappa_rises():
    pr = _pruner(keep=0.3, keep_ratios=[0.3] * 6)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    pr.train_step(x, y)
    pr.step.fill_(pr.schedule.total)  # final update: τ = 0, hard masks
    pr.update_masks()
    gate = pr.gated.gates["blocks.0.mlp.hidden"]
    off = (gate.mask < 0.5).nonzero().flatten()
    assert len(off) > 0
    pr.allocation.keep_ratios = [1.0] * 6  # the handcrafted allocation, raised
    pr.train_step(x, y)
    pr.step.fill_(pr.schedule.total)
    pr.update_masks()
    assert torch.all(gate.mask[off] >= 0.5)


@pytest.mark.slow
def test_prune_end_to_end_meets_keep_and_resumes(tmp_path):
    from p3bkit.prune.job import PruneJob, run_prune

    cfg = P3BConfig(keep=0.4, update_every=5)
    full = run_prune(PruneJob(out=str(tmp_path / "a"), epochs=(1, 1, 1), progress=False, p3b=cfg))
    assert abs(full["block_keep_nominal"] - 0.4) <= 0.02
    assert full["surgery_max_abs_diff"] <= 1e-5
    assert full["val_acc_pruned"] == pytest.approx(full["val_acc_masked"])
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    updates = [r for r in log if r["type"] == "mask_update"]
    assert updates and updates[-1]["tau"] == 0.0 and len(updates[-1]["delta_c"]) == 12
    # interrupted after epoch 2, resumed: same final masks as the uninterrupted run
    job = PruneJob(out=str(tmp_path / "b"), epochs=(1, 1, 1), progress=False, p3b=cfg, stop_after_epoch=2)
    assert run_prune(job) == {"stopped_after_epoch": 2}
    job.stop_after_epoch = None
    resumed = run_prune(job, resume=True)
    assert resumed["kappa"] == pytest.approx(full["kappa"])
    a = json.loads((tmp_path / "a" / "pruned" / "arch.json").read_text())["layers"]
    b = json.loads((tmp_path / "b" / "pruned" / "arch.json").read_text())["layers"]
    assert a == b


@pytest.mark.slow
def test_surgery_is_checked_with_rounded_widths(tmp_path):
    from p3bkit.prune.job import PruneJob, run_prune
    from p3bkit.prune.pruner import P3BConfig

    s = run_prune(
        PruneJob(
            out=str(tmp_path / "r"),
            epochs=(0, 1, 1),
            round_to=8,
            progress=False,
            p3b=P3BConfig(keep=0.4, update_every=5),
        )
    )
    assert s["surgery_max_abs_diff"] <= 1e-5
