"""Bench statistics, presets, interleaving, JSON schema; CLI bad inputs."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from p3bkit.backends.timing import BenchConfig, Timed, latency_stats, time_interleaved
from p3bkit.cli import main


def test_latency_stats_hand_values():
    s = latency_stats([1.0, 2.0, 3.0, 4.0], batch=8)
    assert s["median_ms"] == 2.5 and s["mean_ms"] == 2.5 and s["runs"] == 4
    assert s["images_per_s"] == pytest.approx(8 / 0.0025)  # from the median, like the speedups
    assert s["images_per_s_mean"] == pytest.approx(8 * 4 / 0.010)


def test_the_device_chooses_the_batch_and_keeps_its_index(monkeypatch):
    """cpu runs batch 1, a GPU batch 1024 (the paper's protocols); cuda:N reaches the runner as cuda:N."""
    import p3bkit.bench.prepare as prepare_module
    from p3bkit.bench import run_bench

    seen = []

    def fake_prepare(ref, backend, batch, device, *args, **kwargs):
        seen.append((batch, device))
        return Timed(ref, "fake", lambda: None, source=ref)

    monkeypatch.setattr(prepare_module, "prepare", fake_prepare)
    cfg = BenchConfig(runs=2, warmup=0, warmup_seconds=0)
    batches = [run_bench(["digits-vit"], device=d, cfg=cfg)["results"][0]["batch"] for d in ("cpu", "gpu", "cuda:1")]
    assert batches == [1, 1024, 1024] and seen == [(1, "cpu"), (1024, "cuda"), (1024, "cuda:1")]
    assert run_bench(["digits-vit"], device="cuda:1", batch=8, cfg=cfg)["results"][0]["batch"] == 8


def test_models_are_interleaved_and_duration_stops():
    calls: list[str] = []
    models = [Timed(n, "fake", lambda n=n: calls.append(n)) for n in "ab"]
    res = time_interleaved(models, BenchConfig(runs=3, warmup=0, warmup_seconds=0, block=1, block_warmup=0))
    assert calls == list("ababab") and all(len(r) == 3 for r in res)
    calls.clear()
    res = time_interleaved(models, BenchConfig(runs=4, warmup=0, warmup_seconds=0, block=2, block_warmup=1))
    assert calls == list("aaabbbaaabbb") and all(len(r) == 4 for r in res)
    # each run sleeps ≥ 2 ms: the first block of 10 per model spends ≥ 20 ms > the 10 ms asked, so it stops there
    slow = [Timed(n, "fake", lambda: time.sleep(0.002)) for n in "ab"]
    res = time_interleaved(slow, BenchConfig(runs=10**6, duration=0.01, warmup=0, warmup_seconds=0, block=10))
    assert [len(r) for r in res] == [10, 10] and min(min(r) for r in res) >= 2.0


@pytest.mark.slow
def test_bench_json_schema(tmp_path, pruned_folder):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "digits-vit",
            str(pruned_folder),
            "--runs",
            "5",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["machine"]["threads"] == 1 and rep["machine"]["cpu"] and "torch" in rep["machine"]["versions"]
    r0, r1 = rep["results"]
    assert r0["batch"] == 1 and len(r0["latencies_ms"]) == 5 and r1["flops"] < r0["flops"]
    assert "speedup" in rep["table"] and "measured/ideal" in res.output


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (["bench", "model.pt"], 1, "unknown artefact type"),
        (["bench", "x.onnx", "--backend", "openvino"], 1, "cannot run"),
        (["bench", "digits-vit", "--backend", "nope"], 2, "Invalid value"),
        (["bench", "digits-vit", "--device", "gpu"], 1, "GPU"),
        (["prune", "-o", "OUT", "--keep", "1.5"], 2, "'--keep'"),
        (["prune", "-o", "OUT", "--keep", "0.5", "--prune", "0.5"], 2, "a parameter budget (--keep or --prune)"),
        (["prune", "-o", "OUT", "--keep", "0.5", "--epochs", "1", "0", "0"], 1, "sparsify+sharpen"),
        (["prune", "-o", "OUT", "--keep", "0.5", "--model", "resnet18"], 1, "not a timm VisionTransformer"),
        (["prune", "-o", "OUT", "--keep", "0.5", "--data", "/nonexistent"], 1, "neither"),
        (["info", "no_such_model"], 1, "unknown model"),
        (["export", "no_such_model", "--format", "onnx", "-o", "OUT"], 1, "unknown model"),
    ],
)
def test_bad_inputs_exit_cleanly(args, code, msg, tmp_path, monkeypatch):
    import torch

    if "gpu" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == code, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert not (tmp_path / "OUT" / "pruned").exists()


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--backend", "onnxruntime", "--precision", "bf16"], "onnxruntime runner cannot run --precision bf16"),
        (["--backend", "torch", "--precision", "int8"], "torch runner cannot run --precision int8"),
        (["--backend", "openvino", "--precision", "int8"], "INT8 needs calibration images"),
        (["--backend", "openvino", "--precision", "fp64"], "openvino runner cannot run --precision fp64"),
    ],
)
def test_bench_refuses_a_precision_it_would_ignore(args, msg):
    res = CliRunner().invoke(main, ["bench", "digits-vit", *args, "--runs", "2"])
    assert res.exit_code == 1 and msg in res.output


@pytest.mark.slow
def test_bench_records_what_ran_and_leaves_no_temp_folders(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("p3bkit-bench-*"))
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "digits-vit",
            "--backend",
            "onnxruntime",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert set(Path(tempfile.gettempdir()).glob("p3bkit-bench-*")) == before
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["precision"] == "fp32"


def test_bench_exports_for_the_batch_it_times_and_names_a_dynamic_artefact(tmp_path):
    from p3bkit.bench.prepare import prepare

    work = tmp_path / "work"
    work.mkdir()
    prepare("digits-vit", "onnxruntime", 1, "cpu", None, 1, work)
    (record,) = work.glob("*/model.onnx.json")
    assert json.loads(record.read_text())["input_shape"][0] == 1  # a fixed batch axis, the batch timed
    for name, extra in (("dynamic", []), ("static", ["--static-batch", "1"])):
        res = CliRunner().invoke(main, ["export", "digits-vit", "--format", "onnx", "-o", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "digits-vit",
            str(tmp_path / "dynamic" / "model.onnx"),
            str(tmp_path / "static" / "model.onnx"),
            "--backend",
            "onnxruntime",
            "--dense-baselines",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if "dynamic batch axis" in line]
    assert len(notes) == 1 and "dynamic" in notes[0] and "--static-batch 1" in notes[0]
