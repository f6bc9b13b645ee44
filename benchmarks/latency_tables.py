"""Latency tables on this CPU: prediction error on unseen pruned models, and --target-speedup landing.

For each backend: measure the table of a timm ViT (p3bkit latency-table), time ≥ 20 random
head-dim/hidden-pruned versions of the model whole (exported like p3bkit export) and compare with
the table's prediction; then let P3B's latency allocation choose architectures for asked speedups
(importance from random ΔΨ: this checks the latency side, not accuracy), with and without speed
checks, export them, and time both beside the dense model in a process per asked speedup (each
model's speedup over dense measured round by round).

    python benchmarks/latency_tables.py --model deit_small_patch16_224 --backends openvino onnxruntime

Writes benchmarks/results/latency/<tag>_<backend>.json (the tables) and latency_tables_<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import RESULTS

from p3bkit.backends import machine_info
from p3bkit.bench.speedups import check_speedups
from p3bkit.latency.check import validate_table
from p3bkit.latency.measure import TableConfig, in_fresh_process, measure_latency_table
from p3bkit.latency.table import LatencyTable
from p3bkit.models.factory import create_model


def heads_axis(table) -> list[dict]:
    """Same q/k/v width, fewer heads: what the table says one attention branch costs."""
    d = table.dims
    out = []
    for width in (12, 24, 36, 48, 96, 192):
        row = {"qkv_width": width}
        for h in table.heads:
            if width % h == 0 and width // h <= d["head_dim"]:
                row[f"{h} heads"] = table.attn(h, width // h) * table.scale + table.per_branch_ms
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--tag", default="deit_s")
    ap.add_argument("--backends", nargs="+", default=["openvino", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--archs", type=int, default=20)
    ap.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0, 6.0])
    ap.add_argument("--heads", choices=["full", "all"], default="all")
    ap.add_argument(
        "--structure",
        choices=["inner", "heads"],
        default="heads",
        help="what --target-speedup prunes (heads: whole heads and branches too, with --remove-below)",
    )
    ap.add_argument("--remove-below", type=float, default=0.05)
    ap.add_argument(
        "--speed-checks",
        type=int,
        default=3,
        help="also allocate with this many speed checks (p3bkit prune's default) and time both (0: off)",
    )
    ap.add_argument("--head-dim-step", type=int, default=4)
    ap.add_argument("--hidden-step", type=int, default=32)
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="re-run the prediction-error check and the --target-speedup check with the stored tables "
        "(no new table: e.g. after the random check architectures gained fewer heads and removed "
        "branches)",
    )
    ap.add_argument(
        "--recheck-speedups",
        action="store_true",
        help="only re-run the --target-speedup check with the stored tables (the earlier run is kept "
        "in the JSON as speedups_earlier)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    (RESULTS / "latency").mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"latency_tables_{args.tag}"
    import sys

    report = {
        "machine": machine_info(args.threads),
        "model": args.model,
        "backends": {},
        "command": "python benchmarks/latency_tables.py " + " ".join(sys.argv[1:]),
        "num_heads": model.blocks[0].attn.num_heads,
    }
    if stem.with_suffix(".json").is_file():  # keep the other backends' results of an earlier run
        report["backends"] = json.loads(stem.with_suffix(".json").read_text())["backends"]
    for backend in args.backends:
        cfg = TableConfig(
            backend=backend,
            threads=args.threads,
            heads=args.heads,
            head_dim_step=args.head_dim_step,
            hidden_step=args.hidden_step,
        )
        speed_args = (args.structure, args.remove_below if args.structure == "heads" else 0.0, args.speed_checks)
        if args.recheck_speedups:
            entry = report["backends"][backend]
            table = LatencyTable.load(RESULTS / entry["table"])
            entry.setdefault("speedups_earlier", []).append(entry["speedups"])
            entry["speedups"] = in_fresh_process(check_speedups, model, table, cfg, args.speedups, *speed_args)
            for c in entry["speedups"]:
                print(f"  {backend} " + _line(c), flush=True)
            continue
        if args.recheck:
            table = LatencyTable.load(RESULTS / report["backends"][backend]["table"])
        else:  # each timing phase in a process of its own (in_fresh_process says why)
            table = measure_latency_table(model, args.model, cfg)
            table.save(RESULTS / "latency" / f"{args.tag}_{backend}.json")
        rows = in_fresh_process(validate_table, model, table, cfg, args.archs)
        err = np.abs([r["error"] for r in rows])
        print(
            f"{backend}: dense {table.dense_ms:.2f} ms (predicted {table.predict():.2f}); prediction error on "
            f"{len(rows)} unseen archs: median {100 * np.median(err):.1f}%, max {100 * err.max():.1f}%",
            flush=True,
        )
        checks = in_fresh_process(check_speedups, model, table, cfg, args.speedups, *speed_args)
        for c in checks:
            print("  " + _line(c), flush=True)
        report["backends"][backend] = {
            "table": f"latency/{args.tag}_{backend}.json",
            "validation": rows,
            "speedup_structure": {"structure": args.structure, "remove_below": speed_args[1]},
            "median_abs_error": float(np.median(err)),
            "max_abs_error": float(err.max()),
            "speedups": checks,
            "heads_axis": heads_axis(table) if len(table.heads) > 1 else [],
            "dense_ms": table.dense_ms,
            "fixed_ms": table.fixed_ms,
        }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(render(report))
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.md")


def _line(c: dict) -> str:
    out = f"asked {c['asked']:.1f}×: measured {c['measured_speedup']:.2f}× (miss {100 * c['miss']:+.1f}%)"
    if "with_checks" in c:
        w = c["with_checks"]
        out += f"; with {len(w['checks'])} speed checks {w['measured_speedup']:.2f}× (miss {100 * w['miss']:+.1f}%)"
    return out


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Latency tables: {report['model']}",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads; fp32, batch 1; versions {m['versions']}.",
        f"Command: `{report.get('command', 'python benchmarks/latency_tables.py')}` (see its docstring; "
        "`--recheck`: the stored tables, checked again). Protocol: one graph at a time, "
        "untimed warm-up, lowest median of 3 passes; onnxruntime threads do not spin.",
        "",
        "## Prediction error on unseen random pruned architectures (whole models, exported like p3bkit export)",
        "",
        "| backend | archs | with fewer heads | with removed branches | median abs error | max abs error | "
        "dense ms (measured) | branch-free ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for be, r in report["backends"].items():
        v = r["validation"]
        full_heads = report.get("num_heads")
        fewer = sum(any(0 < h < full_heads for h in a.get("heads", [])) for a in v) if full_heads else 0
        removed = sum(any(h == 0 for h in a["head_dims"] + a["hidden"]) for a in v)
        lines.append(
            f"| {be} | {len(v)} | {fewer} | {removed} | {100 * r['median_abs_error']:.1f}% | "
            f"{100 * r['max_abs_error']:.1f}% | {r['dense_ms']:.2f} | {r['fixed_ms']:.2f} |"
        )
    lines += [
        "",
        "## --target-speedup: P3B latency allocation (random ΔΨ) vs measured speedup over dense, same runtime",
        "",
        "Table only: the allocation against the table (`p3bkit prune --speed-checks 0`). With speed checks: "
        "the allocated architecture timed beside the dense model and the target corrected by measured over "
        "asked speedup, N times (`p3bkit prune`'s default, 3). Per asked speedup the dense, table-only and checked "
        "models are timed in one process of their own, each by its speedup over dense taken round by round "
        "(median of 9 rounds): what `p3bkit prune` reports as `latency.measured`.",
        "",
        "| backend | structure | asked | table only | miss | with speed checks | miss | pruned ms (table only / "
        "checked) | predicted ms (table only / checked) | dense ms beside them (table's) | branches removed | "
        "heads kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for be, r in report["backends"].items():
        st = r.get("speedup_structure", {"structure": "inner", "remove_below": 0.0})
        for c in r["speedups"]:
            w = c.get("with_checks")
            final = w or c
            removed = sum(h == 0 for h in final.get("head_dims", [])) + sum(h == 0 for h in final.get("hidden", []))
            heads = [h for h in final.get("heads", []) if h]
            checked = f"{w['measured_speedup']:.2f}× | {100 * w['miss']:+.1f}%" if w else "– | –"
            lines.append(
                f"| {be} | {st['structure']} (remove below {st['remove_below']:g}) | {c['asked']:.1f}× | "
                f"{c['measured_speedup']:.2f}× | {100 * c['miss']:+.1f}% | {checked} | {c['measured_ms']:.2f}"
                f"{' / %.2f' % w['measured_ms'] if w else ''} | {c['predicted_ms']:.2f}"
                f"{' / %.2f' % w['predicted_ms'] if w else ''} | {c['dense_ms']:.2f} ({r['dense_ms']:.2f})"
                f"{' busy' if c.get('host_busy') else ''} | {removed} | {sum(heads) / max(len(heads), 1):.1f} |"
            )
    for be, r in report["backends"].items():
        for earlier in r.get("speedups_earlier", []):
            lines += [
                "",
                f"Earlier run of the {be} check (replaced by `--recheck-speedups`; every model, dense included, "
                f"ran {earlier[0]['dense_ms'] / r['speedups'][0]['dense_ms'] - 1:+.0%} slower than in the "
                "rerun — a disturbed machine): "
                + ", ".join(f"{c['asked']:.1f}× → {c['measured_speedup']:.2f}×" for c in earlier)
                + ".",
            ]
    for be, r in report["backends"].items():
        if r["heads_axis"]:
            cols = sorted(
                {k for row in r["heads_axis"] for k in row if k != "qkv_width"}, key=lambda k: int(k.split()[0])
            )
            lines += [
                "",
                f"## Head-count axis ({be}): one attention branch, same q/k/v width, ms (table)",
                "",
                "| q/k/v width | " + " | ".join(cols) + " |",
                "|---" * (len(cols) + 1) + "|",
            ]
            for row in r["heads_axis"]:
                lines.append(
                    f"| {row['qkv_width']} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in cols) + " |"
                )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for be, r in report["backends"].items():
        meas = [v["measured_ms"] for v in r["validation"]]
        pred = [v["predicted_ms"] for v in r["validation"]]
        ax.scatter(meas, pred, label=f"{be} (median err {100 * r['median_abs_error']:.1f}%)", s=18)
    hi = max(max(v["measured_ms"] for v in r["validation"]) for r in report["backends"].values()) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set_xlabel("measured ms (whole pruned model)")
    ax.set_ylabel("predicted ms (latency table)")
    ax.set_title(f"{report['model']}: unseen random pruned architectures")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
