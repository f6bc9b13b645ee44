"""The engine as published: emptied blocks, warm-up accumulators, budget scopes, Mixup, optimiser, recipes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from helpers import digit_image_folder, tiny_model

import p3bkit
from p3bkit.cli import main
from p3bkit.errors import P3BError
from p3bkit.prune.costs import branch_budget_share
from p3bkit.prune.importance import normalised_ranks, token_importance
from p3bkit.prune.pruner import P3BConfig, P3BPruner
from p3bkit.prune.recipes import RECIPES, SCRATCH_LR, resolve_recipe
from p3bkit.prune.schedule import Schedule

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
Y = torch.tensor([0, 1, 2, 3])


def _pruner(keep=0.5, schedule=Schedule(0, 4, 4), **kw) -> P3BPruner:
    gated = p3bkit.add_gates(tiny_model(), kw.pop("structure", "full"))
    return P3BPruner(gated, P3BConfig(keep=keep, update_every=1, **kw), schedule)


def test_empty_block_importance_is_bounded():
    delta = torch.tensor([0.0, 1.0, 0.5])
    imp = token_importance(delta, torch.tensor([0.0, 1000.0, 2000.0]), unit_cost=torch.tensor([100.0] * 3))
    assert torch.isfinite(imp).all()
    # γ(0)/100 against γ(1)/1000: a ratio of ~0.7, not the ~1e10 of dividing by ε
    assert imp[0] / imp[1] < 2


def test_soft_tail_keeps_block_alive_and_scored():
    pr = _pruner()
    gate = pr.gated.gates["blocks.0.mlp.hidden"]
    gate.mask.fill_(0.4)  # no element ≥ 0.5, but the tail still passes signal
    mlp = pr.gated.model.blocks[0].mlp
    assert mlp(torch.randn(2, 5, 48)).abs().sum() > 0
    pr.train_step(X, Y)
    assert gate.scores().abs().sum() > 0 and gate.tiebreak().abs().sum() > 0


def test_ranks_break_ties_by_mask_gradient_not_index():
    ranks = normalised_ranks(torch.zeros(4), tiebreak=torch.tensor([0.1, 0.4, 0.2, 0.3]))
    assert ranks.tolist() == pytest.approx([0.25, 1.0, 0.5, 0.75])
    # the Taylor score still decides first
    ranks = normalised_ranks(torch.tensor([0.0, 0.0, 5.0, 0.0]), tiebreak=torch.tensor([0.1, 0.4, 0.0, 0.3]))
    assert ranks.tolist() == pytest.approx([0.25, 0.75, 1.0, 0.5])


@pytest.mark.parametrize("policy", ["disable", "regrow"])
def test_dead_block_neither_explodes_nor_regrows(policy):
    pr = _pruner(keep=0.5, empty_blocks=policy)
    for g in pr.gated.model.blocks[0].attn.gates().values():
        g.mask.zero_()  # as left by a τ = 0 update: the block measures nothing
    pr.train_step(X, Y)
    pr.step.fill_(pr.schedule.total)  # the final, hard update
    rec = pr.update_masks()
    assert rec["kappa"][0] == 0.0 and rec["kept_params"][0] == 0.0 and rec["disabled"][0]
    assert max(rec["kappa"][1:]) < 1.0 or sum(rec["kept_params"]) <= 0.55 * sum(rec["full_params"])


def test_emptied_block_is_disabled_under_the_default_policy():
    pr = _pruner(keep=0.5)
    for g in pr.gated.model.blocks[1].mlp.gates().values():
        g.mask.fill_(0.3)  # emptied by the previous update, soft tail left
    pr.train_step(X, Y)
    rec = pr.update_masks()
    assert rec["disabled"][3] and rec["kappa"][3] == 0.0 and rec["kept_params"][3] == 0.0


def test_accumulators_restart_when_warmup_ends():
    pr = _pruner(schedule=Schedule(3, 4, 4))
    for _ in range(4):
        pr.train_step(X, Y)
    assert int(pr.delta_count) == 1
    assert all(int(g.score_count) == 1 for g in pr.gated.gates.values())


def test_bpi_class_head_is_the_papers_linear():
    pr = _pruner()
    assert isinstance(pr.bpi.heads[0].cls, nn.Linear)
    alt = _pruner(bpi_class_head="norm-linear")
    assert isinstance(alt.bpi.heads[0].cls[0], nn.LayerNorm)


def test_weight_decay_skips_norms_biases_and_tokens():
    pr = _pruner()
    model = pr.gated.model
    names = {id(p): n for n, p in model.named_parameters()}
    groups = pr.optimizer.param_groups
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups[:-1] if g["weight_decay"] == 0 for p in g["params"]}
    assert decay and all(n.endswith("weight") and "norm" not in n for n in decay)
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= no_decay
    assert len(decay) + len(no_decay) == sum(1 for _ in model.parameters())


def test_branch_budget_share_for_the_total_budget():
    assert branch_budget_share(0.25, 900.0, 100.0, "total") == pytest.approx((250 - 100) / 900)
    assert branch_budget_share(0.25, 900.0, 100.0, "blocks") == 0.25
    with pytest.raises(P3BError, match="never pruned"):
        branch_budget_share(0.05, 900.0, 100.0, "total")


@pytest.mark.slow
@pytest.mark.parametrize("scope,structure", [("total", "inner"), ("total", "full"), ("blocks", "inner")])
def test_deit_small_budget_scopes_meet_their_targets(scope, structure):
    import timm

    dense = timm.create_model("deit_small_patch16_224", pretrained=False)
    n_dense = sum(p.numel() for p in dense.parameters())
    gated = p3bkit.add_gates(dense, structure)
    pr = P3BPruner(gated, P3BConfig(keep=0.1, budget=scope, allocation="uniform", update_every=1), Schedule(0, 1, 1))
    pr.step.fill_(pr.schedule.total)
    pr.update_masks()
    pruned = p3bkit.apply_surgery(gated.eval(), io_mode="index")
    n = sum(p.numel() for p in pruned.parameters())  # what the saved model stores
    assert n == pytest.approx(pr.total_keep_ratio() * n_dense, rel=1e-6)
    got = n / n_dense if scope == "total" else pr.kept_branch_params_ratio()
    assert got == pytest.approx(0.1, rel=0.01)
    if scope == "total":  # the paper's DeiT-S at 90%: 22.1 M → 2.2 M
        assert n == pytest.approx(2.2e6, rel=0.01)


def test_recipes():
    paper = resolve_recipe("paper")
    assert paper["epochs"] == (3, 22, 25) and paper["update_every"] == 1000
    assert paper["lr"] == paper["lr_bpi"] == 5e-4 and paper["batch_size"] == 512 and paper["tau"] == 0.1
    assert resolve_recipe("paper", update_every=50)["update_every"] == 50
    assert set(RECIPES) == {"paper", "quick"}


@pytest.mark.slow
def test_quick_recipe_is_what_prune_runs_by_default(tmp_path):
    """Without flags, `p3bkit prune` trains with the quick recipe's batch, learning rates and cadence."""
    quick = RECIPES["quick"]
    res = CliRunner().invoke(
        main, ["prune", "--epochs", "0", "1", "1", "--keep", "0.5", "--no-progress", "-o", str(tmp_path / "run")]
    )
    assert res.exit_code == 0, res.output
    assert "(no weights loaded: from scratch)" in res.output
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["job"]["batch_size"] == quick.batch_size and s["job"]["p3b"]["update_every"] == quick.update_every
    assert s["lr_model"] == pytest.approx(SCRATCH_LR * quick.batch_size / 512)  # random init: the scratch lr
    assert s["lr_bpi"] == pytest.approx(quick.lr_bpi * quick.batch_size / 512)
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "mask_update"
    ]
    assert steps and all(st % quick.update_every == 0 for st in steps[:-1])  # the last update ends the schedule


def test_quick_recipe_with_loaded_weights_keeps_its_lr(tmp_path):
    from safetensors.torch import save_file

    from p3bkit.models.factory import create_model

    quick = RECIPES["quick"]
    save_file(create_model("digits-vit").state_dict(), str(tmp_path / "w.safetensors"))
    res = CliRunner().invoke(
        main,
        [
            "prune",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--epochs",
            "0",
            "1",
            "0",
            "--keep",
            "0.5",
            "--no-progress",
            "-o",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "from scratch" not in res.output
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["lr_model"] == pytest.approx(quick.lr * quick.batch_size / 512)


@pytest.mark.slow
def test_cli_paper_recipe_total_budget(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [
            "prune",
            "--recipe",
            "paper",
            "--epochs",
            "0",
            "1",
            "1",
            "--update-every",
            "5",
            "--batch-size",
            "64",
            "--keep",
            "0.3",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "recipe paper: epochs 0/1/1, mask update every 5 it, batch 64, model lr 6.25e-05" in res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["budget"] == "total" and s["total_keep"] == pytest.approx(0.3, abs=0.003)
    assert s["prune_rate_blocks"] > s["prune_rate_total"]  # the unprunable parameters count against the budget
    assert s["lr_model"] == pytest.approx(5e-4 * 64 / 512)
    info = CliRunner().invoke(main, ["info", str(out / "pruned")])
    assert info.exit_code == 0, info.output
    assert f"pruned {100 * s['prune_rate_total']:.1f}% of all parameters" in info.output
    assert f"{100 * s['prune_rate_blocks']:.1f}% of block parameters" in info.output
    rep = CliRunner().invoke(main, ["analyze", str(out), "-o", str(tmp_path / "report")])
    assert rep.exit_code == 0, rep.output
    assert "of all parameters" in (tmp_path / "report" / "index.html").read_text()


def test_mixup_is_applied_while_pruning_an_image_folder(tmp_path):
    from p3bkit.prune.job import PruneJob, run_prune

    data = digit_image_folder(tmp_path / "data", classes=3)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 3}
    job = PruneJob(
        out=str(tmp_path / "run"),
        model="vit_tiny_patch16_224",
        model_kwargs=kw,
        data=str(data),
        augment="deit",
        epochs=(0, 1, 1),
        batch_size=4,
        progress=False,
        p3b=P3BConfig(keep=0.6, update_every=2),
    )
    s = run_prune(job)
    epochs = [
        json.loads(line)
        for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "epoch"
    ]
    assert [e["soft_target_steps"] for e in epochs] == [18 // 4] * 2  # every step of every epoch
    assert s["total_keep"] == pytest.approx(0.6, abs=0.02)
    assert p3bkit.load(tmp_path / "run" / "pruned")(torch.randn(1, 3, 32, 32)).shape == (1, 3)
