"""INT8 for Table 7 through the CLI a user runs: DeiT-S/B dense and P3B-heads, fp32 vs INT8, batch 1.

Every step is a `p3bkit` command (printed as it runs), with the CLI's defaults, so the numbers are
the ones a user gets:

1. `p3bkit export` of DeiT-S/B dense, P3B-heads 75/90% and P3B-inner 90% at the paper's budget
   (widths from `results/allocations`): OpenVINO fp32, bf16 (an inference hint, on CPUs with bf16
   units), INT8 calibrated on sklearn's digits as a 224-px ImageFolder, OpenVINO INT8 with `--calib-data synthetic`, onnxruntime fp32 and INT8 (digits
   folder). Export prints and records where the time goes (per-op profile, fp32 vs INT8) and what
   stayed fp32; INT8 is checked against torch on 64 real digits images (cosine of the logits) — an
   export the check refuses is noted and timed from `--no-verify`.
2. One `p3bkit bench` of every artefact of a DeiT, interleaved in one process, runtime thread
   settings untouched — ratios from one run.

Weights are random (latency depends on the architecture, not the values) with 10-class heads, so
the top-1 the INT8 gate compares is chance and `--max-drop 100` keeps the remedy from reverting
layers over noise; INT8 accuracy on trained models is `int8_digits.py`'s and the tests'. (A head
fitted on a random pruned DeiT's features reached 88% but lost 43 points in INT8: its features
differ between images by a small fraction of their size, unlike a trained network's.)

    python benchmarks/int8_table7.py --models deit_s deit_b --runs 300
    python benchmarks/int8_table7.py --report      # md + png again from the JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DEIT, RESULTS, allocation_model, digits_image_folder, p3bkit, work_folder

from p3bkit.fileio import write_json_atomic

# (row key, export format, precision, calibration): calibration "folder" = the digits ImageFolder
VARIANTS = [
    ("openvino fp32", "openvino", "fp32", None),
    ("openvino bf16", "openvino", "bf16", None),
    ("openvino int8", "openvino", "int8", "folder"),
    ("openvino int8 synthetic", "openvino", "int8", "synthetic"),
    ("onnxruntime fp32", "onnx", "fp32", None),
    ("onnxruntime int8", "onnx", "int8", "folder"),
]
ARTEFACT = {"openvino": "model.xml", "onnx": "model.onnx"}


def export_rows(key: str, label: str, ref: str, data: Path, work: Path, calib_size: int) -> list[dict]:
    rows = []
    for name, fmt, prec, calib in VARIANTS:
        out = work / f"{key}-{label}-{name.replace(' ', '-')}"
        args = ["export", ref, "--format", fmt, "-o", out, "--precision", prec, "--no-progress"]
        if calib:  # random weights: top-1 is near chance, so the gate must not revert layers over noise
            args += [
                "--calib-data",
                data if calib == "folder" else "synthetic",
                "--calib-size",
                calib_size,
                "--max-drop",
                100,
            ]
        refused = None
        try:
            p3bkit(*args)
        except RuntimeError as exc:
            if prec == "bf16" and "bf16 units" in str(exc):  # a CPU without bf16 units: no bf16 row
                print(f"skipping {label} {name}: {str(exc).strip().splitlines()[-1]}", flush=True)
                continue
            if "parity check failed" not in str(exc):
                raise
            refused = str(exc).strip().splitlines()[-1]  # the parity check on real images refused it: say why,
            p3bkit(*args, "--no-verify")  # and time it anyway
        artefact = out / ARTEFACT[fmt]
        record = json.loads((out / f"{ARTEFACT[fmt]}.json").read_text())
        gate = record.get("extra", {}).get("int8") or {}
        stats = [st for b in record.get("parity", {}).values() for st in b.values()]
        rows.append(
            {
                "label": label,
                "variant": name,
                "artefact": str(artefact),
                "gated": gate.get("gated"),
                "kept_in_fp32": gate.get("kept_in_fp32", []),
                "remedy": gate.get("remedy"),
                "op_profile": gate.get("op_profile"),
                "parity_refused": refused,
                "max_abs_diff": max((st["max_abs_diff"] for st in stats), default=None),
                "cosine_worst": min((st["cosine_min"] for st in stats), default=None) if prec != "fp32" else None,
            }
        )
    return rows


def run(args) -> None:
    out = RESULTS / f"int8_table7_{args.machine}.json"
    earlier = json.loads(out.read_text())["models"] if out.is_file() else {}  # DeiTs not rerun stay as measured
    report = {
        "runs": args.runs,
        "models": {k: v for k, v in earlier.items() if k not in args.models},
        "batch": 1,
        "budget": "P3B-heads 75/90% and P3B-inner 90% of all parameters pruned (the paper's budget)",
    }
    with work_folder("int8-table7-", args.keep) as work:
        data = digits_image_folder(work / "digits224", 224)
        for key in args.models:
            labels = ["dense", *args.labels]
            refs = {
                label: str(allocation_model(key, label, work / f"{key}_{label}", num_classes=10)) for label in labels
            }
            rows = []
            for label, ref in refs.items():
                rows += export_rows(key, label, ref, data, work, args.calib_size)
            bench = work / f"bench-{key}.json"
            p3bkit("bench", *[r["artefact"] for r in rows], "--runs", args.runs, "--json", bench)
            rep = json.loads(bench.read_text())
            report["machine"], report["protocol"] = rep["machine"], rep["protocol"]
            for r, res in zip(rows, rep["results"]):
                r["median_ms"], r["ran_at"] = res["stats"]["median_ms"], res["precision"]
            report["models"][key] = rows
            write_json_atomic(out, report)  # each DeiT as soon as it is measured
            print(format_rows(key, rows), flush=True)
    write_report(args.machine)
    print(f"wrote {out}")


def write_report(machine: str) -> None:
    """Markdown and a bar plot (ms per variant, dense vs P3B-heads) from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads((RESULTS / f"int8_table7_{machine}.json").read_text())
    (RESULTS / f"int8_table7_{machine}.md").write_text(format_report(report))
    fig, axes = plt.subplots(1, len(report["models"]), figsize=(7 * len(report["models"]), 4.5), squeeze=False)
    for ax, (key, rows) in zip(axes[0], report["models"].items()):
        labels = list(dict.fromkeys(r["label"] for r in rows))
        variants = [v[0] for v in VARIANTS]
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ms = {r["variant"]: r["median_ms"] for r in rows if r["label"] == label}
            ax.bar(
                [j + width * i for j in range(len(variants))],
                [ms.get(v, 0) for v in variants],
                width=width,
                label=label,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], [v.replace(" ", "\n", 1) for v in variants])
        ax.set_yscale("log")
        ax.set_ylabel("ms per image (batch 1, log scale)")
        ax.set_title(f"{key}: fp32 vs INT8 through the CLI, {report['machine']['cpu']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"int8_table7_{machine}.png", dpi=120)
    plt.close(fig)


def format_rows(key: str, rows: list[dict]) -> str:
    by = {(r["label"], r["variant"]): r for r in rows}
    lines = [
        f"### {key}",
        "",
        "| model | runtime | fp32 ms | bf16 ms | INT8 ms (digits folder) | INT8 vs fp32 | "
        "INT8 ms (synthetic) | vs fp32 | INT8 cosine vs torch on digits, worst image: folder / synthetic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["label"] for r in rows):
        for rt in ("openvino", "onnxruntime"):
            f, b, q, s = (by.get((label, f"{rt} {v}")) for v in ("fp32", "bf16", "int8", "int8 synthetic"))
            lines.append(
                f"| {label} | {rt} | {f['median_ms']:.2f} | {_ms(b)} | {q['median_ms']:.2f} | "
                f"{f['median_ms'] / q['median_ms']:.2f}× | {_ms(s)} | {_ratio(f, s)} | "
                f"{_cos(q)} / {_cos(s)} |"
            )
    dense = min(r["median_ms"] for r in rows if r["label"] == "dense" and r["variant"].endswith("fp32"))
    for label in [lab for lab in dict.fromkeys(r["label"] for r in rows) if lab != "dense"]:
        best = min((r for r in rows if r["label"] == label), key=lambda r: r["median_ms"])
        lines.append(
            f"\n{label} at its fastest ({best['variant']}, {best['median_ms']:.2f} ms) vs the dense model at "
            f"its fastest fp32 ({dense:.2f} ms): {dense / best['median_ms']:.2f}×"
        )
    return "\n".join(lines)


def _cos(r: dict | None) -> str:
    if not r:
        return "—"
    if r["parity_refused"]:
        return f"refused ({r['parity_refused'].split('cosine ')[1].split(' ')[0] if 'cosine ' in r['parity_refused'] else 'parity'})"
    return f"{r['cosine_worst']:.4f}" if r["cosine_worst"] is not None else "—"


def _ms(r: dict | None) -> str:
    return f"{r['median_ms']:.2f}" if r else "—"


def _ratio(f: dict, r: dict | None) -> str:
    return f"{f['median_ms'] / r['median_ms']:.2f}×" if r else "—"


def format_report(report: dict) -> str:
    m = report.get("machine", {})
    head = [
        "# INT8 for Table 7 through the CLI (`python benchmarks/int8_table7.py`)",
        "",
        f"{m.get('cpu', '?')}, runtime thread settings as the CLI leaves them, batch 1, median of "
        f"{report['runs']} runs, one `p3bkit bench` per DeiT; budget: {report['budget']}. Random weights "
        "(latency depends on the architecture), 10-class heads; INT8 calibrated on digits as a 224-px ImageFolder "
        "or on synthetic noise, `--max-drop 100` (the top-1 of a random model is chance); the cosine is the "
        "export's parity check against torch on 64 digits images.",
        f"Protocol: {report['protocol']}",
        "",
    ]
    return "\n".join(head + [format_rows(k, rows) + "\n" for k, rows in report["models"].items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_s", "deit_b"], choices=sorted(DEIT))
    ap.add_argument(
        "--labels",
        nargs="+",
        default=["heads_75", "heads_90", "inner_90"],
        help="allocations of results/allocations beside the dense model",
    )
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--machine", default="cpu2")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--report", action="store_true", help="only re-render md + png from the JSON")
    args = ap.parse_args()
    write_report(args.machine) if args.report else run(args)


if __name__ == "__main__":
    main()
