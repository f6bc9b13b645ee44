"""Exporters: ONNX / OpenVINO parity, failure paths, TensorRT preparation without TensorRT."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import random_masks, tiny_model

import p3bkit
from p3bkit.cli import main
from p3bkit.export import export_model
from p3bkit.surgery import apply_surgery

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gated = p3bkit.add_gates(tiny_model("registers_ls"))
    random_masks(gated, 0.6, empty=("blocks.1.attn.head_dim",))  # one branch emptied to identity
    dist = p3bkit.add_gates(tiny_model("distilled"))
    random_masks(dist, 0.5)
    return {
        "emptied": str(p3bkit.save(apply_surgery(gated, io_mode="index"), root / "emptied")),
        "distilled": str(p3bkit.save(apply_surgery(dist), root / "distilled")),
    }


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("openvino", marks=pytest.mark.slow)])
@pytest.mark.parametrize("which", ["dense", "p3b", "emptied", "distilled"])
def test_export_passes_parity(fmt, which, models, pruned_folder, tmp_path):
    if fmt == "openvino":
        pytest.importorskip("openvino")
    ref = {"dense": "digits-vit", "p3b": str(pruned_folder), **models}[which]
    rec = export_model(ref, fmt, tmp_path / "out")
    assert rec.verified and set(rec.parity) == {"batch1", "batch4"}
    assert all(s["logits"]["max_abs_diff"] <= 1e-4 for s in rec.parity.values())
    record = json.loads((tmp_path / "out" / f"{rec.files[0]}.json").read_text())
    assert record["opset"] == 18 and record["input_shape"][0] == "batch" and record["tolerance"]["atol"] == 1e-4
    assert all((tmp_path / "out" / f).is_file() for f in rec.files)


@pytest.mark.slow
def test_onnx_graph_ops_and_static_batch(pruned_folder, tmp_path):
    rec = export_model(str(pruned_folder), "onnx", tmp_path / "o", static_batch=2)
    assert rec.input_shape[0] == 2 and set(rec.parity) == {"batch2"}
    assert "ScatterND" in rec.op_types and "Gather" in rec.op_types  # index_add write, index_select read


@pytest.mark.slow
def test_corrupted_artefact_fails_and_leaves_nothing(pruned_folder, tmp_path, monkeypatch):
    import onnx
    import onnx.numpy_helper as nh

    import p3bkit.backends.onnx as onnx_exporter

    real = onnx_exporter.export_onnx

    def corrupting(model, path, *a, **kw):
        out = real(model, path, *a, **kw)
        m = onnx.load(str(path))
        init = max(m.graph.initializer, key=lambda t: t.dims[0] if t.dims else 0)
        init.CopyFrom(nh.from_array(nh.to_array(init) + 0.5, init.name))
        onnx.save(m, str(path))
        return out

    monkeypatch.setattr(onnx_exporter, "export_onnx", corrupting)
    out = tmp_path / "bad"
    res = CliRunner().invoke(main, ["export", str(pruned_folder), "--format", "onnx", "-o", str(out)])
    assert res.exit_code == 1
    assert "max abs diff" in res.output and "atol 0.0001" in res.output
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.slow
def test_failed_export_keeps_previous_artefact(pruned_folder, tmp_path, monkeypatch):
    out = tmp_path / "o"
    export_model(str(pruned_folder), "onnx", out)
    before = (out / "model.onnx").read_bytes()
    import p3bkit.export.verify as verify

    monkeypatch.setattr(
        verify, "verify_runner", lambda *a, **kw: (_ for _ in ()).throw(p3bkit.errors.ToleranceError("forced"))
    )
    res = CliRunner().invoke(main, ["export", str(pruned_folder), "--format", "onnx", "-o", str(out), "--force"])
    assert res.exit_code == 1 and (out / "model.onnx").read_bytes() == before


@pytest.mark.slow
def test_export_into_a_non_empty_folder_needs_force(pruned_folder, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(main, ["export", str(pruned_folder), "--format", "onnx", "-o", str(out)])
    assert res.exit_code == 1 and "is not empty (notes.txt)" in res.output and "--force" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["export", str(pruned_folder), "--format", "onnx", "-o", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.onnx").is_file()
    res = CliRunner().invoke(main, ["export", str(pruned_folder), "--format", "onnx", "-o", str(pruned_folder)])
    assert res.exit_code == 1 and "over its input" in res.output


def test_trt_export_fails_fast_without_tensorrt(pruned_folder, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "trt"
    res = CliRunner().invoke(main, ["export", str(pruned_folder), "--format", "trt", "-o", str(out)])
    assert res.exit_code == 1 and "tensorrt" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_trt_graph_preparation(pruned_folder, tmp_path):
    from p3bkit.backends.tensorrt import TrtProfile, check_trt_ops, precision_plan
    from p3bkit.errors import ExportError

    export_model(str(pruned_folder), "onnx", tmp_path / "s", write_op="scatter")
    with pytest.raises(ExportError, match=r"ScatterND\(reduction\)"):
        check_trt_ops(str(tmp_path / "s" / "model.onnx"))
    gather = export_model(str(pruned_folder), "onnx", tmp_path / "g", write_op="gather")
    assert "ScatterND" not in gather.op_types
    assert check_trt_ops(str(tmp_path / "g" / "model.onnx")) == gather.op_types
    assert TrtProfile().shapes((3, 224, 224)) == ((1, 3, 224, 224), (1024, 3, 224, 224), (1024, 3, 224, 224))
    with pytest.raises(ExportError):
        TrtProfile(8, 4, 16).shapes((3, 8, 8))
    with pytest.raises(ExportError):
        precision_plan("int4")


def _fake_tensorrt(layer_types: list[str]):
    """A stand-in for the `tensorrt` module that records what the engine build asks of it."""
    import types

    seen: dict = {"set": [], "cleared": [], "pinned": [], "shapes": None, "cache_in": None}

    class Layer:
        def __init__(self, kind):
            self.type, self.precision, self.outputs = kind, None, {}

        def set_output_type(self, i, dtype):
            self.outputs[i] = dtype
            seen["pinned"].append(self.type)

    class Network:
        num_layers = len(layer_types)
        layers = [Layer(t) for t in layer_types]

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return types.SimpleNamespace(name="pixel_values")

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            seen["workspace"] = size

        def set_flag(self, flag):
            seen["set"].append(flag)

        def clear_flag(self, flag):
            seen["cleared"].append(flag)

        def add_optimization_profile(self, prof):
            seen["profiles"] = seen.get("profiles", 0) + 1

        def create_timing_cache(self, data):
            seen.update(cache_in=data)
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return Cache()

    class Profile:
        def set_shape(self, name, *shapes):
            seen["shapes"] = (name, shapes)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"serialized-engine"

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            return bool(data)

    names = ("FP16", "BF16", "INT8", "TF32", "OBEY_PRECISION_CONSTRAINTS")
    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in names})
    trt.LayerType = types.SimpleNamespace(**{t: t for t in set(layer_types) | {"NORMALIZATION", "SOFTMAX"}})
    trt.float32 = "float32"
    return trt, seen


@pytest.mark.parametrize(
    "precision,flags,cleared", [("fp32", [], ["TF32"]), ("fp16", ["FP16", "OBEY_PRECISION_CONSTRAINTS"], [])]
)
def test_trt_engine_build_follows_the_precision_plan(tmp_path, monkeypatch, precision, flags, cleared):
    """The engine build, run against a recording stand-in for TensorRT: the precision's builder flags,
    LayerNorm/Softmax pinned to fp32 outside fp32, the batch profile, the engine and timing cache written."""
    import sys

    import torch

    from p3bkit.backends.tensorrt import TrtProfile, build_trt_engine

    trt, seen = _fake_tensorrt(["NORMALIZATION", "MATRIX_MULTIPLY", "SOFTMAX"])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tmp_path / "m.onnx").write_bytes(b"graph")
    cache = tmp_path / "cache.bin"
    engine = build_trt_engine(
        tmp_path / "m.onnx", tmp_path / "m.plan", (3, 8, 8), TrtProfile(1, 4, 8), precision, cache
    )
    assert engine.read_bytes() == b"serialized-engine" and cache.read_bytes() == b"timing-cache"
    assert seen["set"] == flags and seen["cleared"] == cleared
    assert seen["pinned"] == ([] if precision == "fp32" else ["NORMALIZATION", "SOFTMAX"])
    assert seen["shapes"] == ("pixel_values", ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)))


def test_doctor_lists_backends():
    import importlib.metadata as md
    import importlib.util

    res = CliRunner().invoke(main, ["doctor"])
    assert res.exit_code == 0 and "onnxruntime" in res.output and "tensorrt" in res.output
    rows = {line.split()[1]: line for line in res.output.splitlines()}
    assert rows["onnxruntime"].startswith("ok ") and md.version("onnxruntime") in rows["onnxruntime"]
    assert rows["openvino"].startswith("ok ") and "precisions fp32,fp16,bf16,int8" in rows["openvino"]
    trt_here = importlib.util.find_spec("tensorrt") is not None
    assert rows["tensorrt"].startswith("ok " if trt_here and __import__("torch").cuda.is_available() else "no ")
    assert "CUDA:" in rows["torch"]
