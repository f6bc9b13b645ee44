"""The backend registry and INT8 behind its accuracy gate, on the path a user takes.

A user's timm ViT trained for whole epochs on an ImageFolder through the CLI, exported to INT8 on
onnxruntime and OpenVINO with that folder as calibration data; a deliberately broken calibration
set (over-exposed white frames) must trip the gate and leave nothing behind; every runner either
honours a precision or refuses it; the CLI's choices come from the registry, and a new backend
is one registered class.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from p3bkit.backends import PRECISIONS, formats, get_backend, runtimes
from p3bkit.cli import main
from p3bkit.errors import P3BError

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A 3-class timm ViT trained 40 epochs on an ImageFolder of digits, and a white-frame folder."""
    from helpers import digit_image_folder
    from PIL import Image

    root = tmp_path_factory.mktemp("int8")
    data = digit_image_folder(root / "data", n_per_class=30, classes=3)
    for split in ("train", "val"):
        for c in range(3):
            (root / "white" / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (255, 255, 255)).save(root / "white" / split / f"c{c}" / f"{i}.png")
    res = _cli(
        [
            "train",
            "--model",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            json.dumps(SMALL),
            "--num-classes",
            3,
            "--data",
            data,
            "--epochs",
            40,
            "--lr",
            2e-3,
            "--augment",
            "none",
            "-o",
            root / "model",
            "--no-progress",
        ]
    )
    assert res.exit_code == 0, res.output
    return root, data


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_export_passes_the_gate_and_records_it(user_model, fmt):
    root, data = user_model
    out = root / f"q-{fmt}"
    res = _cli(
        [
            "export",
            root / "model",
            "--format",
            fmt,
            "--precision",
            "int8",
            "--calib-data",
            data,
            "--calib-size",
            60,
            "-o",
            out,
            "--eval-data",
            data,
        ]
    )
    assert res.exit_code == 0, res.output
    rec = json.loads(next(out.glob("model.*.json")).read_text())
    gate = rec["extra"]["int8"]
    assert rec["precision"] == "int8" and gate["calib_size"] == 60 and gate["val_images"] == 90
    assert gate["fp32_top1"] >= 80 and gate["drop"] <= 1.0  # a trained model, within the gate
    assert gate["gated"] and gate["op_profile"]["fp32"] and gate["op_profile"]["int8"]  # where the time goes
    if fmt == "openvino":  # the kernel names say which ops ran in int8
        assert any("i8" in op.lower() for op in gate["op_profile"]["int8"])
        assert not any("i8" in op.lower() for op in gate["op_profile"]["fp32"])
    assert rec["accuracy"]["top1"] == pytest.approx(gate["int8_top1"])  # eval through the runtime agrees
    stats = [s for b in rec["parity"].values() for s in b.values()]
    assert stats and all(
        (s["top1_agreement"] or 1.0) >= 0.95 and s["cosine_mean"] >= 0.98 for s in stats
    )  # real images
    assert sum(s["confident_images"] for s in stats) > 0  # a trained model: top-1 agreement was measured
    ops = rec["op_types"] if fmt == "onnx" else {}
    assert fmt != "onnx" or ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    bench = _cli(["bench", out, "--runs", 3, "--warmup", 1])
    assert bench.exit_code == 0 and "| int8 |" in bench.output
    refused = _cli(["bench", out, "--precision", "fp32", "--runs", 3])
    assert refused.exit_code == 1 and "cannot run this int8 model at fp32" in refused.output


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_with_a_static_batch(user_model, fmt):
    """A fixed-batch graph is calibrated and gated in batches of exactly that size (the last padded)."""
    root, data = user_model
    out = root / f"static-{fmt}"
    res = _cli(
        [
            "export",
            root / "model",
            "--format",
            fmt,
            "--precision",
            "int8",
            "--calib-data",
            data,
            "--calib-size",
            10,
            "--static-batch",
            4,
            "-o",
            out,
        ]
    )
    assert res.exit_code == 0, res.output
    rec = json.loads(next(out.glob("model.*.json")).read_text())
    assert rec["input_shape"][0] == 4 and rec["extra"]["int8"]["val_images"] == 90 and set(rec["parity"]) == {"batch4"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_broken_calibration_is_refused_and_leaves_nothing(user_model, fmt):
    """White frames as calibration: onnxruntime's INT8 fails the gate even after its remedy; on
    OpenVINO the remedy keeps the patch embedding (whose input ranges came from the white frames)
    in fp32 and top-1 passes, but the outputs on real images no longer match: the parity check refuses."""
    root, data = user_model
    out = root / f"bad-{fmt}"
    res = _cli(
        [
            "export",
            root / "model",
            "--format",
            fmt,
            "--precision",
            "int8",
            "--calib-data",
            root / "white",
            "--val-data",
            data,
            "-o",
            out,
        ]
    )
    assert res.exit_code == 1 and "Traceback" not in res.output
    if fmt == "onnx":
        assert "INT8 accuracy gate failed" in res.output and "nothing was written" in res.output
        assert "error-adding layers in fp32" in res.output  # the remedy ran
    else:
        assert "parity check failed" in res.output and "cosine" in res.output
    assert not out.exists() and not list(root.glob(f".bad-{fmt}*"))
    if fmt == "openvino":
        kept = _cli(
            [
                "export",
                root / "model",
                "--format",
                fmt,
                "--precision",
                "int8",
                "--calib-data",
                root / "white",
                "--val-data",
                data,
                "-o",
                root / "bad-kept",
                "--no-verify",
            ]
        )
        assert kept.exit_code == 0, kept.output
        gate = json.loads((root / "bad-kept" / "model.xml.json").read_text())["extra"]["int8"]
        assert gate["attempts"][0]["int8_top1"] < gate["fp32_top1"] - 1.0  # plain PTQ fails the gate
        assert any(name.startswith("node_conv2d") for name in gate["kept_in_fp32"]) and gate["drop"] <= 1.0


@pytest.mark.slow
def test_failed_gate_keeps_the_previous_artefact(user_model):
    root, data = user_model
    out = root / "keep"
    assert _cli(["export", root / "model", "--format", "onnx", "-o", out]).exit_code == 0
    before = (out / "model.onnx").read_bytes()
    res = _cli(
        [
            "export",
            root / "model",
            "--format",
            "onnx",
            "--precision",
            "int8",
            "--calib-data",
            root / "white",
            "--val-data",
            data,
            "-o",
            out,
            "--force",
        ]
    )
    assert res.exit_code == 1 and (out / "model.onnx").read_bytes() == before


@pytest.mark.slow
def test_remedy_keeps_an_outlier_layer_in_fp32_and_passes(user_model, tmp_path, fmt="onnx"):
    """A transformer-style activation outlier: one channel of the final norm scaled ×1000, its head
    weights zeroed (fp32 logits unchanged). Plain INT8 of the head's input then loses every other
    channel; the remedy finds the head by its added error, keeps it in fp32, and the gate passes.
    (NNCF's smoothing absorbs this outlier, so OpenVINO's plain INT8 passes; its remedy is
    exercised by the white-frame test.)"""
    from p3bkit.models import save
    from p3bkit.models.factory import create_model

    root, data = user_model
    model = create_model(str(root / "model")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.head.weight[:, 0] = 0.0  # channel 0 no longer reaches the logits ...
        before = model(x)
        model.norm.weight[0] *= 1000.0  # ... so it can carry a huge activation for free
        model.norm.bias[0] = 1000.0
        assert torch.allclose(model(x), before, atol=1e-4)
    save(model, tmp_path / "outlier")
    res = _cli(
        [
            "export",
            tmp_path / "outlier",
            "--format",
            fmt,
            "--precision",
            "int8",
            "--calib-data",
            data,
            "-o",
            tmp_path / "q",
        ]
    )
    assert res.exit_code == 0, res.output
    gate = json.loads(next((tmp_path / "q").glob("model.*.json")).read_text())["extra"]["int8"]
    assert gate["attempts"][0]["int8_top1"] < gate["fp32_top1"] - 1.0  # plain PTQ fails the gate
    assert gate["kept_in_fp32"] and gate["drop"] <= 1.0 and "fp32" in gate["remedy"]


def test_layer_errors_rank_quantised_nodes(user_model, tmp_path):
    """The onnxruntime remedy's ranking: every quantised node gets a finite added error."""
    import numpy as np

    from p3bkit.backends.onnx import export_onnx
    from p3bkit.backends.onnxruntime import layer_errors, quantize_static_qdq
    from p3bkit.models.factory import create_model

    root, _ = user_model
    model = create_model(str(root / "model")).eval()
    export_onnx(model, tmp_path / "f.onnx", (3, 32, 32))
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantize_static_qdq(tmp_path / "f.onnx", tmp_path / "q.onnx", [x], [])
    errs = layer_errors(tmp_path / "f.onnx", tmp_path / "q.onnx", x)
    assert len(errs) >= 2 * 4 and all(np.isfinite(v) for v in errs.values())
    assert max(errs.values()) > 0


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--format", "onnx", "--precision", "int8"], "needs calibration images"),
        (["--format", "onnx", "--precision", "bf16"], "onnxruntime does not export precision 'bf16'"),
        (["--format", "trt", "--precision", "int8", "--calib-data", "digits"], "tensorrt"),
        (["--format", "openvino", "--precision", "int8", "--calib-data", "no/such/folder"], "neither 'digits'"),
    ],
)
def test_int8_bad_input_is_one_line(args, msg, tmp_path):
    res = _cli(["export", "digits-vit", *args, "-o", tmp_path / "o"])
    assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_calibration_flags_need_int8(tmp_path):
    res = _cli(["export", "digits-vit", "--format", "onnx", "--calib-data", "digits", "-o", tmp_path / "o"])
    assert res.exit_code == 2 and "--precision int8" in res.output


def test_cli_choices_come_from_the_registry():
    from p3bkit.cli import bench, eval_, export, latency_table

    def choices(cmd, name):
        return list(next(p for p in cmd.params if p.name == name).type.choices)

    assert choices(export, "fmt") == formats() == ["onnx", "openvino", "trt"]
    for cmd in (bench, eval_, latency_table):
        assert choices(cmd, "backend") == runtimes()
    out = _cli(["doctor"]).output
    for name in runtimes():
        assert name in out and ",".join(get_backend(name).precisions) in out


@pytest.mark.slow
def test_every_runner_honours_a_precision_or_refuses_it(tmp_path):
    """For each registered runtime × precision: bench either runs at exactly that precision or says
    why not; nothing is silently coerced."""
    from p3bkit.bench.prepare import prepare

    cuda = torch.cuda.is_available()
    honoured = {}
    for name in runtimes():
        for prec in PRECISIONS:
            workdir = tmp_path / f"{name}-{prec}"
            workdir.mkdir()
            try:
                p = prepare(
                    "digits-vit", name, 1, "cuda" if get_backend(name).device == "cuda" else "cpu", prec, 1, workdir
                )
                assert p.precision == prec
                p.step()
                honoured[(name, prec)] = True
            except P3BError as exc:
                assert str(exc) and "\n" not in str(exc)
                honoured[(name, prec)] = False
    assert {p for (n, p), ok in honoured.items() if n == "torch" and ok} == {"fp32", "fp16", "bf16"}
    assert {p for (n, p), ok in honoured.items() if n == "onnxruntime" and ok} == {"fp32", "fp16"}
    assert {"fp32", "fp16"} <= {p for (n, p), ok in honoured.items() if n == "openvino" and ok}
    assert not any(ok for (n, p), ok in honoured.items() if p == "int8")  # INT8 needs calibration data
    assert cuda or not any(ok for (n, _), ok in honoured.items() if n == "tensorrt")


def test_openvino_bf16_is_honoured_only_where_the_cpu_has_it():
    import openvino as ov

    from p3bkit.backends import PrecisionError

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    backend = get_backend("openvino")
    if has_bf16:
        assert backend.inference_hint("bf16") == "bf16"
    else:
        with pytest.raises(PrecisionError):
            backend.inference_hint("bf16")


@pytest.mark.slow
def test_a_new_backend_is_one_registered_class(tmp_path):
    """An onnxruntime variant with its own name, suffix and write op: export, record, verify,
    eval and bench all go through the registry without other changes."""
    from p3bkit.backends import registry
    from p3bkit.backends.onnxruntime import OnnxRuntimeBackend
    from p3bkit.bench.prepare import prepare
    from p3bkit.export import export_model
    from p3bkit.export.accuracy import run_eval

    @registry.register
    class OrtGather(OnnxRuntimeBackend):
        name, format, artefact, suffixes, write_op = "ort-gather", "onnx-gather", "model.ortg", (".ortg",), "gather"

        def export(self, model, tmp, sample, precision, static_batch, opts):
            files, info = super().export(model, tmp, sample, precision, static_batch, opts)
            (tmp / "model.onnx").rename(tmp / "model.ortg")
            return ["model.ortg"], info

        def tolerance(self, precision):
            return get_backend("onnx").tolerance(precision)

    try:
        assert "onnx-gather" in formats() and "ort-gather" in runtimes()
        rec = export_model("digits-vit", "onnx-gather", tmp_path / "g")
        assert (
            rec.write_op == "gather" and rec.format == "onnx-gather" and (tmp_path / "g" / "model.ortg.json").is_file()
        )
        assert "ScatterND" not in rec.op_types
        assert run_eval(str(tmp_path / "g"), "digits", progress=False)["backend"] == "ort-gather"
        p = prepare(str(tmp_path / "g" / "model.ortg"), None, 1, "cpu", None, 1, tmp_path)
        assert p.backend == "ort-gather" and p.precision == "fp32"
        p.step()
    finally:
        registry._REGISTRY.pop("ort-gather")


@pytest.mark.slow
def test_eval_runs_at_a_precision_the_runtime_honours_or_refuses(user_model):
    """`p3bkit eval --precision`: an fp32 OpenVINO IR at bf16 where the CPU has bf16 units; an INT8
    artefact only at int8."""
    import openvino as ov

    root, data = user_model
    out = root / "ov-fp32"
    assert _cli(["export", root / "model", "--format", "openvino", "-o", out]).exit_code == 0
    res = _cli(["eval", out, "--data", data, "--precision", "bf16", "--json", "--no-progress"])
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert res.exit_code == 0, res.output
        r = json.loads(res.output)
        fp32 = json.loads(_cli(["eval", out, "--data", data, "--json", "--no-progress"]).output)
        assert r["precision"] == "bf16" and fp32["precision"] == "fp32" and abs(r["top1"] - fp32["top1"]) <= 5
    else:
        assert res.exit_code == 1 and "no bf16 units" in res.output
    q = root / "q-eval"
    assert (
        _cli(
            [
                "export",
                root / "model",
                "--format",
                "onnx",
                "--precision",
                "int8",
                "--calib-data",
                data,
                "--calib-size",
                30,
                "-o",
                q,
            ]
        ).exit_code
        == 0
    )
    refused = _cli(["eval", q, "--data", data, "--precision", "fp32", "--no-progress"])
    assert refused.exit_code == 1 and "cannot run this int8 model at fp32" in refused.output


def test_synthetic_gate_data_is_not_gated_and_the_profile_is_printed(user_model, tmp_path):
    """Synthetic images have random labels: no accuracy gate and no remedy over label noise (even at
    --max-drop 0), said on stderr and in the record; the per-op time of fp32 vs INT8 is printed."""
    root, _ = user_model
    res = CliRunner().invoke(
        main,
        [
            str(a)
            for a in [
                "export",
                root / "model",
                "--format",
                "onnx",
                "--precision",
                "int8",
                "--calib-data",
                "synthetic",
                "--calib-size",
                16,
                "--max-drop",
                0,
                "-o",
                tmp_path / "q",
                "--no-verify",
            ]
        ],
    )
    assert res.exit_code == 0, res.output
    gate = json.loads((tmp_path / "q" / "model.onnx.json").read_text())["extra"]["int8"]
    assert gate["gated"] is False and "random labels" in gate["not_gated_because"]
    assert len(gate["attempts"]) == 1 and not gate["kept_in_fp32"]  # no remedy
    assert "INT8 gate: not applied" in res.output
    prof = gate["op_profile"]
    assert prof["fp32"] and prof["int8"] and prof["fp32_total_ms"] > 0
    assert any("QuantizeLinear" in op or "Integer" in op or "QLinear" in op for op in prof["int8"])
    assert not any("QuantizeLinear" in op for op in prof["fp32"])
    assert "time per op type, onnxruntime profiler" in res.output and "| fp32 graph: op (kernel) |" in res.output


def test_a_coarse_gate_is_flagged(user_model, tmp_path):
    """50 validation images: one changed prediction is 2 points, above --max-drop 1: the user is told."""
    root, data = user_model
    res = _cli(
        [
            "export",
            root / "model",
            "--format",
            "onnx",
            "--precision",
            "int8",
            "--calib-data",
            data,
            "--calib-size",
            16,
            "--val-size",
            50,
            "-o",
            tmp_path / "q",
            "--no-verify",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "moves top-1 by 2.00 points, more than --max-drop 1" in res.output
    gate = json.loads((tmp_path / "q" / "model.onnx.json").read_text())["extra"]["int8"]
    assert gate["gated"] and gate["top1_step"] == pytest.approx(2.0)


def test_int8_weights_lose_a_bit_only_where_the_cpu_saturates():
    """x86 without VNNI (AVX2, AVX-512F) sums 8-bit products in 16 bits: 7-bit weights there; VNNI,
    AMX and Arm accumulate in 32 bits: full range; an unknown CPU is not second-guessed."""
    from p3bkit.backends.timing import int8_saturates

    assert int8_saturates(["avx2", "fma"]) and int8_saturates(["avx2", "fma", "avx512f"])
    assert not int8_saturates(["avx2", "fma", "avx512f", "avx512_vnni"])
    assert not int8_saturates(["avx2", "fma", "avx_vnni"]) and not int8_saturates(["amx_tile", "amx_int8"])
    assert not int8_saturates(["asimd", "sve"]) and not int8_saturates(None)
