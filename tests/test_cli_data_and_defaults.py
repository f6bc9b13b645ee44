"""The CLI on a user's own data: data checked before any work,
training defaults that learn and say what they do, one output rule for every writer, numbers that
agree. Each refusal is one line, exit code 1 (2 for a bad option), and leaves the files as they were."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import digit_image_folder

from p3bkit.cli import main

TINY = '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'


def _cli(args: list):
    return CliRunner().invoke(main, [str(a) for a in args])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(res, code: int, msg: str) -> None:
    assert res.exit_code == code, res.output
    assert msg in res.output and "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output  # one line, whatever went wrong


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Digit ImageFolders: 32-px RGB (3 classes), the same as 1-channel PNGs at 16 px (10 classes), one with
    a class missing from val/, and one with an unreadable file."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("newcomer")
    rgb = digit_image_folder(root / "rgb", n_per_class=4, classes=3)
    digits = load_digits()
    for split, n in (("train", 8), ("val", 3)):
        for c in range(10):
            (root / "gray" / split / f"c{c}").mkdir(parents=True)
            for i, im in enumerate(digits.images[digits.target == c][:n]):
                Image.fromarray((im * 15).astype("uint8").repeat(2, 0).repeat(2, 1), mode="L").save(
                    root / "gray" / split / f"c{c}" / f"{i}.png"
                )
    missing = digit_image_folder(root / "missing", n_per_class=2, classes=3)
    for f in (missing / "val" / "c2").iterdir():
        f.unlink()
    (missing / "val" / "c2").rmdir()
    broken = digit_image_folder(root / "broken", n_per_class=2, classes=3)
    (broken / "train" / "c1" / "bad.png").write_bytes(b"not a png")
    return {"rgb": rgb, "gray": root / "gray", "missing": missing, "broken": broken}


def test_grayscale_folder_is_read_as_one_channel_for_a_one_channel_model(folders, tmp_path):
    res = _cli(
        [
            "train",
            "--model",
            "digits-vit",
            "--data",
            folders["gray"],
            "--epochs",
            1,
            "--batch-size",
            16,
            "--no-progress",
            "-o",
            tmp_path / "m",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "train epoch 1/1: train loss" in res.output  # the epoch's line without progress bars
    res = _cli(["eval", tmp_path / "m", "--data", folders["gray"], "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 30


@pytest.mark.parametrize(
    "case,args,code,msg",
    [
        (
            "colour for 1 channel",
            ["train", "--model", "digits-vit", "--data", "{rgb}"],
            1,
            "3-channel images, but the model takes 1 channel",
        ),
        (
            "class sets differ",
            [
                "train",
                "--model",
                "vit_tiny_patch16_224",
                "--img-size",
                32,
                "--num-classes",
                3,
                "--model-kwargs",
                TINY,
                "--data",
                "{missing}",
            ],
            1,
            "train/ and val/ have different classes (only in train/: c2; only in val/: -)",
        ),
        (
            "img_size vs patch",
            ["train", "--model", "vit_tiny_patch16_224", "--img-size", 30, "--num-classes", 3, "--data", "{rgb}"],
            1,
            "image size 30 is not a multiple of the patch size 16; use e.g. --img-size 32",
        ),
        (
            "not a ViT",
            ["train", "--model", "resnet18", "--img-size", 32, "--data", "{rgb}"],
            1,
            "model 'resnet18' is not a timm VisionTransformer",
        ),
        (
            "unreadable image",
            [
                "train",
                "--model",
                "vit_tiny_patch16_224",
                "--img-size",
                32,
                "--num-classes",
                3,
                "--model-kwargs",
                TINY,
                "--data",
                "{broken}",
            ],
            1,
            "bad.png: unreadable image",
        ),
        (
            "batch > data",
            [
                "train",
                "--model",
                "vit_tiny_patch16_224",
                "--img-size",
                32,
                "--num-classes",
                3,
                "--model-kwargs",
                TINY,
                "--data",
                "{rgb}",
                "--batch-size",
                64,
            ],
            1,
            "the training set has 12 images, fewer than one batch of 64",
        ),
        (
            "train needs --data",
            ["train", "--model", "vit_tiny_patch16_224", "--img-size", 32, "--num-classes", 3],
            1,
            "give --data",
        ),
        (
            "prune needs --data",
            ["prune", "--model", "vit_tiny_patch16_224", "--img-size", 32, "--keep", 0.5],
            1,
            "give --data",
        ),
        (
            "prune batch > data",
            [
                "prune",
                "--model",
                "vit_tiny_patch16_224",
                "--img-size",
                32,
                "--num-classes",
                3,
                "--model-kwargs",
                TINY,
                "--data",
                "{rgb}",
                "--keep",
                0.5,
            ],
            1,
            "fewer than one batch of 64",
        ),
        ("eval needs --data", ["eval", "deit_tiny_patch16_224"], 1, "give --data"),
    ],
)
def test_data_is_checked_before_any_work(folders, tmp_path, case, args, code, msg):
    out = tmp_path / "out"
    args = [folders[a[1:-1]] if isinstance(a, str) and a[1:-1] in folders else a for a in args]
    res = _cli([*args, *(["-o", out] if args[0] != "eval" else [])])
    _refused(res, code, msg)
    assert not out.exists()  # nothing written, not even the folder


def test_the_embedded_digits_are_named_when_used(tmp_path):
    res = _cli(["eval", "digits-vit", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "data: the embedded digits set" in res.stderr and json.loads(res.stdout)["images"] == 360


def test_training_defaults_learn_say_what_they_use_and_warn_when_the_loss_is_flat(folders, tmp_path, monkeypatch):
    import p3bkit.train.run as run

    monkeypatch.setattr(run, "ESTIMATE_ABOVE_S", 0.0)  # say the estimate even for this short run
    res = _cli(
        [
            "train",
            "--model",
            "digits-vit",
            "--data",
            folders["gray"],
            "--epochs",
            2,
            "--batch-size",
            8,
            "--no-progress",
            "-o",
            tmp_path / "scratch",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "lr 2.50e-04 (recipe scratch: 0.016 × 8/512)" in res.stderr  # no weights loaded: the scratch recipe
    assert "steps × " in res.stderr and "s/step ≈" in res.stderr  # the estimate after the first steps
    # from the trained folder: weights loaded, the fine-tune recipe; an lr that cannot learn is named
    res = _cli(
        [
            "train",
            "--model",
            tmp_path / "scratch",
            "--data",
            folders["gray"],
            "--epochs",
            1,
            "--batch-size",
            8,
            "--no-progress",
            "-o",
            tmp_path / "again",
        ]
    )
    assert res.exit_code == 0 and "(recipe finetune: 0.004 × 8/512)" in res.stderr, res.output
    res = _cli(
        [
            "train",
            "--model",
            "digits-vit",
            "--data",
            folders["gray"],
            "--epochs",
            1,
            "--batch-size",
            4,
            "--lr",
            1e-9,
            "--no-progress",
            "-o",
            tmp_path / "flat",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "warning: the training loss did not fall in epoch 1" in res.stderr and "peak lr 7.81e-12" in res.stderr
    # a batch of 512 does not scale the small-data rate past its cap
    from p3bkit.train.recipes import TRAIN_RECIPES, learning_rate

    assert learning_rate(TRAIN_RECIPES["scratch"], 512).value == pytest.approx(2e-3)
    assert learning_rate(TRAIN_RECIPES["scratch"], 512, base_lr=1e-3).value == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "losses,warm,warned",
    [
        ([2.3 - 0.01 * i for i in range(30)], 0, False),  # falls in epoch 1
        ([2.3] * 30, 0, True),  # flat
        ([2.3] * 30 + [2.3 - 0.02 * i for i in range(30)], 1, False),  # flat in warm-up, falls after it
        ([2.3] * 60, 1, True),  # flat over warm-up and the epoch after it
        ([2.3] * 10, 0, False),  # too few steps to tell
    ],
)
def test_the_flat_loss_warning_watches_warm_up_and_one_more_epoch(capsys, losses, warm, warned):
    from p3bkit.train.dist import DistContext
    from p3bkit.train.run import EpochLoop, run_epochs

    per_epoch = len(losses) // (warm + 1)
    loop = EpochLoop(
        warm + 2,
        lambda e, first: range(per_epoch),
        lambda e, i: {"loss": losses[min(e * per_epoch + i, len(losses) - 1)]},
        lambda e, n: None,
        dict,
        progress=False,
        lr_note="peak lr 1e-3",
        watch_epochs=warm + 1,
    )
    run_epochs(loop, DistContext())
    err = capsys.readouterr().err
    assert ("did not fall" in err) == warned, err
    if warned and warm:
        assert "in epochs 1–2 (warm-up included)" in err


def test_finetune_says_its_recipe_and_augmentation(folders, tmp_path, pruned_folder):
    res = _cli(
        [
            "finetune",
            pruned_folder,
            "--data",
            folders["gray"],
            "--epochs",
            1,
            "--batch-size",
            8,
            "--no-progress",
            "-o",
            tmp_path / "ft",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "augmentation: light" in res.stderr and "(recipe finetune: 0.004 × 8/512)" in res.stderr
    assert "label smoothing 0.1" in res.stderr and "Mixup" not in res.stderr  # what light augmentation trains with
    assert "finetune epoch 1/1:" in res.stderr


def test_help_describes_every_data_option():
    for cmd, words in [
        ("finetune", ["--data", "ImageFolder", "--recipe", "per-epoch lines are printed"]),
        ("export", ["--gate-data", "INT8 gate only", "--eval-data", "--force"]),
        ("train", ["--recipe", "scratch", "finetune", "auto picks"]),
        ("prune", ["--accept-table-error"]),
    ]:
        res = _cli([cmd, "--help"])
        text = " ".join(res.output.split())  # click wraps the help text
        assert res.exit_code == 0 and all(w in text for w in words), (cmd, res.output)


def test_save_refuses_an_existing_folder_unless_told(tmp_path):
    import p3bkit
    from p3bkit.errors import P3BError
    from p3bkit.models.factory import create_model

    model = create_model("digits-vit")
    p3bkit.save(model, tmp_path / "m")
    before = _tree(tmp_path / "m")
    with pytest.raises(P3BError, match="not empty"):
        p3bkit.save(model, tmp_path / "m")
    assert _tree(tmp_path / "m") == before
    p3bkit.save(model, tmp_path / "m", overwrite=True)
    assert p3bkit.load(tmp_path / "m") is not None


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    from p3bkit.fileio import LOCK

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(f"{holder.pid}\n")
        before = _tree(out)
        args = ["prune", "--keep", 0.5, "--epochs", 0, 1, 0, "--update-every", 5, "--no-progress", "-o", out]
        for extra in ([], ["--force"]):
            _refused(_cli([*args, *extra]), 1, f"is in use by another p3bkit run (pid {holder.pid})")
            assert _tree(out) == before
        _refused(_cli(["export", "digits-vit", "--format", "onnx", "--force", "-o", out]), 1, "is in use")
        import p3bkit
        from p3bkit.errors import P3BError
        from p3bkit.models.factory import create_model

        with pytest.raises(P3BError, match="is in use"):
            p3bkit.save(create_model("digits-vit"), out, overwrite=True)
        assert _tree(out) == before
    finally:
        holder.kill()
        holder.wait()
    res = _cli([*args, "--force"])  # its process is gone: the lock is stale and taken over
    assert res.exit_code == 0, res.output
    assert (out / "pruned" / "arch.json").is_file() and not (out / LOCK).exists()


@pytest.mark.slow
def test_latency_table_with_a_large_check_error_is_refused_by_prune(tmp_path):
    from test_latency import _digits_table

    bad = {"check": {"models": 2, "median_abs_error": 0.476, "max_abs_error": 0.667, "rows": []}}
    lut = _digits_table(tmp_path, protocol=bad)
    args = [
        "prune",
        "--target-speedup",
        "1.5",
        "--latency-table",
        lut,
        "--epochs",
        0,
        1,
        0,
        "--update-every",
        5,
        "--no-progress",
        "-o",
        tmp_path / "run",
    ]
    _refused(_cli(args), 1, "median error of 47.6% (> 15%)")
    assert not (tmp_path / "run").exists()
    res = _cli([*args, "--accept-table-error"])
    assert res.exit_code == 0, res.output
    assert "the table's checked median error 47.6%" in res.output


@pytest.mark.slow
def test_latency_table_warns_when_its_check_error_is_large(tmp_path, monkeypatch):
    import p3bkit.latency.measure as measure

    # the check's timings stand in as two badly predicted models; the table itself is measured
    monkeypatch.setattr(
        measure,
        "in_fresh_process",
        lambda fn, *a, **kw: [{"error": 0.4}, {"error": -0.5}] if fn.__name__ == "validate_table" else fn(*a, **kw),
    )
    res = _cli(
        [
            "latency-table",
            "vit_tiny_patch16_224",
            "--img-size",
            32,
            "--model-kwargs",
            TINY,
            "--backend",
            "torch",
            "--head-dim-step",
            8,
            "--hidden-step",
            64,
            "--runs",
            2,
            "--calibration",
            0,
            "--check",
            2,
            "--no-progress",
            "--threads",
            1,
            "-o",
            tmp_path / "lut.json",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "warning: a median prediction error of 45.0% (> 15%)" in res.stderr
    assert json.loads((tmp_path / "lut.json").read_text())["protocol"]["check"]["median_abs_error"] == 0.45


def test_parity_judges_top1_only_where_the_reference_is_confident():
    from p3bkit.backends.tolerances import INT8
    from p3bkit.errors import ToleranceError
    from p3bkit.export.verify import compare

    rng = np.random.default_rng(0)
    flat = rng.normal(0, 1e-3, (64, 1000)).astype(np.float32)  # an untrained model: near-uniform logits
    noisy = flat + rng.normal(0, 2e-4, flat.shape).astype(np.float32)  # cosine ~0.98, argmax flips often
    stats = compare({"logits": flat}, {"logits": noisy}, INT8)["logits"]
    assert stats["confident_images"] == 0 and stats["top1_agreement"] is None and stats["cosine_mean"] > 0.95
    sure = flat.copy()
    sure[np.arange(64), np.arange(64)] = 10.0  # a trained model: one clear winner per image
    flipped = sure.copy()
    flipped[:8, 100] = 20.0  # 8 of 64 confident answers change
    with pytest.raises(ToleranceError, match="top-1 agreement 0.875 < 0.95 on the 64 images"):
        compare({"logits": sure}, {"logits": flipped}, INT8)


def test_stored_and_kept_parameters_are_explained_either_way():
    from p3bkit.cli.prune import stored_note

    assert stored_note(100, 100, 0.5) is None
    assert "300 more than kept: widths rounded up" in stored_note(400, 100, 0.5)
    assert "256 fewer than kept: a branch emptied on one axis" in stored_note(76_206, 76_462, 0.3)


@pytest.mark.slow
def test_int8_gate_record_and_eval_give_one_number(tmp_path):
    """The gate measures the artefact as written: the record's accuracy and `eval` on the same images agree."""
    res = _cli(["train", "--model", "digits-vit", "--epochs", 3, "--no-progress", "-o", tmp_path / "m"])
    assert res.exit_code == 0, res.output
    res = _cli(
        [
            "export",
            tmp_path / "m",
            "--format",
            "onnx",
            "--precision",
            "int8",
            "--calib-data",
            "digits",
            "--calib-size",
            64,
            "--max-drop",
            100,
            "--eval-data",
            "digits",
            "-o",
            tmp_path / "q",
        ]
    )
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "q" / "model.onnx.json").read_text())
    gate = rec["extra"]["int8"]
    ev = json.loads(_cli(["eval", tmp_path / "q", "--data", "digits", "--json", "--no-progress"]).stdout)
    assert gate["val_images"] == ev["images"] == 360
    assert gate["int8_top1"] == pytest.approx(rec["accuracy"]["top1"]) == pytest.approx(ev["top1"])
    assert f"INT8 gate: top-1 {gate['int8_top1']:.2f}%" in res.output


@pytest.mark.slow
def test_loader_processes_give_the_same_training(folders, tmp_path, monkeypatch):
    """--workers moves loading off the training process; without random augmentation the run is the same.
    The runs are CLI processes of their own, as a user starts them (forking a loader from a process that
    already holds runtime thread pools, as this test process may, is not what users do)."""
    from safetensors.torch import load_file

    for workers in (0, 1):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "p3bkit",
                "train",
                "--model",
                "digits-vit",
                "--data",
                str(folders["gray"]),
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--augment",
                "none",
                "--workers",
                str(workers),
                "--no-progress",
                "-o",
                str(tmp_path / f"w{workers}"),
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
    a, b = (load_file(tmp_path / f"w{w}" / "model.safetensors") for w in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    import p3bkit.data.loaders as loaders  # and the option reaches the training loader

    seen, make = [], loaders.DataLoader

    def recording(*args, **kw):
        seen.append(kw.get("num_workers"))
        return make(*args, **{**kw, "num_workers": 0})

    monkeypatch.setattr(loaders, "DataLoader", recording)
    res = _cli(
        [
            "train",
            "--model",
            "digits-vit",
            "--data",
            folders["gray"],
            "--epochs",
            1,
            "--batch-size",
            16,
            "--augment",
            "none",
            "--workers",
            3,
            "--no-progress",
            "-o",
            tmp_path / "w3",
        ]
    )
    assert res.exit_code == 0 and 3 in seen, res.output


def test_unreadable_weights_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "notweights.txt").write_text("hello")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    base = ["train", "--model", "digits-vit", "--data", "digits", "--epochs", 1, "-o", tmp_path / "out"]
    res = _cli([*base, "--pretrained-file", tmp_path / "notweights.txt"])
    _refused(res, 1, "is unreadable")
    assert "weights_only=False" not in res.output  # never the suggestion to load unsafely
    _refused(_cli([*base, "--weights", tmp_path / "corrupt.safetensors"]), 1, "is unreadable as safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_error_in_a_loader_process_stays_one_line():
    script = """
from torch.utils.data import DataLoader, Dataset
from p3bkit.errors import DataError, message_of

class Broken(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DataError("bad.png: unreadable image")

try:
    next(iter(DataLoader(Broken(), batch_size=2, num_workers=1)))
except DataError as exc:
    assert "Original Traceback" in str(exc)  # what torch re-raises
    print(repr(message_of(exc)))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "'bad.png: unreadable image'", res.stdout + res.stderr


def test_prune_from_scratch_caps_its_rate_like_train():
    from p3bkit.prune.recipes import resolve_recipe
    from p3bkit.train.recipes import TRAIN_RECIPES, learning_rate

    for batch in (16, 64, 128, 512):  # the model lr prune trains with (base × batch/512) is train's scratch rate
        lr = resolve_recipe("quick", scratch=True, batch_size=batch)["lr"] * batch / 512
        assert lr == pytest.approx(learning_rate(TRAIN_RECIPES["scratch"], batch).value)
    assert resolve_recipe("quick", scratch=True, batch_size=512)["lr"] == pytest.approx(2e-3)  # capped, not 1.6e-2
    assert resolve_recipe("quick", scratch=True, batch_size=512, lr=0.05)["lr"] == 0.05  # the user's, uncapped


@pytest.mark.parametrize(
    "args,msg",
    [
        (["train", "--model", "digits-vit", "--workers", "-1"], "'--workers'"),
        (["prune", "--workers", "-2"], "'--workers'"),
        (["finetune", ".", "--workers", "x"], "'--workers'"),
        (["train", "--model", "digits-vit", "--recipe", "paper"], "'--recipe'"),
        (["train", "--model", "digits-vit", "--lr", "0"], "'--lr'"),
    ],
)
def test_new_options_refuse_bad_values(tmp_path, args, msg):
    res = _cli([*args, "-o", tmp_path / "out"])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_export_gate_data_that_does_not_exist_is_refused(tmp_path):
    res = _cli(
        [
            "export",
            "digits-vit",
            "--format",
            "onnx",
            "--precision",
            "int8",
            "--calib-data",
            "digits",
            "--gate-data",
            tmp_path / "nowhere",
            "-o",
            tmp_path / "q",
        ]
    )
    _refused(res, 1, "nowhere")
    assert not (tmp_path / "q").exists()


def test_prune_options_are_the_settings_model():
    """Every setting of PruneJob/P3BConfig a user sets is an option of that name with the model's
    default (or the recipe's, None); every other field is named as derived."""
    import dataclasses

    from p3bkit.cli.prune import DERIVED
    from p3bkit.cli.prune import prune as command
    from p3bkit.prune.config import P3BConfig, PruneJob

    params = {p.name: p for p in command.params}
    given = command.make_context("prune", ["-o", "OUT", "--keep", "0.5"]).params  # defaults as the command sees them
    names = {f.name for s in (PruneJob, P3BConfig) for f in dataclasses.fields(s)}
    assert DERIVED <= names  # no stale name
    for settings in (PruneJob, P3BConfig):
        for f in dataclasses.fields(settings):
            if f.name in DERIVED:
                continue
            assert f.name in params, f.name  # an option of the field's name (cli.prune.option_fields passes it)
            assert given[f.name] == f.default or f.name == "out", (f.name, given[f.name], f.default)
    choices = {p.name: p.type.choices for p in command.params if hasattr(p.type, "choices")}
    from typing import get_args

    from p3bkit.models.gates import Structure
    from p3bkit.surgery import IoMode

    # the engine's own names (allocations: tests/test_contracts.py)
    assert list(choices["structure"]) == list(get_args(Structure)) and list(choices["io_mode"]) == list(
        get_args(IoMode)
    )
