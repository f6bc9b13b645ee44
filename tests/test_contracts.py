"""Import contracts that bite, errors that surface, options honoured or refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from p3bkit.cli import main
from p3bkit.errors import P3BError

ROOT = Path(__file__).parent.parent


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "planted,broken",
    [
        ("from p3bkit.cli import main  # noqa\n", "Each package imports only the layers below it"),
        ("import onnxruntime  # noqa\n", "Only p3bkit.backends imports a runtime"),
    ],
)
def test_import_contracts_catch_a_violation(tmp_path, planted, broken):
    """The contracts in pyproject.toml pass on the tree, and fail once a model module imports upwards or a runtime."""
    shutil.copytree(ROOT / "p3bkit", tmp_path / "p3bkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    lint = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    ok = subprocess.run(lint, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert ok.returncode == 0, ok.stdout[-2000:]
    target = tmp_path / "p3bkit" / "models" / "cost.py"
    target.write_text(planted + target.read_text())
    bad = subprocess.run(lint, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert bad.returncode != 0 and broken in bad.stdout and "BROKEN" in bad.stdout


def test_debug_shows_the_traceback_instead_of_one_line():
    plain = _cli(["info", "no_such_model"])
    assert plain.exit_code == 1 and plain.output.startswith("error: unknown model")
    debug = _cli(["--debug", "info", "no_such_model"])
    assert isinstance(debug.exception, P3BError) and "unknown model" in str(debug.exception)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("house") / "e"
    assert _cli(["export", "digits-vit", "--format", "onnx", "-o", out]).exit_code == 0
    return out


@pytest.mark.slow
def test_an_artefact_without_its_record_keeps_its_precision_and_says_what_it_lacks(onnx_export, tmp_path):
    """A bare INT8 graph is run (and labelled) as INT8, read from the graph; a bare graph has no FLOP ratio,
    and the report says why instead of printing nan."""
    import numpy as np

    from p3bkit.backends.onnxruntime import quantize_static_qdq
    from p3bkit.export.records import artefact_precision

    bare = tmp_path / "bare.onnx"
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    quantize_static_qdq(onnx_export / "model.onnx", bare, [x], [])
    assert artefact_precision(bare) == "int8" and artefact_precision(onnx_export / "model.onnx") == "fp32"
    res = _cli(["bench", bare, "--runs", 3, "--warmup", 1])
    assert res.exit_code == 0, res.output
    assert "| int8 |" in res.output and "– | – |" in res.output and "nan" not in res.output
    assert "no FLOP ratio for" in res.output
    refused = _cli(["bench", bare, "--precision", "fp32", "--runs", 2])
    assert refused.exit_code == 1 and "cannot run this int8 model at fp32" in refused.output


@pytest.mark.slow
def test_a_runtime_crash_is_not_reported_as_a_parity_failure(monkeypatch, tmp_path):
    from p3bkit.backends.onnxruntime import OnnxRuntimeBackend

    def crashing(self, path, precision=None, threads=None, device=None):
        def run(x):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory\nmore detail")

        return run

    monkeypatch.setattr(OnnxRuntimeBackend, "runner", crashing)
    res = _cli(["export", "digits-vit", "--format", "onnx", "-o", tmp_path / "e"])
    assert res.exit_code == 1 and "could not run the exported model" in res.output
    assert "RUNTIME_EXCEPTION : out of memory" in res.output and "parity" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (["bench", "digits-vit", "--backend", "onnxruntime", "--compile"], 1, "--compile is torch.compile"),
        (["bench", "digits-vit", "--device", "cuda", "--threads", "2"], 2, "--threads pins CPU threads"),
        (["latency-table", "digits-vit", "--checkpoint", "w.pt", "-o", "t.json"], 2, "No such option '--checkpoint'"),
        (["latency-table", "digits-vit", "--pretrained", "-o", "t.json"], 2, "No such option '--pretrained'"),
        (["eval", "{export}", "--device", "cuda"], 1, "onnxruntime runs on the CPU here, not on cuda"),
    ],
)
def test_options_a_runner_would_ignore_are_refused(args, code, msg, onnx_export, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _cli([a.replace("{export}", str(onnx_export)) for a in args])
    assert res.exit_code == code and msg in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "t.json").exists()


def test_nothing_outside_backends_names_a_runtime_package():
    """Runtime names reach the rest of the package only through the registry (docs and messages aside)."""
    offenders = []
    for path in (ROOT / "p3bkit").rglob("*.py"):
        if "backends" in path.parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(
                f"import {m}" in code or f"from {m}" in code for m in ("onnxruntime", "openvino", "tensorrt", "nncf")
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert offenders == []


@pytest.mark.slow
def test_bench_json_says_which_runtime_ran_each_model(tmp_path):
    res = _cli(["bench", "digits-vit", "--runs", 3, "--warmup", 1, "--dense-baselines", "--json", tmp_path / "b.json"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    runtimes = [r["runtime"] for r in rows]
    assert runtimes[0] == "torch" and "onnxruntime (transformer-optimised)" in runtimes and "openvino" in runtimes


def test_allocation_choices_are_the_registry():
    """The CLI lists exactly the registered allocations (the registry is the one place they are named)."""
    from p3bkit.cli import prune
    from p3bkit.prune.allocation import ALLOCATIONS, make_allocation
    from p3bkit.prune.pruner import P3BConfig

    choices = list(next(p for p in prune.params if p.name == "allocation").type.choices)
    assert choices == list(ALLOCATIONS) == ["p3b", "uniform", "global-magnitude"]
    with pytest.raises(P3BError, match="unknown allocation 'nope'"):
        make_allocation(P3BConfig(allocation="nope"))


def test_the_command_line_starts_without_torch_or_a_runtime():
    """`p3bkit --help` stays fast: the CLI, the registry's choices and the defaults it shows import
    neither torch nor any runtime."""
    code = (
        "import sys, p3bkit.cli; heavy = [m for m in ('torch', 'timm', 'onnxruntime', 'openvino') if m in sys.modules]; "
        "sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_command_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "p3bkit", "--help"], capture_output=True, text=True, check=True).stdout
    for command in (
        "analyze",
        "bench",
        "demo",
        "doctor",
        "eval",
        "export",
        "finetune",
        "info",
        "latency-table",
        "prune",
        "train",
    ):
        assert f"  {command} " in out
    res = subprocess.run([sys.executable, "-m", "p3bkit.cli", "analyze", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "Block Performance" in res.stdout
