"""GPU paths: pruning on CUDA, the batch-1024 bench preset, TensorRT engines (skipped without)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_prune_on_cuda_is_exact_after_surgery(tmp_path):
    from p3bkit.prune.job import PruneJob, run_prune
    from p3bkit.prune.pruner import P3BConfig

    s = run_prune(
        PruneJob(
            out=str(tmp_path / "run"),
            epochs=(0, 1, 1),
            device="cuda",
            progress=False,
            p3b=P3BConfig(keep=0.5, update_every=5),
        )
    )
    assert abs(s["block_keep_nominal"] - 0.5) < 0.02
    assert s["surgery_max_abs_diff"] <= 1e-5


def test_gpu_bench_preset_uses_batch_1024():
    from p3bkit.bench import BenchConfig, run_bench

    rep = run_bench(["digits-vit"], device="gpu", cfg=BenchConfig(runs=5, warmup=2, warmup_seconds=0))
    r = rep["results"][0]
    assert r["batch"] == 1024 and len(r["latencies_ms"]) == 5 and rep["machine"]["gpu"]


def test_tensorrt_engine_matches_torch(tmp_path):
    pytest.importorskip("tensorrt")
    from p3bkit.export import export_model

    rec = export_model("digits-vit", "trt", tmp_path / "trt", trt_profile=(1, 4, 8))
    assert rec.verified and (tmp_path / "trt" / "model.plan").is_file()
    fp16 = export_model("digits-vit", "trt", tmp_path / "trt16", precision="fp16", trt_profile=(1, 4, 8))
    assert fp16.parity["batch4"]["logits"]["top1_agreement"] >= 0.99


def test_tensorrt_int8_engine_passes_the_gate(tmp_path):
    """TensorRT INT8 by explicit quantization: the calibrated Q/DQ graph built with the INT8 flag, on a
    model trained on digits, gated at the default 1-point drop and measured on the engine itself."""
    pytest.importorskip("tensorrt")
    from p3bkit.data import load_data
    from p3bkit.export import export_model
    from p3bkit.export.int8 import Int8Config
    from p3bkit.models import save
    from p3bkit.models.factory import create_model
    from p3bkit.train.fit import FitConfig, fit

    model = create_model("digits-vit")
    fit(model, load_data("digits"), FitConfig(epochs=20, lr=2e-3, device="cuda", progress=False))
    save(model.cpu(), tmp_path / "trained")
    rec = export_model(
        str(tmp_path / "trained"),
        "trt",
        tmp_path / "trt8",
        precision="int8",
        trt_profile=(1, 64, 64),
        int8=Int8Config("digits", 64),
    )
    gate = rec.extra["int8"]
    assert rec.precision == "int8" and gate["calib_size"] == 64 and "QuantizeLinear" in rec.op_types
    assert gate["fp32_top1"] >= 80 and gate["drop"] <= 1.0 and "measured on the engine" in gate["remedy"]
