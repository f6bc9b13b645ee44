"""A user's own timm model: saved through the Python API, rebuilt from what was written, or refused."""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("deit_tiny_patch16_224", {"num_classes": 10}),
        ("vit_tiny_patch16_224", {**SMALL, "num_classes": 5, "global_pool": "avg", "class_token": False}),
        ("vit_tiny_patch16_224", {**SMALL, "num_classes": 3, "reg_tokens": 2, "init_values": 0.1, "qkv_bias": False}),
        ("deit_tiny_distilled_patch16_224", {**SMALL, "num_classes": 4}),
        ("vit_tiny_patch16_224", {**SMALL, "num_classes": 6, "qkv_bias": False}),
        ("vit_tiny_patch16_224", {**SMALL, "num_classes": 5, "global_pool": "map", "class_token": False}),
    ],
)
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
    torch.save({"x": x, "y": pruned(x)}, tmp_path / "io.pt")  # and in a fresh process, as a user would
    code = (
        "import sys, torch, p3bkit; io = torch.load(sys.argv[2]); "
        "sys.exit(0 if torch.equal(p3bkit.load(sys.argv[1])(io['x']), io['y']) else 3)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "pruned"), str(tmp_path / "io.pt")]).returncode == 0
    )


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


KW = json.dumps(SMALL)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A '1000-class pretrained' small ViT weights file and a 10-class ImageFolder of digits."""
    from helpers import digit_image_folder
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", **SMALL)  # 1000 classes, like an ImageNet checkpoint
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, root / "in1k.safetensors")
    return root, src, digit_image_folder(root / "data", n_per_class=4, classes=10)


def _cli(args):
    from click.testing import CliRunner

    from p3bkit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_prune_a_pretrained_model_on_your_classes_in_one_command(imagenet_like, tmp_path):
    root, src, data = imagenet_like
    res = _cli(
        [
            "prune",
            "--model",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            KW,
            "--num-classes",
            "10",
            "--pretrained-file",
            root / "in1k.safetensors",
            "--data",
            data,
            "--keep",
            "0.6",
            "--frozen",
            "--epochs",
            "0",
            "1",
            "1",
            "--batch-size",
            "8",
            "--update-every",
            "2",
            "--no-progress",
            "-o",
            tmp_path / "run",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "has a 1000-class classifier; the model's 10-class classifier starts from random weights" in res.output
    pruned = p3bkit.load(tmp_path / "run" / "pruned")
    assert pruned.num_classes == 10
    # everything but the classifier came from the file (the frozen ablation barely moves the weights)
    assert torch.allclose(pruned.patch_embed.proj.weight, src.patch_embed.proj.weight, atol=1e-4)
    assert torch.allclose(pruned.pos_embed, src.pos_embed, atol=1e-4)


def test_train_then_prune_your_own_model(imagenet_like, tmp_path):
    root, _, data = imagenet_like
    res = _cli(
        [
            "train",
            "--model",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            KW,
            "--num-classes",
            "10",
            "--pretrained-file",
            root / "in1k.safetensors",
            "--data",
            data,
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--no-progress",
            "-o",
            tmp_path / "dense",
        ]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "dense" / "arch.json").read_text())["structure"] == "dense"
    res = _cli(
        [
            "prune",
            "--model",
            tmp_path / "dense",
            "--data",
            data,
            "--keep",
            "0.6",
            "--epochs",
            "0",
            "1",
            "1",
            "--batch-size",
            "8",
            "--update-every",
            "2",
            "--no-progress",
            "-o",
            tmp_path / "run",
        ]
    )
    assert res.exit_code == 0, res.output
    assert p3bkit.load(tmp_path / "run" / "pruned")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (["--model-kwargs", '{"nope": 1}'], 1, "unknown timm VisionTransformer argument(s) nope"),
        (["--model-kwargs", "{not json"], 2, "not valid JSON"),
        (["--model-kwargs", "[1, 2]"], 2, "must be a JSON object"),
        (["--pretrained-file", "{root}/missing.safetensors"], 1, "does not exist"),
        (["--num-classes", "0"], 2, "'--num-classes'"),
    ],
)
def test_model_options_refuse_bad_values(imagenet_like, tmp_path, args, code, msg):
    root, _, _ = imagenet_like
    res = _cli(
        [
            "prune",
            "--model",
            "vit_tiny_patch16_224",
            "--keep",
            "0.5",
            *[a.replace("{root}", str(root)) for a in args],
            "-o",
            tmp_path / "p",
        ]
    )
    assert res.exit_code == code, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_eval_measures_the_deployed_artefact_through_its_runtime(pruned_folder, tmp_path):
    res = _cli(["eval", pruned_folder, "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "data: the embedded digits set" in res.stderr  # a digits preset's model: the embedded set, named
    ref = json.loads(res.stdout)
    assert ref["backend"] == "torch" and ref["images"] == 360 and 0 <= ref["top1"] <= ref["top5"] <= 100
    res = _cli(["export", pruned_folder, "--format", "onnx", "--eval-data", "digits", "-o", tmp_path / "onnx"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "onnx" / "model.onnx.json").read_text())
    assert record["accuracy"]["top1"] == pytest.approx(ref["top1"]) and record["accuracy"]["backend"] == "onnxruntime"
    assert _cli(["export", pruned_folder, "--format", "openvino", "-o", tmp_path / "ov"]).exit_code == 0
    for artefact in (tmp_path / "onnx", tmp_path / "ov" / "model.xml"):
        res = _cli(["eval", artefact, "--json", "--no-progress"])
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)
        assert got["top1"] == pytest.approx(ref["top1"]) and got["top5"] == pytest.approx(ref["top5"])


@pytest.mark.parametrize(
    "args,msg",
    [
        (["eval", "resnet18"], "not a timm VisionTransformer"),
        (["eval", "digits-vit", "--backend", "onnxruntime"], "export digits-vit first"),
        (["eval", "digits-vit", "--data", "{data}"], "3-channel images, but the model takes 1"),
    ],
)
def test_eval_bad_inputs(imagenet_like, args, msg):
    _, _, data = imagenet_like
    res = _cli([a.replace("{data}", str(data)) for a in args])
    assert res.exit_code == 1, res.output
    assert msg in res.output and "Traceback" not in res.output


def test_attention_pool_model_prunes_with_a_mean_token_class_head(tmp_path):
    from p3bkit.prune.job import PruneJob, run_prune
    from p3bkit.prune.pruner import P3BConfig

    kw = {
        "img_size": 16,
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": 10,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 3,
        "global_pool": "map",
        "class_token": False,
    }
    s = run_prune(
        PruneJob(
            out=str(tmp_path / "r"),
            model="vit_tiny_patch16_224",
            model_kwargs=kw,
            epochs=(0, 1, 1),
            data="digits",
            progress=False,
            p3b=P3BConfig(keep=0.6, update_every=5),
        )
    )
    assert s["surgery_max_abs_diff"] <= 1e-5 and s["total_keep"] == pytest.approx(0.6, abs=0.01)
    pruned = p3bkit.load(tmp_path / "r" / "pruned")
    assert pruned.attn_pool is not None  # the pooling head is kept whole
    from p3bkit.prune.bpi import BPI

    assert not BPI.for_model(timm.create_model("vit_tiny_patch16_224", **kw)).has_class_token


@pytest.mark.slow
def test_deit_on_your_classes_pruned_exported_and_evaluated(imagenet_like, tmp_path):
    _, _, data = imagenet_like
    res = _cli(
        [
            "prune",
            "--model",
            "deit_tiny_patch16_224",
            "--num-classes",
            "10",
            "--img-size",
            "32",
            "--data",
            data,
            "--keep",
            "0.5",
            "--epochs",
            "0",
            "1",
            "1",
            "--batch-size",
            "8",
            "--update-every",
            "2",
            "--no-progress",
            "-o",
            tmp_path / "run",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "augmentation: light" in res.output
    tops = []
    for fmt in ("onnx", "openvino"):
        res = _cli(["export", tmp_path / "run" / "pruned", "--format", fmt, "-o", tmp_path / fmt])
        assert res.exit_code == 0, res.output
    for ref in (tmp_path / "run" / "pruned", tmp_path / "onnx", tmp_path / "openvino"):
        res = _cli(["eval", ref, "--data", data, "--json", "--no-progress"])
        assert res.exit_code == 0, res.output
        tops.append(json.loads(res.output)["top1"])
    assert max(tops) - min(tops) <= 0.5


def test_paper_recipe_prunes_with_the_deit_augmentation(imagenet_like, tmp_path):
    _, _, data = imagenet_like
    res = _cli(
        [
            "prune",
            "--model",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            KW,
            "--num-classes",
            "10",
            "--data",
            data,
            "--recipe",
            "paper",
            "--epochs",
            "0",
            "1",
            "0",
            "--batch-size",
            "8",
            "--update-every",
            "2",
            "--keep",
            "0.6",
            "--no-progress",
            "-o",
            tmp_path / "run",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "augmentation: deit" in res.output
    epochs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["soft_target_steps"] for e in epochs if e["type"] == "epoch"] == [40 // 8]


def test_info_counts_block_parameters_as_stored():
    import timm

    from p3bkit.models.report import describe

    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=False
    )
    rows = describe(model)["blocks"]
    want = [
        sum(p.numel() for m in br.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
        for blk in model.blocks
        for br in (blk.attn, blk.mlp)
    ]
    assert [r["params"] for r in rows] == want
