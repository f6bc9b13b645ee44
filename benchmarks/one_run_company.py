"""Does the company a model is timed in change its latency? One P3B allocation against its dense DeiT
on OpenVINO, timed by `p3bkit bench` (fp32, batch 1, fixed batch axis) in several sets, each set a
fresh process:

- `pair`: the dense DeiT and the allocation, alone (as `bench_beside_dense.sh`);
- `+torch` / `+onnxruntime`: the pair and the dense DeiT on torch eager / onnxruntime;
- `+openvino`: the pair and the other allocations on OpenVINO;
- `one-run`: what `table7.py --one-run --pruned-on openvino` times (the dense torch model first,
  every allocation on OpenVINO, `--dense-baselines`);

The sets run in `--rounds` rounds (every set once per round, in order), so a busy spell of the host
hits one round of every set, not every run of one set.

    python benchmarks/one_run_company.py --model deit_s --label speed_75 \
        --others heads_75 heads_90 speed_90 --runs 150 --rounds 3 --threads 2

Writes results/one_run_company_<model>_<label>.{json,md} (`--name STEM`: results/STEM.{json,md}, a quick
look beside the committed table): per set and round, the medians of the dense
and the pruned graph on OpenVINO and their ratio; per set, the median ratio over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from common import RESULTS, allocation_model, p3bkit, work_folder


def _medians(report: dict, dense_xml: str, pruned_xml: str) -> tuple[float, float]:
    by_name = {r["name"]: r["stats"]["median_ms"] for r in report["results"] if r["backend"] == "openvino"}
    return by_name[dense_xml], by_name[pruned_xml]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_s", choices=["deit_s", "deit_b"])
    ap.add_argument("--label", default="speed_75", help="the allocation whose ratio is watched")
    ap.add_argument("--others", nargs="*", default=["heads_75", "heads_90", "speed_90"])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sets", nargs="*", default=None, help="only these sets (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--name",
        help="results file stem (default one_run_company_<model>_<label>; give another for a "
        "quick look that must not replace the committed table)",
    )
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    args = ap.parse_args()
    stem = RESULTS / (args.name or f"one_run_company_{args.model}_{args.label}")
    if args.report:
        write_report(stem, json.loads(Path(f"{stem}.json").read_text()))
        return

    with work_folder("one-run-company-") as work:
        folders = {lab: allocation_model(args.model, lab, work / lab) for lab in ["dense", args.label, *args.others]}
        xml, onnx = {}, str(work / "dense_onnx" / "model.onnx")
        for lab, folder in folders.items():
            p3bkit(
                "export",
                folder,
                "--format",
                "openvino",
                "--static-batch",
                1,
                "--no-verify",
                "-o",
                work / f"{lab}_ov",
                quiet=True,
            )
            xml[lab] = str(work / f"{lab}_ov" / "model.xml")
        p3bkit(
            "export",
            folders["dense"],
            "--format",
            "onnx",
            "--static-batch",
            1,
            "--no-verify",
            "-o",
            work / "dense_onnx",
            quiet=True,
        )
        pair = [xml["dense"], xml[args.label]]
        sets = {
            "pair": pair,
            "+torch": [*pair, str(folders["dense"])],
            "+onnxruntime": [*pair, onnx],
            "+openvino": [*pair, *(xml[o] for o in args.others)],
            "one-run": [str(folders["dense"]), xml[args.label], *(xml[o] for o in args.others), "--dense-baselines"],
        }
        if args.sets:
            unknown = set(args.sets) - set(sets)
            if unknown:
                raise SystemExit(f"unknown sets {sorted(unknown)}; choose from {list(sets)}")
            sets = {k: v for k, v in sets.items() if k in args.sets}
        rows = []
        for rnd, (name, refs) in ((r, kv) for r in range(args.rounds) for kv in sets.items()):
            out = work / f"{name}.json"
            p3bkit("bench", *refs, "--runs", args.runs, "--threads", args.threads, "--json", out, quiet=True)
            report = json.loads(out.read_text())
            if name == "one-run":  # the dense OpenVINO graph is the baseline bench exported itself
                dense = min(
                    r["stats"]["median_ms"]
                    for r in report["results"]
                    if r["backend"] == "openvino" and r["name"] == str(folders["dense"])
                )
                pruned = next(r["stats"]["median_ms"] for r in report["results"] if r["name"] == xml[args.label])
            else:
                dense, pruned = _medians(report, xml["dense"], xml[args.label])
            rows.append(
                {
                    "set": name,
                    "round": rnd,
                    "models": len(report["results"]),
                    "dense_ms": dense,
                    "pruned_ms": pruned,
                    "speedup": dense / pruned,
                }
            )
            print(
                f"round {rnd} {name:>12}: {len(report['results'])} models, dense {dense:.2f} ms, {args.label} {pruned:.2f} ms, "
                f"{dense / pruned:.2f}×",
                flush=True,
            )
        machine = report["machine"]

    setup = (
        f"{machine['cpu']}, {args.threads} threads, OpenVINO fp32, batch 1, fixed batch axis, median of "
        f"{args.runs} runs; allocation {args.model}_{args.label} (results/allocations), random weights"
    )
    command = (
        "python benchmarks/one_run_company.py --model "
        + args.model
        + " --label "
        + args.label
        + " --others "
        + " ".join(args.others)
        + f" --runs {args.runs} --rounds {args.rounds} --threads {args.threads}"
        + (" --sets " + " ".join(f"'{x}'" for x in args.sets) if args.sets else "")
        + (f" --name {args.name}" if args.name else "")
    )
    data = {
        "setup": setup,
        "command": command,
        "machine": machine,
        "args": vars(args),
        "node": platform.node(),
        "rows": rows,
    }
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1))
    write_report(stem, data)


def write_report(stem: Path, data: dict) -> None:
    """The markdown table of a run's JSON: per set its rounds, and how the ratio follows the host's pace."""
    rows = data["rows"]
    a = data["args"]
    lines = [
        f"# Company and latency: {a['model']} {a['label']} beside its dense model",
        "",
        data["setup"],
        "",
        f"Command: `{data['command']}`",
        "",
        "| set | models timed | dense OpenVINO ms (per round) | pruned ms | speedup |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        med = statistics.median(r["speedup"] for r in mine)
        lines.append(
            f"| {name} | {mine[0]['models']} | "
            + " / ".join(f"{r['dense_ms']:.2f}" for r in mine)
            + " | "
            + " / ".join(f"{r['pruned_ms']:.2f}" for r in mine)
            + " | "
            + " / ".join(f"{r['speedup']:.2f}" for r in mine)
            + f" (median **{med:.2f}×**) |"
        )
    if len(rows) >= 4:  # does the ratio follow the host's pace (the dense model's ms) more than the company?
        cut = statistics.median(r["dense_ms"] for r in rows)
        fast = [r for r in rows if r["dense_ms"] <= cut]
        slow = [r for r in rows if r["dense_ms"] > cut]
        corr = statistics.correlation([r["dense_ms"] for r in rows], [r["speedup"] for r in rows])
        lines += [
            "",
            f"Over all {len(rows)} timings: correlation of the dense model's ms with the speedup "
            f"{corr:+.2f}; the {len(fast)} with the faster host (dense ≤ {cut:.2f} ms) "
            f"{statistics.mean(r['speedup'] for r in fast):.2f}× on average, the {len(slow)} slower ones "
            f"{statistics.mean(r['speedup'] for r in slow):.2f}×.",
        ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
