"""Gates, surgery exactness, arch.json round trip, refusal of unsupported models."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import CONFIGS, random_masks, tiny_model

import p3bkit
from p3bkit.errors import ArchError
from p3bkit.surgery import apply_surgery, check_surgery, kept_indices


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("structure", ["full", "inner"])
def test_all_ones_gates_equal_original(config, structure, sample):
    model = tiny_model(config)
    ref = model(sample)
    gated = p3bkit.add_gates(model, structure)
    assert (gated(sample) - ref).abs().max().item() == 0.0
    n_gates = 6 if structure == "full" else 2
    assert len(gated.gates) == n_gates * 3
    assert "blocks.1.attn.head_dim" in gated.gates and "blocks.2.mlp.hidden" in gated.gates


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prune", [0.3, 0.7, 0.95])
def test_surgery_matches_hard_masked_model(config, prune, fused, sample, monkeypatch):
    model = tiny_model(config)
    gated = p3bkit.add_gates(model)
    for _, br in gated.branches():
        br.fused_attn = fused if hasattr(br, "fused_attn") else None
    random_masks(gated, prune, empty=("blocks.1.attn.head_dim", "blocks.2.mlp.out"))
    for io_mode in ("index", "dense", "auto"):
        pruned = apply_surgery(gated, io_mode=io_mode)
        with torch.no_grad():
            diff = (gated.eval()(sample) - pruned(sample)).abs().max().item()
        assert diff <= 1e-5, (io_mode, diff)
    assert isinstance(pruned.blocks[1].attn, torch.nn.Identity)  # emptied branch → identity residual
    assert pruned.blocks[0].attn.fn.head_dim == gated.gates["blocks.0.attn.head_dim"].kept()


def test_round_to_keeps_next_best_and_multiples(sample):
    gated = p3bkit.add_gates(tiny_model())
    random_masks(gated, 0.6, seed=3)
    pruned = apply_surgery(gated, round_to=8, io_mode="index")
    hidden = [blk.mlp.fn.fc1.out_features for blk in pruned.blocks if not isinstance(blk.mlp, torch.nn.Identity)]
    assert hidden and all(w % 8 == 0 for w in hidden)
    assert check_surgery(gated, pruned) <= 1e-5  # exact vs the rounded hard mask
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    mag = torch.tensor([1.0, 5.0, 3.0, 1.0, 4.0, 9.0])
    assert kept_indices(mask, mag, round_to=4) == [0, 1, 3, 5]  # + the two largest magnitudes (9, 5)


def test_save_load_round_trip(tmp_path, sample):
    gated = p3bkit.add_gates(tiny_model("registers_ls"))
    random_masks(gated, 0.5)
    pruned = apply_surgery(gated)
    p3bkit.save(pruned, tmp_path / "m")
    loaded = p3bkit.load(tmp_path / "m")
    assert (loaded(sample) - pruned(sample)).abs().max().item() == 0.0
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    arch = json.loads((tmp_path / "m" / "arch.json").read_text())
    assert arch["schema"] == 2 and arch["source"]["name"] == "vit_tiny_patch16_224"
    assert arch["versions"]["timm"] == timm.__version__


def test_load_rejects_bad_folders(tmp_path):
    gated = p3bkit.add_gates(tiny_model())
    random_masks(gated, 0.5)
    folder = p3bkit.save(apply_surgery(gated), tmp_path / "m")
    arch = json.loads((folder / "arch.json").read_text())
    arch["schema"] = 99
    (folder / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(ArchError, match="schema version 99"):
        p3bkit.load(folder)
    arch["schema"] = 1
    arch["layers"][0]["mlp"]["hidden"] = arch["layers"][0]["mlp"]["hidden"][:-1]  # wrong shape vs weights
    (folder / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(ArchError, match="does not match"):
        p3bkit.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ArchError, match="missing model.safetensors"):
        p3bkit.load(folder)
    with pytest.raises(ArchError, match="no arch.json"):
        p3bkit.load(tmp_path)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"qk_norm": True}, "qk_norm"),
        ({"scale_attn_norm": True}, "scale_norm"),
    ],
)
def test_unsupported_models_are_refused(kwargs, reason):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, **kwargs)
    with pytest.raises(ArchError, match=reason):
        p3bkit.add_gates(model)
    with pytest.raises(ArchError, match="not a timm VisionTransformer"):
        p3bkit.add_gates(timm.create_model("resnet18", pretrained=False))


def test_info_counts_match_parameters(tmp_path):
    from click.testing import CliRunner

    from p3bkit.cli import main
    from p3bkit.models.report import describe

    gated = p3bkit.add_gates(tiny_model())
    random_masks(gated, 0.5)
    pruned = apply_surgery(gated)
    folder = p3bkit.save(pruned, tmp_path / "m")
    for ref, model in ((str(folder), pruned), ("deit_tiny_patch16_224", timm.create_model("deit_tiny_patch16_224"))):
        res = CliRunner().invoke(main, ["info", ref, "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["params"] == sum(p.numel() for p in model.parameters())
    assert describe(timm.create_model("deit_small_patch16_224"))["flops"] == pytest.approx(4.6e9, rel=0.01)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_whole_heads_are_removed_exactly(config, fused, sample, tmp_path):
    """Structure `heads`: a gate over whole heads; surgery keeps the chosen heads' q/k/v rows and proj
    columns in a timm Attention with that many heads (≤ 1e-5 vs the hard-masked model), saves and reloads."""
    model = tiny_model(config)
    ref = model(sample)
    gated = p3bkit.add_gates(model, "heads")
    assert (gated(sample) - ref).abs().max().item() == 0.0 and len(gated.gates) == 3 * 3
    for _, br in gated.branches():
        br.fused_attn = fused if hasattr(br, "fused_attn") else None
    random_masks(gated, 0.4, seed=2, empty=("blocks.1.attn.heads",))
    gated.gates["blocks.0.attn.heads"].mask.copy_(torch.tensor([0.0, 1.0, 1.0]))
    pruned = apply_surgery(gated)
    assert check_surgery(gated, pruned) <= 1e-5
    assert pruned.blocks[0].attn.fn.num_heads == 2 and isinstance(pruned.blocks[1].attn, torch.nn.Identity)
    assert pruned.p3b_arch.layers[0]["attn"]["heads"] == [1, 2]
    p3bkit.save(pruned, tmp_path / "m")
    with torch.no_grad():
        assert (p3bkit.load(tmp_path / "m")(sample) - pruned(sample)).abs().max().item() == 0.0


def test_schema_1_folders_still_load(tmp_path, sample):
    """A folder written before heads could be pruned (schema 1, no `heads` key) loads with every head."""
    gated = p3bkit.add_gates(tiny_model())
    random_masks(gated, 0.5)
    pruned = apply_surgery(gated)
    folder = p3bkit.save(pruned, tmp_path / "m")
    arch = json.loads((folder / "arch.json").read_text())
    assert all("heads" not in (layer["attn"] or {}) for layer in arch["layers"])  # inner: all heads kept
    arch["schema"] = 1
    (folder / "arch.json").write_text(json.dumps(arch))
    loaded = p3bkit.load(folder)
    with torch.no_grad():
        assert (loaded(sample) - pruned(sample)).abs().max().item() == 0.0
    assert loaded.blocks[0].attn.fn.num_heads == 3
