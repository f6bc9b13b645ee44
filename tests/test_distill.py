"""Recovery with the dense teacher: `finetune` distils from the model a pruned folder was pruned from."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from p3bkit.cli import main

PRUNE = [
    "prune",
    "--model",
    "digits-vit",
    "--keep",
    "0.5",
    "--epochs",
    "0",
    "1",
    "1",
    "--update-every",
    "5",
    "--no-progress",
]
FINETUNE = ["--epochs", "1", "--no-progress", "--teacher", "auto"]  # a later --teacher overrides it


def _invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _weights_of(path, **kwargs):
    """A seeded digits-vit (with `kwargs` overriding the preset) as a weights file."""
    from p3bkit.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("digits-vit", **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def dense_weights(tmp_path_factory):
    return _weights_of(tmp_path_factory.mktemp("dense") / "dense.safetensors")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dense_weights):
    """A prune run that started from the dense weights file, without a teacher."""
    out = tmp_path_factory.mktemp("kd") / "run"
    res = _invoke([*PRUNE, "--weights", dense_weights, "--teacher", "none", "-o", out])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def distilled(run_dir, tmp_path_factory):
    """`finetune` with the defaults (its checkpoint kept, to try resuming it)."""
    out = tmp_path_factory.mktemp("kd") / "ft"
    res = _invoke(["finetune", run_dir / "pruned", *FINETUNE, "--keep-checkpoint", "-o", out])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_distillation_loss_by_hand():
    """student logits (0, 0), teacher (ln 3, 0): p_t = (3/4, 1/4), p_s = (1/2, 1/2); at T = 2 the teacher's
    logits halve, p_t = (√3, 1)/(√3 + 1), and the KL is scaled by T² = 4."""
    from p3bkit.train.fit import distillation_loss

    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    hard = torch.tensor(math.log(2.0))  # CE of (0, 0) against either class
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert distillation_loss(student, teacher, hard, 0.5, 1.0).item() == pytest.approx(0.5 * math.log(2) + 0.5 * kl1)
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert distillation_loss(student, teacher, hard, 0.25, 2.0).item() == pytest.approx(
        0.75 * math.log(2) + 0.25 * 4 * kl2
    )
    # batchmean: a batch of a row that agrees with its teacher and this one halves the KL
    both = distillation_loss(torch.zeros(2, 2), torch.cat([torch.zeros(1, 2), teacher]), torch.tensor(0.0), 1.0, 1.0)
    assert both.item() == pytest.approx(kl1 / 2)


def _step_pair(teacher: bool):
    """A seeded digits-vit under `p3bkit train`'s step (with a copy of itself as teacher), and a batch."""
    from p3bkit.models.factory import create_model
    from p3bkit.train.fit import FitConfig, TrainStep

    torch.manual_seed(0)
    model = create_model("digits-vit", drop_path_rate=0.0).train()
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    cfg = FitConfig(epochs=2, label_smoothing=0.0, teacher=copy.deepcopy(model).eval() if teacher else None)
    return model, TrainStep(model, cfg, steps_per_epoch=3), x, y


def test_the_training_step_adds_the_teacher_term():
    """A student identical to its teacher: the KL is 0, so the step's loss is (1 − w)·cross entropy."""
    from p3bkit.models.outputs import logits_of

    model, step, x, y = _step_pair(teacher=True)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(logits_of(model(x)), y).item()
    assert step(x, y) == pytest.approx((1 - step.cfg.kd_weight) * ce, rel=1e-5)
    assert step(x, y) != pytest.approx((1 - step.cfg.kd_weight) * ce, rel=1e-3)  # the student moved, the KL is not 0


def test_the_training_step_resumes_exactly_from_its_state():
    """Optimiser moments and the lr schedule travel in state_dict: a restored step continues as the original."""
    model, step, x, y = _step_pair(teacher=False)
    step(x, y)
    step(x, y)
    assert set(step.state_dict()) == {"optimizer", "scheduler"}  # the keys run checkpoints have always had
    saved = copy.deepcopy({"model": model.state_dict(), **step.state_dict()})
    expected = [step(x, y) for _ in range(3)]
    other, restored, _, _ = _step_pair(teacher=False)
    other.load_state_dict(saved["model"])
    restored.load_state_dict(saved)
    assert restored.sched.last_epoch == 2  # the schedule's place was restored
    assert [restored(x, y) for _ in range(3)] == pytest.approx(expected, rel=1e-6)


def test_finetune_distils_from_the_dense_model_it_was_pruned_from(distilled, dense_weights, run_dir):
    import p3bkit

    out, output = distilled
    record = json.loads((out / "finetune.json").read_text())["distillation"]
    assert record["teacher"]["weights"] == str(dense_weights.resolve()) and record["teacher"]["from"] == "auto"
    assert record["teacher"]["model"] == "digits-vit"
    assert (record["kd_weight"], record["kd_temperature"]) == (0.5, 1.0)
    assert "distilling from the dense model (weight 0.5, temperature 1)" in output
    assert not (out / "teacher.json").exists()  # the fine-tuned folder is not the pruned one
    p3bkit.load(run_dir / "pruned")  # teacher.json beside arch.json changes nothing for load


def test_finetune_without_teacher_by_default(run_dir, tmp_path):
    res = _invoke(["finetune", run_dir / "pruned", "--epochs", "1", "--no-progress", "-o", tmp_path / "ft"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["distillation"] == {"teacher": None}


def test_teacher_none_records_no_teacher(run_dir, tmp_path):
    res = _invoke(["finetune", run_dir / "pruned", *FINETUNE, "--teacher", "none", "-o", tmp_path / "ft"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["distillation"] == {"teacher": None}
    assert "distilling" not in res.output


def test_pruned_from_scratch_finetunes_without_a_teacher_and_says_why(pruned_folder, tmp_path):
    assert json.loads((pruned_folder / "teacher.json").read_text())["dense"] is None
    res = _invoke(["finetune", pruned_folder, *FINETUNE, "-o", tmp_path / "ft"])
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if "without a teacher" in line]
    assert len(notes) == 1 and "randomly initialised" in notes[0], res.output
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["distillation"] == {"teacher": None}


@pytest.mark.parametrize(
    "teacher,msg",
    [
        ("{tmp}/missing", "no such file or folder"),
        ("{tmp}/narrow", "not a dense model of the pruned model's architecture (embed_dim 32 vs 64"),
        ("{tmp}/shallow.safetensors", "does not fit the model"),
        ("{run}/pruned", "is a pruned model; a teacher is a dense one"),
    ],
)
def test_a_bad_teacher_is_one_line_and_writes_nothing(run_dir, tmp_path, teacher, msg):
    from p3bkit.models import save
    from p3bkit.models.factory import create_model

    save(create_model("digits-vit", embed_dim=32), tmp_path / "narrow")
    _weights_of(tmp_path / "shallow.safetensors", depth=2)
    res = _invoke(
        [
            "finetune",
            run_dir / "pruned",
            *FINETUNE,
            "--teacher",
            teacher.format(tmp=tmp_path, run=run_dir),
            "-o",
            tmp_path / "ft",
        ]
    )
    assert res.exit_code == 1 and res.output.startswith("error: teacher ") and msg in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "ft").exists()


def test_kd_weight_outside_zero_one_is_a_usage_error(run_dir, tmp_path):
    res = _invoke(["finetune", run_dir / "pruned", "--kd-weight", "1.5", "-o", tmp_path / "ft"])
    assert res.exit_code == 2 and "--kd-weight" in res.output and not (tmp_path / "ft").exists()


def test_auto_without_the_recorded_weights_and_an_explicit_dense_folder(run_dir, tmp_path, dense_weights):
    """auto falls back to none with a note when the recorded file is gone; a dense folder of the same
    architecture is taken as the teacher, with its path recorded."""
    import p3bkit
    from p3bkit.models.factory import create_model
    from p3bkit.train.distill import choose_teacher

    moved = tmp_path / "pruned"
    shutil.copytree(run_dir / "pruned", moved)
    origin = json.loads((moved / "teacher.json").read_text())
    origin["dense"]["weights"] = str(tmp_path / "gone.safetensors")
    (moved / "teacher.json").write_text(json.dumps(origin))
    notes: list[str] = []
    assert choose_teacher("auto", str(moved), 0.5, 1.0, notes.append) == (None, {"teacher": None})
    assert len(notes) == 1 and "gone.safetensors, which no longer exists" in notes[0]
    p3bkit.save(create_model("digits-vit", weights=str(dense_weights)), tmp_path / "dense")
    module, record = choose_teacher(str(tmp_path / "dense"), str(moved), 0.3, 2.0, notes.append)
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert record == {
        "teacher": {
            "model": str((tmp_path / "dense").resolve()),
            "model_kwargs": {},
            "pretrained": False,
            "pretrained_file": None,
            "weights": None,
            "from": "path",
        },
        "kd_weight": 0.3,
        "kd_temperature": 2.0,
    }


def test_resume_with_other_kd_settings_is_refused(distilled, run_dir):
    out, _ = distilled
    before = (out / "model.safetensors").read_bytes()
    res = _invoke(["finetune", run_dir / "pruned", *FINETUNE, "--kd-weight", "0.3", "--resume", "-o", out])
    assert res.exit_code == 1 and "other settings (distillation differ)" in res.output, res.output
    assert (out / "model.safetensors").read_bytes() == before


def test_a_classifier_started_from_random_weights_is_no_teacher(dense_weights):
    """Weights loaded through timm for another class count leave the dense model's classifier random:
    distilling from it would teach noise, so the record says why there is no teacher."""
    from p3bkit.models.factory import build_user_model
    from p3bkit.models.teacher import dense_origin

    model = build_user_model("digits-vit", pretrained_file=str(dense_weights), kwargs={"num_classes": 7})
    origin = dense_origin(model, "digits-vit", {"num_classes": 7}, pretrained_file=str(dense_weights))
    assert origin["dense"] is None and "7-class classifier started from random weights" in origin["why"]
    same = build_user_model("digits-vit", pretrained_file=str(dense_weights))
    assert dense_origin(same, "digits-vit", {}, pretrained_file=str(dense_weights))["dense"]["pretrained_file"] == str(
        dense_weights.resolve()
    )


@pytest.mark.slow
def test_a_fresh_prune_from_scratch_replaces_the_earlier_runs_teacher(run_dir, tmp_path):
    """--force from random init into a run folder that had a teacher: the stale record goes with its model."""
    again = tmp_path / "run"
    shutil.copytree(run_dir, again)
    res = _invoke([*PRUNE, "--force", "-o", again])
    assert res.exit_code == 0, res.output
    origin = json.loads((again / "pruned" / "teacher.json").read_text())
    assert origin["dense"] is None and "randomly initialised" in origin["why"]


# ---- prune --teacher: distilling while pruning ----------------------------------------------------


def test_prune_distils_from_the_model_it_starts_from(dense_weights, run_dir, tmp_path):
    """`prune` from a weights file distils from it by default (`--teacher auto`): the record names it, and
    the loss it trains on is not the label loss alone (the same seed with `--teacher none`, `run_dir`,
    logs other losses)."""
    res = _invoke([*PRUNE, "--weights", dense_weights, "--kd-weight", "0.7", "-o", tmp_path / "p"])
    assert res.exit_code == 0, res.output
    assert "distilling from the dense model while pruning (weight 0.7, temperature 1)" in res.output
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["distillation"] == {
        "teacher": {
            "model": "digits-vit",
            "model_kwargs": {},
            "pretrained": False,
            "pretrained_file": None,
            "weights": str(dense_weights.resolve()),
            "from": "auto",
        },
        "kd_weight": 0.7,
        "kd_temperature": 1.0,
    }
    assert json.loads((run_dir / "summary.json").read_text())["distillation"] == {"teacher": None}

    def losses(folder):
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in log if r["type"] == "mask_update"]

    taught, plain = losses(tmp_path / "p"), losses(run_dir)
    assert len(taught) == len(plain) and all(not math.isclose(a, b, rel_tol=1e-3) for a, b in zip(taught, plain))


def test_prune_from_random_weights_runs_without_a_teacher_and_says_why(tmp_path):
    res = _invoke([*PRUNE, "--teacher", "auto", "-o", tmp_path / "p"])
    assert res.exit_code == 0, res.output
    assert "note: pruning without a teacher: the model has randomly initialised weights" in res.output
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["distillation"] == {"teacher": None}


def test_prune_with_a_bad_teacher_is_one_line_and_writes_nothing(dense_weights, run_dir, tmp_path):
    from p3bkit.models import save
    from p3bkit.models.factory import create_model

    save(create_model("digits-vit", embed_dim=32), tmp_path / "narrow")
    for teacher, msg in (
        (tmp_path / "nowhere", "no such file or folder"),
        (tmp_path / "narrow", "not a dense model of the pruned model's architecture (embed_dim 32 vs 64"),
        (_weights_of(tmp_path / "wide.safetensors", embed_dim=96), "does not fit the model"),
        (run_dir / "pruned", "is a pruned model; a teacher is a dense one"),
    ):
        res = _invoke([*PRUNE, "--weights", dense_weights, "--teacher", teacher, "-o", tmp_path / "p"])
        assert res.exit_code == 1 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "p").exists()


def test_soft_targets_enter_the_pruning_loss():
    """With w = 1 the loss is the distillation term alone: zero against the model's own logits,
    positive against another model's."""
    from helpers import tiny_model

    import p3bkit
    from p3bkit.prune.config import P3BConfig
    from p3bkit.prune.pruner import P3BPruner, SoftTargets
    from p3bkit.prune.schedule import Schedule

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 7, (16,))
    losses = []
    for teacher in (None, tiny_model(seed=1)):
        pr = P3BPruner(p3bkit.add_gates(tiny_model()), P3BConfig(keep=0.5, update_every=1), Schedule(0, 4, 4))
        with torch.no_grad():
            logits = (teacher.eval() if teacher is not None else pr.gated)(x)
        losses.append(pr.train_step(x, y, soft=SoftTargets(logits, 1.0, 1.0))["loss"])
    assert losses[0] == pytest.approx(0.0, abs=1e-5) and losses[1] > 1e-3


def _prune_job(tmp_path, dense_weights, **kw):
    from p3bkit.prune.config import P3BConfig, PruneJob

    settings = {"out": str(tmp_path / "p"), "teacher": "auto", "weights": dense_weights and str(dense_weights), **kw}
    return PruneJob(
        epochs=(0, 1, 1),
        progress=False,
        p3b=P3BConfig(keep=0.5, update_every=5),
        **settings,
    )


def test_prune_resume_refuses_other_kd_settings(dense_weights, tmp_path):
    from p3bkit.errors import P3BError
    from p3bkit.prune.job import run_prune

    assert run_prune(_prune_job(tmp_path, dense_weights, stop_after_epoch=1)) == {"stopped_after_epoch": 1}
    for other, differ in (
        ({"teacher": "none"}, "kd_temperature, kd_weight, teacher differ"),
        ({"kd_weight": 0.3}, "kd_weight differ"),
    ):
        with pytest.raises(P3BError, match=differ):
            run_prune(_prune_job(tmp_path, dense_weights, **other), resume=True)


def test_a_run_without_a_teacher_resumes_under_either_choice(tmp_path):
    """From random weights `--teacher auto` finds no teacher: a run stopped with `--teacher none` (the
    default before) resumes under the default, as there is nothing to distil from either way."""
    from p3bkit.prune.job import run_prune

    assert run_prune(_prune_job(tmp_path, None, teacher="none", stop_after_epoch=1)) == {"stopped_after_epoch": 1}
    summary = run_prune(_prune_job(tmp_path, None), resume=True)
    assert summary["distillation"] == {"teacher": None}


@pytest.mark.slow
def test_prune_resumes_with_its_teacher(dense_weights, tmp_path):
    from p3bkit.prune.job import run_prune

    assert run_prune(_prune_job(tmp_path, dense_weights, stop_after_epoch=1)) == {"stopped_after_epoch": 1}
    resumed = run_prune(_prune_job(tmp_path, dense_weights), resume=True)
    full = run_prune(_prune_job(tmp_path, dense_weights, out=str(tmp_path / "q")))
    assert resumed["kappa"] == pytest.approx(full["kappa"]) and resumed["val_acc_pruned"] == full["val_acc_pruned"]
    assert resumed["distillation"]["teacher"]["from"] == "auto"


def test_the_prune_teacher_is_the_model_as_loaded(dense_weights, tmp_path, monkeypatch):
    """`--teacher auto` distils from the weights the run started from, frozen: not a fresh model, not
    the student as it trains."""
    from safetensors.torch import load_file

    import p3bkit.train.distill as distill

    seen = []

    def spy(*args, **kwargs):
        teacher, record = choose(*args, **kwargs)
        seen.append(teacher)
        return teacher, record

    choose = distill.choose_prune_teacher
    monkeypatch.setattr(distill, "choose_prune_teacher", spy)
    res = _invoke([*PRUNE, "--weights", dense_weights, "--teacher", "auto", "-o", tmp_path / "p"])
    assert res.exit_code == 0, res.output
    (teacher,) = seen
    dense = load_file(dense_weights)
    state = teacher.state_dict()
    assert set(state) == set(dense) and all(torch.equal(state[k], dense[k]) for k in dense)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
