"""INT8 and bf16 columns for Table 7: DeiT-S/B dense, P3B-inner 90% and P3B-heads 90% on the CPU runtimes, batch 1.

Per DeiT, every artefact is timed interleaved in ONE process (`run_bench`), so the ratios come
from one run: OpenVINO fp32, bf16 (inference hint, on CPUs with bf16 units) and INT8 (NNCF,
transformer preset), onnxruntime fp32 and INT8 (static QDQ, per-channel weights), for the dense
model and the P3B-inner 90% allocation (`results/allocations`, the paper's total-parameter budget).

Weights are random (latency depends on the architecture, not the values), so the parity check is
off and the accuracy gate is trivially met: accuracy of INT8 is measured on trained models by
`int8_digits.py`. Calibration: digits upsampled to 224 (3 channels), `--calib-size` images.

    python benchmarks/int8_table7.py --models deit_s deit_b --runs 30 --threads 2
    python benchmarks/int8_table7.py --report      # md + png again from the JSON
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from p3bkit.bench import BenchConfig, run_bench
from p3bkit.errors import P3BError
from p3bkit.export import artefact_name, export_model
from p3bkit.export.int8 import Int8Config

HERE = Path(__file__).parent
RESULTS = HERE / "results"
NAMES = {"dense": "dense", "inner_90": "P3B-inner 90%", "heads_90": "P3B-heads 90%"}
# (runtime, export format, precision): each artefact runs at its own precision
VARIANTS = [("openvino", "openvino", "fp32"), ("openvino", "openvino", "bf16"), ("openvino", "openvino", "int8"),
            ("onnxruntime", "onnx", "fp32"), ("onnxruntime", "onnx", "int8")]


def build(key: str, work: Path) -> dict[str, str]:
    from table7 import build_models

    refs, _, _ = build_models(RESULTS / "allocations", work, key, ["inner", "heads"])
    return {label: ref for label, ref in refs.items() if label in ("dense", "inner_90", "heads_90")}


def export_all(refs: dict[str, str], work: Path, calib_size: int) -> list[dict]:
    rows = []
    for label, ref in refs.items():
        for runtime, fmt, prec in VARIANTS:
            out = work / f"{label}-{fmt}-{prec}"
            int8 = Int8Config("digits", calib_size, val_size=50) if prec == "int8" else None
            try:
                export_model(ref, fmt, out, precision=prec, verify=False, int8=int8)
            except P3BError as exc:  # e.g. bf16 on a CPU without bf16 units
                print(f"skipping {label} {fmt} {prec}: {exc}")
                continue
            rows.append({"label": label, "runtime": runtime, "precision": prec, "artefact": str(out / artefact_name(fmt))})
    return rows


def run(args) -> None:
    report = {"protocol": "", "runs": args.runs, "threads": args.threads, "models": {},
              "budget": "P3B-inner and P3B-heads 90% of all parameters (the paper's budget)", "batch": 1}
    for key in args.models:
        work = Path(tempfile.mkdtemp(prefix=f"int8-{key}-"))
        try:
            rows = export_all(build(key, work), work, args.calib_size)
            rep = run_bench([r["artefact"] for r in rows], cfg=BenchConfig(runs=args.runs, warmup=10, threads=args.threads))
            report["machine"], report["protocol"] = rep["machine"], rep["protocol"]
            report["models"][key] = [{**r, "median_ms": res["stats"]["median_ms"], "ran_at": res["precision"]}
                                     for r, res in zip(rows, rep["results"])]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(format_rows(key, report["models"][key]))
    out = RESULTS / f"int8_table7_{args.machine}.json"
    out.write_text(json.dumps(report, indent=1))
    write_report(args.machine)
    print(f"wrote {out}")


def write_report(machine: str) -> None:
    """Markdown and a bar plot (ms per precision and runtime, dense vs P3B-inner 90%) from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads((RESULTS / f"int8_table7_{machine}.json").read_text())
    (RESULTS / f"int8_table7_{machine}.md").write_text(format_report(report))
    fig, axes = plt.subplots(1, len(report["models"]), figsize=(6 * len(report["models"]), 4), squeeze=False)
    for ax, (key, rows) in zip(axes[0], report["models"].items()):
        labels = [f"{r['runtime']}\n{r['precision']}" for r in rows if r["label"] == "dense"]
        present = [lab for lab in NAMES if any(r["label"] == lab for r in rows)]
        width = 0.8 / len(present)
        for i, label in enumerate(present):
            ms = [r["median_ms"] for r in rows if r["label"] == label]
            ax.bar([j + width * i for j in range(len(ms))], ms, width=width, label=NAMES[label])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
        ax.set_yscale("log")
        ax.set_ylabel("ms per image (batch 1, log scale)")
        ax.set_title(f"{key}: fp32 / bf16 / INT8, {report['machine']['cpu']}, {report['threads']} threads")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"int8_table7_{machine}.png", dpi=120)
    plt.close(fig)


def format_rows(key: str, rows: list[dict]) -> str:
    ms = {(r["label"], r["runtime"], r["precision"]): r["median_ms"] for r in rows}
    lines = [f"### {key}", "", "| model | runtime | fp32 ms | bf16 ms | int8 ms | int8 vs fp32 | bf16 vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for label in NAMES:
        for runtime in ("openvino", "onnxruntime"):
            f, b, i = (ms.get((label, runtime, p)) for p in ("fp32", "bf16", "int8"))
            if f is not None:
                lines.append(f"| {NAMES[label]} | {runtime} | {_ms(f)} | {_ms(b)} | {_ms(i)} | {_ratio(f, i)} | {_ratio(f, b)} |")
    best_fp32 = min(ms[k] for k in ms if k[0] == "dense" and k[2] == "fp32")
    for label in [lab for lab in NAMES if lab != "dense" and any(k[0] == lab for k in ms)]:
        best = min(ms[k] for k in ms if k[0] == label)
        lines.append(f"\n{NAMES[label]} at its fastest (any precision) vs the dense model at its fastest fp32: "
                     f"{best_fp32 / best:.2f}×")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return f"{v:.2f}" if v else "—"


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}×" if b else "—"


def format_report(report: dict) -> str:
    m = report.get("machine", {})
    head = ["# INT8 / bf16 columns for Table 7 (`python benchmarks/int8_table7.py`)", "",
            f"{m.get('cpu', '?')}, {report['threads']} threads, batch 1, median of {report['runs']} runs; "
            f"budget: {report['budget']}; random weights (latency only).", f"Protocol: {report['protocol']}", ""]
    return "\n".join(head + [format_rows(k, rows) + "\n" for k, rows in report["models"].items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_s", "deit_b"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--machine", default="cpu2")
    ap.add_argument("--report", action="store_true", help="only re-render md + png from the JSON")
    args = ap.parse_args()
    write_report(args.machine) if args.report else run(args)


if __name__ == "__main__":
    main()
