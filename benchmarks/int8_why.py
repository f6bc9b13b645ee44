"""Why INT8 gains less on pruned DeiTs, and which layers onnxruntime should quantise.

1. onnxruntime scope: the same fp32 graph quantised (static QDQ, per-channel, S8S8) on every
   MatMul/Gemm/Conv vs on weighted ones only (p3bkit's choice), timed interleaved in one process.
2. OpenVINO per-op-type time of the fp32 and the INT8 (NNCF) IR, as `p3bkit export --precision
   int8` prints and records it: which work INT8 speeds up and which it leaves (softmax, LayerNorm,
   the attention subgraph).

DeiT-S, dense and P3B-inner 90% (`results/allocations`, the paper's budget), random weights,
batch 1; calibration on 16 digits images at 224 px (an ImageFolder).

    python benchmarks/int8_why.py --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, allocation_model, digits_image_folder, p3bkit, work_folder

from p3bkit.backends import BenchConfig, get_backend
from p3bkit.backends.onnx import export_onnx
from p3bkit.backends.onnxruntime import QUANTIZED_OPS, quantize_static_qdq
from p3bkit.backends.timing import latency_stats, time_interleaved
from p3bkit.export.int8 import Int8Config, load_int8_data
from p3bkit.models.factory import create_model
from p3bkit.models.pruned import set_write_op


def ort_scope(refs: dict[str, str], work: Path, threads: int, rounds: int = 6) -> dict:
    """Per model: fp32, INT8 of every MatMul/Gemm/Conv, INT8 of the weighted ones, timed interleaved."""
    import onnx

    ort = get_backend("onnxruntime")
    out = {}
    for label, ref in refs.items():
        model = set_write_op(create_model(ref).eval(), "scatter")
        src = work / f"{label}.onnx"
        export_onnx(model, src, (3, 224, 224))
        calib = load_int8_data(Int8Config("digits", 16, val_size=8), model).data.calib
        every = [n.name for n in onnx.load(str(src)).graph.node if n.op_type in QUANTIZED_OPS]
        paths = {"fp32": src}
        for scope, nodes in (("every MatMul/Gemm/Conv", every), ("weighted only", None)):
            paths[scope] = work / f"{label}-{len(paths)}.onnx"
            quantize_static_qdq(src, paths[scope], [calib], [], nodes=nodes)
        timed = [ort.timer(str(p), 1, "fp32" if k == "fp32" else "int8", threads) for k, p in paths.items()]
        lat = time_interleaved(
            timed, BenchConfig(runs=15 * rounds, warmup=3, block=15, block_warmup=3, threads=threads)
        )
        out[label] = {k: latency_stats(ms, 1)["median_ms"] for k, ms in zip(paths, lat)}
        print(label, {k: round(v, 2) for k, v in out[label].items()}, flush=True)
    return out


def ov_profile(ref: str, work: Path, data: Path) -> dict:
    """OpenVINO's per-op-type time of the fp32 and the INT8 IR, as `p3bkit export --precision int8`
    prints and records it (PERF_COUNT, kernel names)."""
    out = work / "ov-int8"
    p3bkit(
        "export",
        ref,
        "--format",
        "openvino",
        "--precision",
        "int8",
        "--calib-data",
        data,
        "--calib-size",
        16,
        "--val-size",
        8,
        "--max-drop",
        100,
        "--no-verify",
        "-o",
        out,
        "--no-progress",
    )
    prof = json.loads((out / "model.xml.json").read_text())["extra"]["int8"]["op_profile"]
    return {
        "fp32": prof["fp32"],
        "int8": prof["int8"],
        "fp32_total_ms": prof["fp32_total_ms"],
        "int8_total_ms": prof["int8_total_ms"],
    }


def report_md(res: dict) -> str:
    lines = [
        "# Why INT8 gains less on pruned DeiTs (`python benchmarks/int8_why.py`)",
        "",
        f"{res['cpu']}, {res['threads']} threads, batch 1, DeiT-S, random weights.",
        "",
        "## onnxruntime: which layers to quantise (median ms, one interleaved run per model)",
        "",
        "| model | fp32 | INT8, every MatMul/Gemm/Conv | INT8, weighted only |",
        "|---|---|---|---|",
    ]
    for label, t in res["ort_scope"].items():
        lines.append(f"| {label} | {t['fp32']:.2f} | {t['every MatMul/Gemm/Conv']:.2f} | {t['weighted only']:.2f} |")
    for label, prof in res["ov_profile"].items():
        name = {"inner_90": "P3B-inner 90%", "heads_90": "P3B-heads 90%"}.get(label, label)
        lines += [
            "",
            f"## OpenVINO per-op-type time, {name} (ms per image, PERF_COUNT, top 8)",
            "",
            "| op (kernel) | fp32 | | op (kernel) | INT8 |",
            "|---|---|---|---|---|",
        ]
        f, q = list(prof["fp32"].items())[:8], list(prof["int8"].items())[:8]
        for (fk, fv), (qk, qv) in zip(f, q):
            lines.append(f"| {fk} | {fv:.3f} | | {qk} | {qv:.3f} |")
        lines.append(
            f"\nTotals (sum of op times): fp32 {prof['fp32_total_ms']:.2f} ms, INT8 {prof['int8_total_ms']:.2f} ms."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from p3bkit.backends import machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with work_folder("int8-why-") as work:
        data = digits_image_folder(work / "digits224", 224, train=64, val=32)
        refs = {
            label: str(allocation_model("deit_s", label, work / label, num_classes=10))
            for label in ("dense", "inner_90", "heads_90")
        }
        res = {
            "cpu": machine_info(args.threads)["cpu"],
            "threads": args.threads,
            "ort_scope": ort_scope(refs, work, args.threads),
            "ov_profile": {
                label: ov_profile(refs[label], work / f"prof-{label}", data) for label in ("inner_90", "heads_90")
            },
        }
    (RESULTS / "int8_why.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "int8_why.md").write_text(report_md(res))
    print(report_md(res))


if __name__ == "__main__":
    main()
