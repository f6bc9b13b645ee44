"""Latency tables and latency budgets: measured through real runtimes, on the user's path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import timm
from click.testing import CliRunner

from p3bkit.cli import main
from p3bkit.errors import P3BError
from p3bkit.latency.check import validate_table
from p3bkit.latency.measure import TableConfig, calibrate, measure_latency_table
from p3bkit.latency.table import LatencyTable

QUICK = dict(head_dim_step=4, hidden_step=64, runs=5, calibration=3, progress=False, threads=1, heads="full")


def user_vit():
    """A model made the way a user makes one: timm.create_model with constructor arguments."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_heads=4,
        num_classes=5,
    ).eval()


@pytest.fixture(scope="module")
def ort_table():
    pytest.importorskip("onnxruntime")
    return measure_latency_table(user_vit(), "user-vit", TableConfig(backend="onnxruntime", **QUICK), isolate=False)


@pytest.mark.slow
def test_table_grid_and_prediction_of_the_dense_model(ort_table):
    t = ort_table
    assert t.dims == {"dim": 64, "depth": 3, "num_heads": 4, "head_dim": 16, "mlp_hidden": 256, "num_tokens": 17}
    assert t.head_dims[0] == 1 and t.head_dims[-1] == 16 and t.hidden[-1] == 256 and t.heads == [4]
    assert t.machine["versions"]["onnxruntime"] and t.protocol["onnxruntime_spinning"] is False
    assert all(v >= 0 for v in t.mlp_ms) and all(v >= 0 for v in t.attn_ms[0])
    assert 0 < t.fixed_ms < t.dense_ms
    # the dense model written out layer by layer predicts what the dense shortcut does (how close a
    # prediction comes to a measurement is timing, left to `latency-table --check` and benchmarks/)
    full = list(range(64))
    layers = [
        {
            "attn": {"in": full, "out": full, "head_dim": list(range(16)), "heads": list(range(4))},
            "mlp": {"in": full, "out": full, "hidden": list(range(256))},
        }
        for _ in range(3)
    ]
    assert t.predict(layers) == pytest.approx(t.predict(), rel=1e-12)
    assert t.predict([{"attn": None, "mlp": None}] * 3) == pytest.approx(t.fixed_ms, rel=1e-12)
    curve = t.branch_curve("mlp", 256)
    assert curve[0] == 0 and np.all(np.diff(curve) >= 0) and curve[-1] > 0


@pytest.mark.slow
def test_validation_times_unseen_pruned_models(ort_table):
    from p3bkit.latency.measure import random_layers
    from p3bkit.models.adapter import inspect_vit

    rows = validate_table(user_vit(), ort_table, TableConfig(backend="onnxruntime", **QUICK), count=4)
    assert len(rows) == 4
    rng = np.random.default_rng(1000)  # the validation's seed: the same unseen architectures, rebuilt here
    archs = [random_layers(inspect_vit(user_vit()), rng) for _ in rows]
    for r, layers in zip(rows, archs):
        assert r["measured_ms"] > 0 and r["predicted_ms"] > 0
        assert abs(r["error"]) < 1.0  # sanity: the right order of magnitude (the benchmark reports the real error)
        assert r["predicted_ms"] == pytest.approx(ort_table.predict(layers))  # the table's own prediction ...
        assert r["error"] == pytest.approx((r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])  # ... vs timed
        assert r["head_dims"] == [len(l["attn"]["head_dim"]) if l["attn"] else 0 for l in layers]
    assert len({r["measured_ms"] for r in rows}) == len(rows)  # each architecture timed on its own


def test_prediction_interpolates_and_counts_emptied_branches():
    t = LatencyTable(
        model="m",
        dims={"dim": 8, "depth": 2, "num_heads": 2, "head_dim": 4, "mlp_hidden": 8, "num_tokens": 5},
        backend="torch",
        device="cpu",
        batch=1,
        precision="fp32",
        threads=1,
        machine={},
        fixed_ms=1.0,
        dense_ms=9.0,
        heads=[1, 2],
        head_dims=[1, 4],
        attn_ms=[[0.5, 1.0], [1.0, 2.0]],
        hidden=[1, 8],
        mlp_ms=[0.2, 1.6],
        scale=1.0,
        per_branch_ms=0.1,
    )
    full = list(range(8))
    layers = [
        {"attn": {"in": full, "out": full, "head_dim": [0, 1, 2, 3]}, "mlp": None},
        {"attn": None, "mlp": {"in": full, "out": full, "hidden": list(range(4))}},
    ]
    assert t.predict(layers) == pytest.approx(1.0 + 2.0 + 0.1 + (0.2 + 3 / 7 * 1.4) + 0.1)
    assert t.predict() == pytest.approx(1.0 + 2 * (2.0 + 1.6) + 0.4)
    assert t.attn(1, 4) == 1.0 and t.attn(2, 0) == 0.0
    partial = [{"attn": {"in": full[:4], "out": full, "head_dim": [0]}, "mlp": None}] * 2
    with pytest.raises(P3BError, match="structure inner"):
        t.predict(partial)


def test_budget_curves_charge_the_next_measured_width_and_keep_only_measured_widths():
    """Between two measured widths a runtime's time is a step, not a line: the allocation's curves
    charge the next measured width, and the kept width is always one the table measured."""
    import torch

    from p3bkit.prune.masks import threshold_count

    t = LatencyTable(
        model="m",
        dims={"dim": 8, "depth": 1, "num_heads": 2, "head_dim": 8, "mlp_hidden": 8, "num_tokens": 5},
        backend="torch",
        device="cpu",
        batch=1,
        precision="fp32",
        threads=1,
        machine={},
        fixed_ms=1.0,
        dense_ms=0.0,
        heads=[1, 2],
        head_dims=[2, 4, 8],
        attn_ms=[[0.2, 0.3, 0.5], [0.3, 0.5, 0.9]],
        hidden=[2, 4, 8],
        mlp_ms=[0.2, 0.4, 1.6],
    )
    curve = t.branch_curve("mlp", 8)
    assert curve[1] == curve[2] == pytest.approx(0.2) and curve[3] == curve[4] == pytest.approx(0.4)
    assert curve[5] == curve[8] == pytest.approx(1.6)
    cost = torch.from_numpy(curve)
    kept = {threshold_count(cost, float(x)) for x in np.linspace(0.0, 1.7, 69)}
    assert kept <= {0, 2, 4, 8} and len(kept) == 4
    grid = t.attn_grid()
    assert grid[2, 3] == grid[2, 4] == pytest.approx(0.5) and grid[1, 5] == grid[1, 8] == pytest.approx(0.5)


def test_calibration_fits_scale_and_per_branch_cost():
    t = LatencyTable(
        model="m",
        dims={"dim": 8, "depth": 1, "num_heads": 1, "head_dim": 4, "mlp_hidden": 8, "num_tokens": 5},
        backend="torch",
        device="cpu",
        batch=1,
        precision="fp32",
        threads=1,
        machine={},
        fixed_ms=1.0,
        dense_ms=0.0,
        heads=[1],
        head_dims=[1, 4],
        attn_ms=[[1.0, 4.0]],
        hidden=[1, 8],
        mlp_ms=[1.0, 8.0],
    )
    full = list(range(8))
    models = [None] + [
        [
            {
                "attn": {"in": full, "out": full, "head_dim": list(range(a))} if a else None,
                "mlp": {"in": full, "out": full, "hidden": list(range(h))} if h else None,
            }
        ]
        for a, h in [(1, 0), (0, 3), (4, 8), (2, 5)]
    ]
    truth = [1.0 + 1.5 * t.branch_sum(m)[0] + 0.3 * t.branch_sum(m)[1] for m in models]
    calibrate(t, models, truth)
    assert t.scale == pytest.approx(1.5) and t.per_branch_ms == pytest.approx(0.3)


@pytest.mark.slow
def test_cli_writes_a_table_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "lut.json"
    args = [
        "latency-table",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--model-kwargs",
        '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "--backend",
        "torch",
        "--head-dim-step",
        "8",
        "--hidden-step",
        "64",
        "--runs",
        "3",
        "--calibration",
        "2",
        "--check",
        "2",
        "--no-progress",
        "--threads",
        "1",
        "-o",
        str(out),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "prediction error on 2 random pruned models" in r.output
    data = json.loads(out.read_text())
    assert data["backend"] == "torch" and data["protocol"]["check"]["models"] == 2
    before = out.read_bytes()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "exists; use --force" in r.output and out.read_bytes() == before


def _digits_table(tmp_path, **changes) -> str:
    """A latency table for the digits-vit preset, measured with torch (fast) on this machine."""
    from p3bkit.models.factory import create_model

    table = measure_latency_table(
        create_model("digits-vit").eval(),
        "digits-vit",
        TableConfig(backend="torch", **{**QUICK, "hidden_step": 128, "threads": None, "heads": "all"}),
        isolate=False,
    )
    data = {**dataclasses.asdict(table), **changes}
    path = tmp_path / "digits_lut.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.slow
def test_prune_meets_a_latency_target_on_the_tables_curve(tmp_path):
    lut = _digits_table(tmp_path)
    table = LatencyTable.load(lut)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        main,
        [
            "prune",
            "--model",
            "digits-vit",
            "--target-speedup",
            "2.5",
            "--latency-table",
            lut,
            "--epochs",
            "0",
            "1",
            "1",
            "--speed-checks",
            "0",
            "--no-progress",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    lat = s["latency"]
    assert lat["target_ms"] == pytest.approx(table.dense_ms / 2.5)
    # the allocation meets the predicted target to within one branch (on this tiny model a branch's
    # time is mostly its fixed per-branch cost, so removing whole branches is what saves time)
    d = table.dims
    one_branch = max(table.branch_ms("attn", d["head_dim"]), table.branch_ms("mlp", d["mlp_hidden"]))
    assert abs(lat["predicted_ms"] - lat["target_ms"]) <= one_branch
    assert "predicted" in r.output and "over the measured dense" in r.output
    arch = json.loads((out / "pruned" / "arch.json").read_text())
    assert table.predict(arch["layers"]) == pytest.approx(lat["predicted_ms"])


@pytest.mark.slow
def test_latency_budget_refusals(tmp_path):
    lut = _digits_table(tmp_path, machine={"cpu": "Some Other CPU", "cores": 64, "gpu": None, "versions": {}})
    base = ["prune", "--model", "digits-vit", "--epochs", "0", "1", "1", "--no-progress"]
    r = CliRunner().invoke(main, base + ["--target-speedup", "2", "--latency-table", lut, "-o", str(tmp_path / "a")])
    assert r.exit_code == 1 and "measured on another machine" in r.output and "Some Other CPU" in r.output
    assert not (tmp_path / "a" / "pruned").exists()
    good = _digits_table(tmp_path)
    r = CliRunner().invoke(
        main,
        base + ["--target-speedup", "2", "--latency-table", good, "--structure", "full", "-o", str(tmp_path / "b")],
    )
    assert r.exit_code == 1 and "--structure inner" in r.output
    r = CliRunner().invoke(
        main, base + ["--target-latency-ms", "1e-6", "--latency-table", good, "-o", str(tmp_path / "c")]
    )
    assert r.exit_code == 1 and "every block removed" in r.output
    r = CliRunner().invoke(main, base + ["--target-speedup", "2", "-o", str(tmp_path / "d")])
    assert r.exit_code == 1 and "needs --latency-table" in r.output
    r = CliRunner().invoke(
        main, base + ["--target-latency-ms", "3", "--target-speedup", "2", "-o", str(tmp_path / "e")]
    )
    assert r.exit_code == 2 and "or one of each" in r.output
    r = CliRunner().invoke(
        main,
        [
            "prune",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--data",
            "digits",
            "--target-speedup",
            "2",
            "--latency-table",
            good,
            "--no-progress",
            "-o",
            str(tmp_path / "f"),
        ],
    )
    assert r.exit_code == 1 and "does not fit" in r.output
    (tmp_path / "junk.json").write_text("{}")
    r = CliRunner().invoke(
        main,
        base + ["--target-speedup", "2", "--latency-table", str(tmp_path / "junk.json"), "-o", str(tmp_path / "g")],
    )
    assert r.exit_code == 1 and "not a p3bkit latency table" in r.output


@pytest.mark.slow
def test_bench_shows_fastest_dense_and_table_prediction(tmp_path):
    """bench --dense-baselines times the dense model on every CPU runtime here (onnxruntime plain and
    transformer-optimised included) and --latency-table adds the prediction for the table's runtime."""
    pytest.importorskip("onnxruntime")
    lut = _digits_table(tmp_path)
    run = tmp_path / "run"
    r = CliRunner().invoke(
        main,
        ["prune", "--model", "digits-vit", "--keep", "0.3", "--epochs", "0", "1", "1", "--no-progress", "-o", str(run)],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "b.json"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "digits-vit",
            str(run / "pruned"),
            "--runs",
            "5",
            "--warmup",
            "1",
            "--dense-baselines",
            "--latency-table",
            lut,
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    names = [(x["name"], x["backend"], x["baseline"]) for x in rep["results"]]
    assert ("digits-vit", "torch", True) in names and ("digits-vit", "onnxruntime", True) in names
    assert ("digits-vit [ort-transformers]", "onnxruntime", True) in names
    assert sum(b for *_, b in names) >= 3 and not names[1][2]
    assert "vs fastest dense" in rep["table"] and "predicted ms" in rep["table"]
    pruned = rep["results"][1]
    assert pruned["predicted_ms"] == pytest.approx(
        LatencyTable.load(lut).predict(json.loads((run / "pruned" / "arch.json").read_text())["layers"])
    )
    assert "allow_spinning" in rep["protocol"]


@pytest.fixture(scope="module")
def latency_demo(tmp_path_factory):
    """`make demo`'s path, small: the demo measures the latency table itself, prunes to a speedup,
    exports fp32 and INT8 and ends with the speed table."""
    pytest.importorskip("openvino")
    from p3bkit.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    s = run_demo(
        str(out),
        dense_epochs=1,
        prune_epochs=(0, 1, 1),
        finetune_epochs=1,
        progress=False,
        speed_runs=10,
        target_speedup=2.0,
        table_settings={"runs": 8, "calibration": 4, "hidden_step": 64},
    )
    return out, s


@pytest.mark.slow
def test_demo_ends_with_a_speed_table(latency_demo):
    out, s = latency_demo
    speed = s["speed"]
    assert {"torch fp32", "onnxruntime fp32", "openvino fp32"} <= set(speed["pruned_ms"]) and "torch" in speed[
        "dense_ms"
    ]
    for backend in ("onnxruntime", "openvino"):  # INT8 next to fp32, or the gate's reason why not
        gate = speed["int8"][backend]
        assert "error" in gate or f"{backend} int8" in speed["pruned_ms"] and gate["drop"] <= gate["max_drop"]
    assert "onnxruntime (transformer-optimised)" in speed["dense_ms"]
    table = (out / "table.md").read_text()
    assert "vs fastest dense" in table and "Best: the pruned model on" in table
    assert (out / "export" / "onnx" / "model.onnx").is_file()


@pytest.mark.slow
def test_demo_with_a_latency_budget(latency_demo):
    """`make demo`'s path: the demo measures the latency table itself and prunes to a speedup."""
    out, s = latency_demo
    table = LatencyTable.load(out / "latency.json")
    assert table.backend == "openvino" and s["latency"]["target_ms"] == pytest.approx(table.dense_ms / 2)
    assert "latency budget: 2.0× the dense model on openvino" in (out / "table.md").read_text()
    assert s["speed"]["pruned_ms"]
    assert table.has_head_axis and "Structure: branches removed:" in (out / "table.md").read_text()


@pytest.mark.parametrize(
    "args,code,msg",
    [
        (["latency-table", "digits-vit", "-o", "{tmp}"], 2, "is a directory"),
        (["latency-table", "digits-vit", "--backend", "nope", "-o", "{tmp}/t.json"], 2, "Invalid value"),
        (["latency-table", "digits-vit", "--backend", "tensorrt", "-o", "{tmp}/t.json"], 1, "GPU"),
        (["latency-table", "resnet18", "-o", "{tmp}/t.json"], 1, "not a timm VisionTransformer"),
        (["bench", "digits-vit", "--latency-table", "{tmp}/junk.json", "--runs", "2"], 1, "not a p3bkit latency table"),
        (
            [
                "prune",
                "--target-speedup",
                "2",
                "--latency-table",
                "{tmp}/junk.json",
                "--speed-checks",
                "-1",
                "-o",
                "{tmp}/t.json",
            ],
            2,
            "'--speed-checks'",
        ),
    ],
)
def test_latency_bad_inputs(args, code, msg, tmp_path):
    (tmp_path / "junk.json").write_text("[]")
    r = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == code and msg in r.output, r.output
    assert not (tmp_path / "t.json").exists()


def test_prediction_counts_kept_heads_and_removed_branches():
    t = LatencyTable(
        model="m",
        dims={"dim": 8, "depth": 2, "num_heads": 2, "head_dim": 4, "mlp_hidden": 8, "num_tokens": 5},
        backend="torch",
        device="cpu",
        batch=1,
        precision="fp32",
        threads=1,
        machine={},
        fixed_ms=1.0,
        dense_ms=9.0,
        heads=[1, 2],
        head_dims=[1, 4],
        attn_ms=[[0.5, 1.0], [1.0, 2.0]],
        hidden=[1, 8],
        mlp_ms=[0.2, 1.6],
        scale=1.0,
        per_branch_ms=0.1,
    )
    full = list(range(8))
    one_head = [
        {"attn": {"in": full, "out": full, "head_dim": [0, 1, 2, 3], "heads": [1]}, "mlp": None},
        {"attn": None, "mlp": None},
    ]
    assert t.predict(one_head) == pytest.approx(1.0 + 1.0 + 0.1)  # one head of 4 dims, everything else removed
    grid = t.attn_grid()
    assert grid.shape == (3, 5) and grid[0].sum() == 0 and grid[:, 0].sum() == 0
    assert np.all(np.diff(grid, axis=0) >= 0) and np.all(np.diff(grid, axis=1) >= 0)
    assert grid[1, 4] == pytest.approx(1.1) and grid[2, 4] == pytest.approx(2.1)


@pytest.mark.slow
def test_prune_whole_heads_and_branches_for_a_latency_target(tmp_path):
    """`--structure heads --remove-below` against a table measured over head counts: the predicted
    time meets the target to within one branch, with fewer heads where they were dropped."""
    from p3bkit.models.factory import create_model

    table = measure_latency_table(
        create_model("digits-vit").eval(),
        "digits-vit",
        TableConfig(backend="torch", **{**QUICK, "hidden_step": 128, "heads": "all"}),
        isolate=False,
    )
    assert table.has_head_axis and table.heads == [1, 2, 3, 4]
    lut = tmp_path / "lut.json"
    table.save(lut)
    base = [
        "prune",
        "--model",
        "digits-vit",
        "--target-speedup",
        "3",
        "--latency-table",
        str(lut),
        "--epochs",
        "0",
        "1",
        "1",
        "--update-every",
        "4",
        "--speed-checks",
        "0",
        "--no-progress",
    ]
    r = CliRunner().invoke(main, [*base, "--structure", "heads", "--remove-below", "0.1", "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    lat = s["latency"]
    one_branch = max(table.branch_ms("attn", 16), table.branch_ms("mlp", 256))
    assert abs(lat["predicted_ms"] - lat["target_ms"]) <= one_branch
    layers = json.loads((tmp_path / "run" / "pruned" / "arch.json").read_text())["layers"]
    assert table.predict(layers) == pytest.approx(lat["predicted_ms"])
    assert any(l["attn"] and len(l["attn"]["heads"]) < 4 for l in layers) or any(not l["attn"] for l in layers)
    inner_only = dataclasses.replace(table, heads=[4], attn_ms=[table.attn_ms[-1]])
    inner_only.save(tmp_path / "inner.json")
    r = CliRunner().invoke(
        main,
        [*base[:6], str(tmp_path / "inner.json"), *base[7:], "--structure", "heads", "-o", str(tmp_path / "refused")],
    )
    assert r.exit_code == 1 and "--heads all" in r.output


def _priced_table(path, dims: dict) -> str:
    """A latency table for `dims` on this machine with made-up prices: attention costs per head, so
    a parameter of attention is ~4× a parameter of MLP (as on real CPUs, where the attention matmuls
    cost time but hold no parameters). Fast: nothing is timed."""
    from p3bkit.backends import machine_info

    heads, head_dims = list(range(1, dims["num_heads"] + 1)), list(range(1, dims["head_dim"] + 1))
    hidden = list(range(1, dims["mlp_hidden"] + 1))
    t = LatencyTable(
        model="digits-vit",
        dims=dims,
        backend="torch",
        device="cpu",
        batch=1,
        precision="fp32",
        threads=1,
        machine=machine_info(1),
        fixed_ms=0.1,
        dense_ms=0.0,
        heads=heads,
        head_dims=head_dims,
        attn_ms=[[0.02 + 0.03 * h + 0.002 * h * d for d in head_dims] for h in heads],
        hidden=hidden,
        mlp_ms=[0.01 + 0.0005 * k for k in hidden],
    )
    t.dense_ms = t.predict()
    t.save(path)
    return str(path)


def _gated_digits(structure: str = "heads"):
    from p3bkit.latency.table import model_dims
    from p3bkit.models import add_gates
    from p3bkit.models.factory import create_model

    gated = add_gates(create_model("digits-vit"), structure)
    return gated, model_dims(gated.spec)


def test_fastest_architecture_at_a_parameter_budget_is_a_lower_bound():
    """The convex bound on the fastest architecture at a parameter count, against every width
    combination of a one-layer model (attention heads × head dims × MLP hidden units)."""
    import itertools

    from p3bkit.latency.table import model_dims
    from p3bkit.models import add_gates
    from p3bkit.prune.costs import LatencyCosts, ParameterCosts

    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        mlp_ratio=1.0,
        num_classes=3,
    )
    gated = add_gates(vit, "heads")
    dims = model_dims(gated.spec)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = LatencyTable.load(_priced_table(f"{tmp}/t.json", dims))
    params = ParameterCosts(gated, 0.5, "blocks")
    lat = LatencyCosts(gated, table, table.dense_ms / 2)
    options = [lat.options(i, params) for i in range(2)]
    combos = [
        (float(p1 + p2), float(t1 + t2)) for (p1, t1), (p2, t2) in itertools.product(*(list(zip(*o)) for o in options))
    ]
    assert len(combos) == (2 + 1) * (8 + 1) * (16 + 1)
    full = float(params.full.sum())
    for share in (0.1, 0.3, 0.5, 0.8):
        need = share * full
        brute = min(t for p, t in combos if p >= need) + table.fixed_ms
        bound = lat.fastest_at(params, need)
        # the relaxation leaves at most one branch between two of its widths: never further off than
        # one branch's whole range
        widest = max(float(t.max() - t.min()) for _, t in options)
        assert bound <= brute + 1e-9 and brute - bound <= widest + 1e-9, (share, bound, brute)
    assert lat.fastest_at(params, full + 1) == float("inf")


def _both_budgets(tmp_path, keep: str, speedup: str, out: str):
    _, dims = _gated_digits()
    lut = _priced_table(tmp_path / "priced.json", dims)
    args = [
        "prune",
        "--model",
        "digits-vit",
        "--structure",
        "heads",
        "--keep",
        keep,
        "--target-speedup",
        speedup,
        "--latency-table",
        lut,
        "--epochs",
        "0",
        "1",
        "1",
        "--update-every",
        "4",
        "--speed-checks",
        "0",
        "--no-progress",
        "-o",
        str(tmp_path / out),
    ]
    return CliRunner().invoke(main, args), LatencyTable.load(lut)


def test_prune_refuses_a_parameter_budget_and_latency_target_that_conflict(tmp_path):
    r, table = _both_budgets(tmp_path, "0.9", "5", "run")
    assert r.exit_code == 1 and "the parameter budget and the latency target conflict" in r.output, r.output
    assert "keeping 90.0% of the parameters" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("speedup", ["1.5", "3"])
def test_prune_honours_a_parameter_budget_and_a_latency_target_together(tmp_path, speedup):
    """Both hold after a real P3B run: kept parameters ≤ --keep and predicted ms ≤ the target (to
    within one step of a branch's curve, as for a latency target alone); the one that bound is
    met (to within one width step), and the latency allocation alone would keep more parameters."""
    r, table = _both_budgets(tmp_path, "0.5", speedup, "run")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    lat = s["latency"]
    step = 0.03  # one head of the priced table, more than a hidden unit
    assert s["total_keep"] <= 0.5 + 1e-9 and lat["predicted_ms"] <= lat["target_ms"] + step
    if lat["bound"] == "parameters":
        assert s["total_keep"] >= 0.5 - 0.01  # 1% of digits-vit: a few head dims or hidden units
    else:
        assert lat["bound"] == "latency" and lat["predicted_ms"] >= lat["target_ms"] - step
    assert lat["fastest_at_parameter_budget_speedup"] > float(speedup)
    assert (
        "no architecture is predicted faster than" in r.output
        and f"the {'parameter budget' if lat['bound'] == 'parameters' else 'latency target'} bound" in r.output
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(rec.get("bound") in ("latency", "parameters") for rec in log if rec.get("type") == "mask_update")


def test_a_latency_target_alone_keeps_no_parameter_ceiling(tmp_path):
    """Without --keep the latency budget is the only one (the default keep of the settings is unused)."""
    from p3bkit.prune.pruner import P3BConfig, P3BPruner
    from p3bkit.prune.schedule import Schedule

    gated, dims = _gated_digits()
    table = LatencyTable.load(_priced_table(tmp_path / "priced.json", dims))
    alone = P3BPruner(gated, P3BConfig(keep=0.5, target_ms=table.dense_ms / 5), Schedule(0, 4, 4), latency_table=table)
    assert not alone.both_budgets and alone.costs.limit_ms is None
    with pytest.raises(P3BError, match="conflict"):
        P3BPruner(
            gated,
            P3BConfig(keep=0.9, target_ms=table.dense_ms / 5, keep_too=True),
            Schedule(0, 4, 4),
            latency_table=table,
        )


def _slower_runtime(monkeypatch, table: LatencyTable, slower: float) -> list[list[dict]]:
    """Stand in for the runtime with one that runs every pruned model `slower` times the table's
    prediction (the dense model as measured): what a speed check sees when the table under-predicts
    the allocation's shapes. Returns the architectures it was asked to time."""
    import p3bkit.latency.measure as measure

    timed: list[list[dict]] = []

    def fake(model, tab, archs, runs=50):
        timed.extend(archs)
        return tab.dense_ms, [tab.predict(a) * slower for a in archs]

    monkeypatch.setattr(measure, "time_beside_dense", fake)
    return timed


@pytest.mark.parametrize("checks", ["0", "3"])
def test_speed_checks_correct_the_target_by_what_the_runtime_measures(tmp_path, monkeypatch, checks):
    """A runtime 25% slower than the table on pruned models: without checks the run lands 25% under
    the asked speedup; with three checks the corrected target lands within 5% of it, the checks run at
    ½, ¾, ⅞ of sparsify on the architecture the final masks then have (to within the last corrections),
    and the run's own result is timed."""
    from p3bkit.prune.schedule import Schedule

    _, dims = _gated_digits()
    lut = _priced_table(tmp_path / "priced.json", dims)
    table = LatencyTable.load(lut)
    timed = _slower_runtime(monkeypatch, table, 1.25)
    out = tmp_path / "run"
    args = [
        "prune",
        "--model",
        "digits-vit",
        "--structure",
        "heads",
        "--target-speedup",
        "2",
        "--latency-table",
        lut,
        "--epochs",
        "0",
        "2",
        "1",
        "--update-every",
        "2",
        "--speed-checks",
        checks,
        "--no-progress",
        "-o",
        str(out),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    lat = json.loads((out / "summary.json").read_text())["latency"]
    assert lat["target_ms"] == pytest.approx(table.dense_ms / 2) and lat["target_speedup"] == pytest.approx(2)
    if checks == "0":
        assert "measured" not in lat and not timed
        assert lat["predicted_speedup"] / 1.25 < 2 * 0.85
        return
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rows = [rec for rec in log if rec["type"] == "speed_check"]
    steps = [rec["step"] for rec in log if rec["type"] == "mask_update"]
    sched = Schedule(0, 2 * steps[-1] // 3, steps[-1] // 3)  # the last update is the run's last step
    updates = [sched.at(step - 1)[1] for step in steps]
    # each check at the first mask update at or past ½, ¾, ⅞ of sparsify
    assert [rec["progress"] for rec in rows] == [min(p for p in updates if p >= point) for point in (0.5, 0.75, 0.875)]
    first = rows[0]
    assert first["measured_speedup"] == pytest.approx(first["predicted_speedup"] / 1.25)
    assert first["target_ms_after"] == pytest.approx(first["predicted_ms"] * first["measured_speedup"] / 2)
    assert lat["target_ms_used"] == pytest.approx(rows[-1]["target_ms_after"])
    measured = lat["measured"]["measured_speedup"]
    assert abs(measured - 2) / 2 <= 0.05, measured

    def widths(layers):
        return [(len(l["attn"]["heads"]), len(l["attn"]["head_dim"])) if l["attn"] else None for l in layers] + [
            len(l["mlp"]["hidden"]) if l["mlp"] else None for l in layers
        ]

    assert len(timed) == 4 and widths(timed[-1]) == widths(
        json.loads((out / "pruned" / "arch.json").read_text())["layers"]
    )
    assert f"measured {measured:.2f}× over the dense model timed beside it" in r.output
    assert "speed check at 50% of sparsify" in r.output


def test_speed_checks_resume_with_the_corrected_target(tmp_path, monkeypatch):
    """Interrupted between the ½ and ¾ checks, resumed: the ½ check is not run again, the others
    run once, and the corrected target and pruned model are those of an uninterrupted run."""
    _, dims = _gated_digits()
    lut = _priced_table(tmp_path / "priced.json", dims)
    timed = _slower_runtime(monkeypatch, LatencyTable.load(lut), 1.25)
    base = [
        "prune",
        "--model",
        "digits-vit",
        "--structure",
        "heads",
        "--target-speedup",
        "2",
        "--latency-table",
        lut,
        "--epochs",
        "0",
        "8",
        "1",
        "--update-every",
        "4",
        "--no-progress",
    ]
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "whole")])
    assert r.exit_code == 0, r.output
    whole_timings = len(timed)
    from p3bkit.prune.config import P3BConfig, PruneJob
    from p3bkit.prune.job import run_prune

    settings = json.loads((tmp_path / "whole" / "summary.json").read_text())["job"]
    job = PruneJob(
        **{
            **settings,
            "out": str(tmp_path / "cut"),
            "stop_after_epoch": 5,
            "epochs": tuple(settings["epochs"]),
            "p3b": P3BConfig(**settings["p3b"]),
        }
    )
    assert run_prune(job) == {"stopped_after_epoch": 5}  # 5/8 of sparsify: the ½ check done, the ¾ one not

    def checks_logged():
        return [
            rec
            for rec in map(json.loads, (tmp_path / "cut" / "log.jsonl").read_text().splitlines())
            if rec["type"] == "speed_check"
        ]

    assert len(checks_logged()) == 1
    r = CliRunner().invoke(main, [*base, "--resume", "-o", str(tmp_path / "cut")])
    assert r.exit_code == 0, r.output
    assert len(checks_logged()) == 3 and len(timed) == 2 * whole_timings
    whole, cut = (json.loads((tmp_path / d / "summary.json").read_text())["latency"] for d in ("whole", "cut"))
    assert cut["target_ms_used"] == whole["target_ms_used"]
    assert [rec["target_ms_after"] for rec in cut["speed_checks"]] == [
        rec["target_ms_after"] for rec in whole["speed_checks"]
    ]
    assert (tmp_path / "cut" / "pruned" / "arch.json").read_text() == (
        tmp_path / "whole" / "pruned" / "arch.json"
    ).read_text()


def _checks_and_plan(tmp_path, low: float, high: float, seed: int):
    """Speed checks on the priced digits table asking 2×, and a random plan whose predicted time lies
    in (low, high) × the asked ms: (checks, table, plan, asked ms)."""
    from p3bkit.latency.measure import random_layers
    from p3bkit.models.factory import create_model
    from p3bkit.prune.speed import SpeedChecks

    gated, dims = _gated_digits()
    table = LatencyTable.load(_priced_table(tmp_path / "priced.json", dims))
    rng = np.random.default_rng(seed)
    asked = table.dense_ms / 2
    plan = next(
        a
        for a in (random_layers(gated.spec, rng, heads=True) for _ in range(200))
        if low * asked < table.predict(a) < high * asked
    )
    return SpeedChecks(create_model("digits-vit"), table, asked, rounds=3), table, plan, asked


def test_a_plan_faster_than_its_target_does_not_loosen_it(tmp_path, monkeypatch):
    """A runtime exactly as the table predicts, and a planned architecture faster than the latency
    target (a parameter budget bound it): the check leaves the target at the asked speedup; scaling
    the target instead of the plan's prediction would loosen it by the plan's margin."""
    checks, table, layers, asked = _checks_and_plan(tmp_path, 0.7, 0.8, 0)
    _slower_runtime(monkeypatch, table, 1.0)
    row = checks.check(layers, asked)
    assert row["measured_speedup"] > 2 / 0.8
    assert row["target_ms_after"] == pytest.approx(asked)


def test_speed_checks_average_the_runtime_over_table_ratio(tmp_path, monkeypatch):
    """Two checks that measure the runtime at 0.9× and 1.1× the table's speedup (noise around an
    exact table): the second sets the target back to the asked speedup instead of chasing 1.1×."""
    import p3bkit.latency.measure as measure

    checks, table, plan, asked = _checks_and_plan(tmp_path, 0.9, 1.1, 2)
    ratios = iter([0.9, 1.1])

    def runtime(model, tab, archs, runs=50):
        r = next(ratios)
        return tab.dense_ms, [tab.predict(a) / r for a in archs]

    monkeypatch.setattr(measure, "time_beside_dense", runtime)
    first = checks.check(plan, asked)
    assert first["target_ms_after"] == pytest.approx(asked * 0.9) and first["runtime_over_table"] == pytest.approx(0.9)
    second = checks.check(plan, first["target_ms_after"])
    assert second["runtime_over_table"] == pytest.approx(1.0) and second["target_ms_after"] == pytest.approx(asked)
    assert checks.records == [first, second]


@pytest.mark.parametrize("busy_tries", [2, 3])
def test_a_busy_host_is_timed_again_and_never_corrects_the_target(tmp_path, monkeypatch, busy_tries):
    """A neighbour slows the dense model by 30% for the first `busy_tries` timings (and the pruned
    one by 60%, as contention does to small models): the check times again; after three busy tries
    it keeps the target and says the host was busy instead of correcting by a wrong ratio."""
    import p3bkit.latency.measure as measure
    from p3bkit.latency.measure import random_layers
    from p3bkit.models.factory import create_model
    from p3bkit.prune.speed import SpeedChecks

    gated, dims = _gated_digits()
    table = LatencyTable.load(_priced_table(tmp_path / "priced.json", dims))
    calls = []

    def runtime(model, tab, archs, runs=50):
        busy = len(calls) < busy_tries
        calls.append(busy)
        return tab.dense_ms * (1.3 if busy else 1.0), [tab.predict(a) * (1.6 if busy else 1.1) for a in archs]

    monkeypatch.setattr(measure, "time_beside_dense", runtime)
    layers = random_layers(gated.spec, np.random.default_rng(1), heads=True)
    asked = 0.9 * table.predict(layers)
    row = SpeedChecks(create_model("digits-vit"), table, asked, rounds=3).check(layers, asked)
    assert len(calls) == 3
    if busy_tries == 3:
        assert row["host_busy"] and row["target_ms_after"] == asked
    else:
        assert not row["host_busy"] and row["measured_speedup"] == pytest.approx(
            table.dense_ms / (1.1 * row["predicted_ms"])
        )
        assert row["target_ms_after"] == pytest.approx(
            row["predicted_ms"] * row["measured_speedup"] / row["asked_speedup"]
        )


def test_a_failed_speed_check_keeps_the_target_and_the_run(tmp_path, monkeypatch):
    """The runtime fails to time a check: the run goes on with its target, says so, logs the error,
    and the summary says why the result is not timed; the pruned model is saved."""
    import p3bkit.latency.measure as measure

    def broken(*a, **k):
        raise RuntimeError("the timing process died")

    monkeypatch.setattr(measure, "time_beside_dense", broken)
    _, dims = _gated_digits()
    lut = _priced_table(tmp_path / "priced.json", dims)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        main,
        [
            "prune",
            "--model",
            "digits-vit",
            "--structure",
            "heads",
            "--target-speedup",
            "2",
            "--latency-table",
            lut,
            "--epochs",
            "0",
            "2",
            "1",
            "--update-every",
            "2",
            "--no-progress",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    lat = json.loads((out / "summary.json").read_text())["latency"]
    assert "target_ms_used" not in lat and lat["speed_checks"] == [] and "died" in lat["measured"]["error"]
    errors = [
        rec for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if rec["type"] == "speed_check"
    ]
    assert len(errors) == 3 and all("died" in rec["error"] for rec in errors)
    assert "speed check at 50% of sparsify failed" in r.output and "not timed beside the dense one" in r.output
    assert (out / "pruned" / "arch.json").exists()


@pytest.mark.slow
def test_speed_checks_time_on_the_tables_runtime(tmp_path):
    """The user's path with a real runtime: a table measured here, `--target-speedup` with the default
    speed checks; each check and the result are timed whole in their own process (real numbers)."""
    lut = _digits_table(tmp_path)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        main,
        [
            "prune",
            "--model",
            "digits-vit",
            "--target-speedup",
            "2",
            "--latency-table",
            lut,
            "--epochs",
            "0",
            "2",
            "1",
            "--update-every",
            "4",
            "--no-progress",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    lat = json.loads((out / "summary.json").read_text())["latency"]
    assert len(lat["speed_checks"]) >= 1
    for row in [*lat["speed_checks"], lat["measured"]]:
        assert 0 < row["pruned_ms"] < row["dense_ms"], row  # the planned and final models run faster than dense
    assert "measured" in r.output and "over the dense model timed beside it" in r.output


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2
"""
ARM = """processor\t: 0
Features\t: fp asimd sve sve2
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""


def test_cpu_identity_tells_apart_hosts_of_one_name():
    """/proc/cpuinfo text of two hosts both named "AMD EPYC": the id and the kernel instruction sets
    differ; an Arm host is identified by implementer and part; text without flags gives None."""
    from p3bkit.backends.timing import cpu_identity, describe_cpu

    zen3 = cpu_identity(ZEN3)
    assert zen3 == {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 1", "isa": ["avx2", "fma"]}
    zen4 = cpu_identity(ZEN3.replace("model\t\t: 1", "model\t\t: 17").replace("bmi2", "bmi2 avx512f avx512_bf16"))
    assert zen4["cpu"] == zen3["cpu"] and zen4["cpu_id"] != zen3["cpu_id"]
    assert zen4["isa"] == ["avx2", "fma", "avx512f", "avx512_bf16"]
    assert describe_cpu(zen4) == "AMD EPYC (AuthenticAMD family 25 model 17, avx2 avx512f avx512_bf16)"
    arm = cpu_identity(ARM)
    assert arm == {"cpu": None, "cpu_id": "implementer 0x41 part 0xd4f", "isa": ["asimd", "sve", "sve2"]}
    assert cpu_identity("processor : 0\n") == {"cpu": None, "cpu_id": None, "isa": None}


def test_a_table_from_another_cpu_kind_of_the_same_name_is_refused(tmp_path, capsys):
    """A table made on an AVX-512 host named like this one is refused, with what differs; a table
    that records its CPU by name only (an earlier p3bkit) is used, with a note saying so."""
    from p3bkit.backends import machine_info

    _, dims = _gated_digits()
    table = LatencyTable.load(_priced_table(tmp_path / "priced.json", dims))
    here = {**machine_info(1), "cpu_id": "AuthenticAMD family 25 model 1", "isa": ["avx2", "fma"]}
    table.machine = {**here, "cpu_id": "AuthenticAMD family 25 model 17", "isa": ["avx2", "fma", "avx512f"]}
    with pytest.raises(P3BError, match="measured on another machine.*cpu_id: table 'AuthenticAMD family 25 model 17'"):
        table.check_machine(here)
    table.machine = {**here, "isa": ["avx2", "fma", "avx512f"]}
    with pytest.raises(P3BError, match="isa: table"):
        table.check_machine(here)
    table.machine = {**here}
    table.check_machine(here)
    assert capsys.readouterr().err == ""
    table.machine = {k: v for k, v in here.items() if k not in ("cpu_id", "isa")}
    table.check_machine(here)
    assert "records its CPU by name only" in capsys.readouterr().err


def test_speed_checks_on_a_cpu_far_slower_than_the_tables_say_so(tmp_path, monkeypatch):
    """Every timing runs the dense model 2.6× the table's time (the CPU is not the kind the table was
    made on): each check keeps the target, and the message asks whether this is the table's CPU."""
    import p3bkit.latency.measure as measure

    _, dims = _gated_digits()
    lut = _priced_table(tmp_path / "priced.json", dims)

    def slow_cpu(model, tab, archs, runs=50):
        return 2.6 * tab.dense_ms, [2.6 * tab.predict(a) for a in archs]

    monkeypatch.setattr(measure, "time_beside_dense", slow_cpu)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        main,
        ["prune", "--model", "digits-vit", "--target-speedup", "2", "--latency-table", lut, "--epochs", "0", "2", "1"]
        + ["--update-every", "2", "--speed-checks", "1", "--no-progress", "-o", str(out)],
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (row,) = [rec for rec in rows if rec["type"] == "speed_check"]
    assert row["host_busy"] and row["target_ms_after"] == pytest.approx(row["target_ms_before"])
    assert "2.6× the table's dense time: is this the CPU it was made on?" in r.output
