"""Why INT8 gains less on pruned DeiTs, and which layers onnxruntime should quantise.

1. onnxruntime scope: the same fp32 graph quantised (static QDQ, per-channel, S8S8) on every
   MatMul/Gemm/Conv vs on weighted ones only (p3bkit's choice), timed interleaved in one process.
2. OpenVINO per-op-type time (its PERF_COUNT counters) of the fp32 and the INT8 (NNCF) IR: which
   work INT8 speeds up and which it leaves (softmax, LayerNorm, the attention subgraph).

DeiT-S, dense and P3B-inner 90% (`results/allocations`, the paper's budget), random weights,
batch 1; calibration on 16 digits images upsampled to 224.

    python benchmarks/int8_why.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from p3bkit.exporters import export_model
from p3bkit.exporters.onnx import export_onnx
from p3bkit.exporters.quantize import Int8Config, QUANTIZED_OPS, _quiet, load_int8_data, weighted_nodes
from p3bkit.exporters.runtimes import ort_session
from p3bkit.models.factory import create_model
from p3bkit.models.pruned import set_write_op

RESULTS = Path(__file__).parent / "results"


def ort_scope(refs: dict[str, str], work: Path, threads: int, rounds: int = 6) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = {}
    for label, ref in refs.items():
        model = set_write_op(create_model(ref).eval(), "scatter")
        src = work / f"{label}.onnx"
        export_onnx(model, src, (3, 224, 224))
        calib = load_int8_data(Int8Config("digits", 16, val_size=8), model).calib
        paths = {"fp32": src}
        for scope, nodes in (("every MatMul/Gemm/Conv", None), ("weighted only", [n.name for n in weighted_nodes(src)])):
            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter([{"pixel_values": calib}])

                def get_next(self):
                    return next(self.it, None)

            paths[scope] = work / f"{label}-{len(paths)}.onnx"
            with _quiet():
                quantize_static(str(src), str(paths[scope]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=nodes)
        sessions = {k: ort_session(p, threads, spin=False) for k, p in paths.items()}
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(rounds):  # round-robin blocks: every variant sees the same machine state
            for k, sess in sessions.items():
                for _ in range(3):
                    sess.run(None, {"pixel_values": x})
                for _ in range(15):
                    t = time.perf_counter()
                    sess.run(None, {"pixel_values": x})
                    times[k].append(time.perf_counter() - t)
        out[label] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(label, {k: round(v, 2) for k, v in out[label].items()}, flush=True)
    return out


def ov_profile(ref: str, work: Path, threads: int, runs: int = 30) -> dict:
    import openvino as ov

    export_model(ref, "openvino", work / "ov-fp32", verify=False)
    export_model(ref, "openvino", work / "ov-int8", precision="int8", verify=False,
                 int8=Int8Config("digits", 16, val_size=8))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    out = {}
    for name in ("fp32", "int8"):
        compiled = ov.Core().compile_model(str(work / f"ov-{name}" / "model.xml"), "CPU", {
            "PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        req = compiled.create_infer_request()
        totals: dict[str, float] = {}
        for _ in range(runs):
            req.infer({0: x})
            for p in req.get_profiling_info():
                key = f"{p.node_type} ({p.exec_type})"
                totals[key] = totals.get(key, 0.0) + p.real_time.total_seconds() * 1e3 / runs
        out[name] = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    return out


def report_md(res: dict) -> str:
    lines = ["# Why INT8 gains less on pruned DeiTs (`python benchmarks/int8_why.py`)", "",
             f"{res['cpu']}, {res['threads']} threads, batch 1, DeiT-S, random weights.", "",
             "## onnxruntime: which layers to quantise (median ms, one interleaved run per model)", "",
             "| model | fp32 | INT8, every MatMul/Gemm/Conv | INT8, weighted only |", "|---|---|---|---|"]
    for label, t in res["ort_scope"].items():
        lines.append(f"| {label} | {t['fp32']:.2f} | {t['every MatMul/Gemm/Conv']:.2f} | {t['weighted only']:.2f} |")
    lines += ["", "## OpenVINO per-op-type time, P3B-inner 90% (ms per image, PERF_COUNT, top 8)", "",
              "| op (kernel) | fp32 | | op (kernel) | INT8 |", "|---|---|---|---|---|"]
    f, q = list(res["ov_profile"]["fp32"].items())[:8], list(res["ov_profile"]["int8"].items())[:8]
    for (fk, fv), (qk, qv) in zip(f, q):
        lines.append(f"| {fk} | {fv:.3f} | | {qk} | {qv:.3f} |")
    lines.append(f"\nTotals (sum of op times): fp32 {sum(res['ov_profile']['fp32'].values()):.2f} ms, "
                 f"INT8 {sum(res['ov_profile']['int8'].values()):.2f} ms.")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from int8_table7 import build
    from p3bkit.bench.harness import machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="int8-why-"))
    try:
        refs = build("deit_s", work)
        res = {"cpu": machine_info(args.threads)["cpu"], "threads": args.threads,
               "ort_scope": ort_scope(refs, work, args.threads), "ov_profile": ov_profile(refs["inner_90"], work, args.threads)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (RESULTS / "int8_why.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "int8_why.md").write_text(report_md(res))
    print(report_md(res))


if __name__ == "__main__":
    main()
