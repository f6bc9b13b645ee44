"""A user's own timm model: saved through the Python API, rebuilt from what was written, or refused."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import p3bkit
from p3bkit.errors import ArchError

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


def _prune_half(gated) -> None:
    for gate in gated.gates.values():
        gate.mask.zero_()
        gate.mask[: max(gate.size // 2, 1)] = 1.0


@pytest.mark.parametrize("name,kwargs", [
    ("deit_tiny_patch16_224", {"num_classes": 10}),
    ("vit_tiny_patch16_224", {**SMALL, "num_classes": 5, "global_pool": "avg", "class_token": False}),
    ("vit_tiny_patch16_224", {**SMALL, "num_classes": 3, "reg_tokens": 2, "init_values": 0.1, "qkv_bias": False}),
    ("deit_tiny_distilled_patch16_224", {**SMALL, "num_classes": 4}),
])
def test_readme_snippet_round_trips_a_timm_model(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    gated = p3bkit.add_gates(model, "full")
    _prune_half(gated)
    pruned = p3bkit.apply_surgery(gated)
    p3bkit.save(pruned, tmp_path / "pruned")
    source = json.loads((tmp_path / "pruned" / "arch.json").read_text())["source"]
    assert source["name"] == name and source["kwargs"]["num_classes"] == kwargs["num_classes"]
    loaded = p3bkit.load(tmp_path / "pruned")
    assert torch.equal(loaded(x), pruned(x))


def test_dense_user_model_is_a_folder_too(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", **SMALL, num_classes=7).eval()
    p3bkit.save(model, tmp_path / "dense")
    loaded = p3bkit.load(tmp_path / "dense")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert json.loads((tmp_path / "dense" / "arch.json").read_text())["structure"] == "dense"


def test_what_cannot_be_rebuilt_is_never_written(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    bare = VisionTransformer(**SMALL, num_classes=3)  # not made by timm.create_model: no architecture name
    with pytest.raises(ArchError, match="timm"):
        p3bkit.save(p3bkit.apply_surgery(p3bkit.add_gates(bare)), tmp_path / "a")
    odd = timm.create_model("vit_tiny_patch16_224", **SMALL, act_layer="relu")  # a setting save cannot read back
    with pytest.raises(ArchError, match="does not reproduce"):
        p3bkit.save(odd, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
