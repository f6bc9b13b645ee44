"""Exporters: ONNX / OpenVINO parity, failure paths, TensorRT preparation without TensorRT."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import random_masks, tiny_model

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
    return {"emptied": str(p3bkit.save(apply_surgery(gated, io_mode="index"), root / "emptied")),
            "distilled": str(p3bkit.save(apply_surgery(dist), root / "distilled"))}


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
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


def test_onnx_graph_ops_and_static_batch(pruned_folder, tmp_path):
    rec = export_model(str(pruned_folder), "onnx", tmp_path / "o", static_batch=2)
    assert rec.input_shape[0] == 2 and set(rec.parity) == {"batch2"}
    assert "ScatterND" in rec.op_types and "Gather" in rec.op_types  # index_add write, index_select read


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


def test_failed_export_keeps_previous_artefact(pruned_folder, tmp_path, monkeypatch):
    out = tmp_path / "o"
    export_model(str(pruned_folder), "onnx", out)
    before = (out / "model.onnx").read_bytes()
    import p3bkit.export.verify as verify

    monkeypatch.setattr(verify, "verify_runner", lambda *a, **kw: (_ for _ in ()).throw(
        p3bkit.errors.ToleranceError("forced")))
    res = CliRunner().invoke(main, ["export", str(pruned_folder), "--format", "onnx", "-o", str(out)])
    assert res.exit_code == 1 and (out / "model.onnx").read_bytes() == before


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


def test_trt_graph_preparation(pruned_folder, tmp_path):
    from p3bkit.errors import ExportError
    from p3bkit.backends.tensorrt import TrtProfile, precision_plan
    from p3bkit.backends.tensorrt import check_trt_ops

    export_model(str(pruned_folder), "onnx", tmp_path / "s", write_op="scatter")
    with pytest.raises(ExportError, match=r"ScatterND\(reduction\)"):
        check_trt_ops(str(tmp_path / "s" / "model.onnx"))
    gather = export_model(str(pruned_folder), "onnx", tmp_path / "g", write_op="gather")
    assert "ScatterND" not in gather.op_types
    assert check_trt_ops(str(tmp_path / "g" / "model.onnx")) == gather.op_types
    assert TrtProfile().shapes((3, 224, 224)) == ((1, 3, 224, 224), (1024, 3, 224, 224), (1024, 3, 224, 224))
    with pytest.raises(ExportError):
        TrtProfile(8, 4, 16).shapes((3, 8, 8))
    assert precision_plan("fp32")["clear"] == ["TF32"]
    assert precision_plan("fp16")["pin_fp32"] == ["NORMALIZATION", "SOFTMAX"]
    with pytest.raises(ExportError):
        precision_plan("int4")


def test_doctor_lists_backends():
    res = CliRunner().invoke(main, ["doctor"])
    assert res.exit_code == 0 and "onnxruntime" in res.output and "tensorrt" in res.output
