"""The `p3bkit` command line: parses, calls one library function per command, prints.

One error boundary: a `P3BError` becomes `error: ...` on stderr and exit code 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from p3bkit.cli_options import DEVICE, POSITIVE, RATE, augment_option, boundary, model_options, parse_model_kwargs
from p3bkit.exporters.registry import PRECISIONS, formats, runtimes
from p3bkit.prune.recipes import RECIPES

STRUCTURES = click.Choice(["full", "inner"])
IO_MODES = click.Choice(["auto", "index", "dense"])


@click.group()
@click.version_option(package_name="p3bkit")
def main() -> None:
    """Prune timm Vision Transformers with P3B, export them, benchmark them."""


@main.command()
@click.option("--model", default="digits-vit", show_default=True,
              help="Preset, timm model name or a dense model folder (from p3bkit train).")
@model_options
@click.option("--data", default="digits", show_default=True, help="digits, synthetic, ImageFolder or CIFAR-100 folder.")
@augment_option
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True),
              help="Keep ratio (0, 1] of all parameters (--budget total) or of block parameters.")
@click.option("--prune", "prune_rate", type=click.FloatRange(0, 1, max_open=True),
              help="Pruning rate [0, 1) (= 1 − keep), same scope as --keep.")
@click.option("--target-latency-ms", type=click.FloatRange(min=0, min_open=True),
              help="Latency budget instead of --keep: predicted ms on the --latency-table's runtime.")
@click.option("--target-speedup", type=click.FloatRange(min=1, min_open=True),
              help="Latency budget instead of --keep: speedup over the table's measured dense model.")
@click.option("--latency-table", type=click.Path(exists=True, dir_okay=False),
              help="Table from p3bkit latency-table (same machine, model and runtime).")
@click.option("--budget", type=click.Choice(["total", "blocks"]), default="total", show_default=True,
              help="total: fraction of all parameters (the paper's); blocks: of Attention/MLP Linear parameters only.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="quick", show_default=True,
              help="paper: Table 5 (3/22/25 epochs, update every 1000 it, lr 5e-4, batch 512); quick: 1/4/4 epochs, "
                   "update every 10 it, base lr 4e-3, batch 64 (small data). Flags below override it.")
@click.option("--epochs", nargs=3, type=click.IntRange(min=0), help="Warm-up, sparsify, sharpen epochs [recipe].")
@click.option("--update-every", type=POSITIVE, help="Iterations between mask updates [recipe].")
@click.option("--batch-size", type=POSITIVE, help="Global batch size [recipe].")
@click.option("--alpha", type=RATE, default=0.5, show_default=True, help="Class vs patch importance balance.")
@click.option("--tau", type=click.FloatRange(min=0), help="Soft-mask sharpness during sparsify [recipe].")
@click.option("--m-ref", type=click.FloatRange(0.5, 1, min_open=True, max_open=True), default=0.9, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Base model lr at batch 512, scaled by batch/512, constant [recipe].")
@click.option("--lr-bpi", type=click.FloatRange(min=0, min_open=True), help="Base BPI lr at batch 512, scaled by batch/512 [recipe].")
@click.option("--allocation", type=click.Choice(["p3b", "uniform", "global-magnitude"]), default="p3b", show_default=True,
              help="p3b: BPI block budgets; uniform: equal κ; global-magnitude: one weight-magnitude threshold.")
@click.option("--structure", type=STRUCTURES, default="inner", show_default=True,
              help="full: the paper's six gates per layer (P3B); inner: head dims + MLP hidden only (P3B-inner).")
@click.option("--bpi-class-head", type=click.Choice(["linear", "norm-linear"]), default="linear", show_default=True,
              help="linear: the paper's class head; norm-linear: LayerNorm + Linear.")
@click.option("--empty-blocks", type=click.Choice(["disable", "regrow"]), default="disable", show_default=True,
              help="A block emptied at a mask update stays empty (disable) or may be given parameters again.")
@click.option("--round-to", type=POSITIVE, default=1, show_default=True, help="Round kept widths up to a multiple.")
@click.option("--io-mode", type=IO_MODES, default="auto", show_default=True)
@click.option("--frozen/--no-frozen", default=False, show_default=True, help="Frozen ablation (model lr 1e-8).")
@click.option("--distill-teacher", help="Teacher model for the DeiT hard-distillation loss.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False))
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--bf16/--no-bf16", default=False, show_default=True, help="bf16 autocast.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume/--no-resume", default=False, show_default=True,
              help="Continue from OUT/checkpoint.pt (the settings must match the interrupted run's).")
@click.option("--force", is_flag=True, help="Write into a non-empty OUT (replaces an earlier run's files, keeps others).")
@click.option("--keep-checkpoint", is_flag=True, help="Keep OUT/checkpoint.pt after a successful run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars and per-epoch lines.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run folder (new or empty).")
@boundary
def prune(**kw) -> None:
    """Prune a ViT with P3B and write OUT/pruned (arch.json + model.safetensors)."""
    from p3bkit.prune.engine import P3BConfig
    from p3bkit.prune.recipes import resolve_recipe
    from p3bkit.workflows import PruneJob, run_prune

    budgets = [k for k in ("keep", "prune_rate", "target_latency_ms", "target_speedup") if kw[k] is not None]
    if len(budgets) != 1:
        raise click.UsageError("give exactly one of --keep, --prune, --target-latency-ms or --target-speedup")
    keep = kw["keep"] if kw["keep"] is not None else 1 - (kw["prune_rate"] or 0.0)
    r = resolve_recipe(kw["recipe"], epochs=kw["epochs"], update_every=kw["update_every"],
                       batch_size=kw["batch_size"], lr=kw["lr"], lr_bpi=kw["lr_bpi"], tau=kw["tau"])
    if r["batch_size"] < 1:
        raise click.UsageError("--batch-size must be ≥ 1")
    cfg = P3BConfig(keep=keep, budget=kw["budget"], update_every=r["update_every"], alpha=kw["alpha"], tau=r["tau"],
                    m_ref=kw["m_ref"], lr_model=r["lr"], lr_bpi=r["lr_bpi"], frozen=kw["frozen"],
                    allocation=kw["allocation"], empty_blocks=kw["empty_blocks"], bpi_class_head=kw["bpi_class_head"],
                    target_ms=kw["target_latency_ms"])
    job = PruneJob(out=kw["out"], recipe=kw["recipe"], model=kw["model"], model_kwargs=parse_model_kwargs(kw),
                   pretrained=kw["pretrained"], pretrained_file=kw["pretrained_file"],
                   checkpoint=kw["checkpoint"], data=kw["data"],
                   augment="deit" if kw["recipe"] == "paper" and kw["augment"] == "auto" else kw["augment"], epochs=r["epochs"], batch_size=r["batch_size"],
                   structure=kw["structure"], round_to=kw["round_to"], io_mode=kw["io_mode"], seed=kw["seed"],
                   device=kw["device"], bf16=kw["bf16"], distill_teacher=kw["distill_teacher"],
                   teacher_checkpoint=kw["teacher_checkpoint"], keep_checkpoint=kw["keep_checkpoint"],
                   progress=kw["progress"], latency_table=kw["latency_table"], target_speedup=kw["target_speedup"],
                   p3b=cfg)
    click.echo(f"recipe {kw['recipe']}: epochs {'/'.join(map(str, r['epochs']))}, mask update every "
               f"{r['update_every']} it, batch {r['batch_size']}, model lr {r['lr'] * r['batch_size'] / 512:.2e}, "
               + (f"budget {kw['budget']} keep {keep:.3f}" if budgets[0] in ("keep", "prune_rate") else
                  f"latency budget from {kw['latency_table']}"))
    s = run_prune(job, resume=kw["resume"], force=kw["force"])
    click.echo(f"pruned model: {Path(kw['out']) / 'pruned'}")
    click.echo(f"kept {100 * s['total_keep']:.1f}% of all parameters ({s['params_kept']:,} of {s['params_dense']:,}) "
               f"and {100 * s['block_keep_nominal']:.1f}% of block parameters; val top-1 {s['val_acc_pruned']:.2f}%, "
               f"surgery max abs diff {s['surgery_max_abs_diff']:.2e}")
    if "latency" in s:
        lat = s["latency"]
        click.echo(f"predicted {lat['predicted_ms']:.3f} ms on {lat['backend']} (target {lat['target_ms']:.3f} ms; "
                   f"{lat['predicted_speedup']:.2f}× over the measured dense {lat['dense_ms_measured']:.3f} ms)")
    if s["params_stored"] != s["params_kept"]:
        click.echo(f"the saved model stores {s['params_stored']:,} parameters ({100 * s['total_keep_stored']:.1f}%): "
                   "widths rounded up (--round-to) or channel selections folded into full-width weights (--io-mode)")


@main.command()
@click.argument("pruned", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default="digits", show_default=True)
@augment_option
@click.option("--epochs", type=POSITIVE, default=10, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="Base lr, scaled by batch/512 (DeiT).")
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write into a non-empty OUT (keeps files it did not write).")
@click.option("--resume/--no-resume", default=False, show_default=True,
              help="Continue from OUT/checkpoint.pt (same settings as the interrupted run).")
@click.option("--keep-checkpoint", is_flag=True, help="Keep OUT/checkpoint.pt after a successful run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty).")
@boundary
def finetune(pruned, data, augment, epochs, batch_size, lr, drop_path, device, seed, force, resume, keep_checkpoint,
             progress, out) -> None:
    """Fine-tune a pruned model (DeiT recipe: AdamW, cosine, label smoothing, Mixup/CutMix, drop path)."""
    from p3bkit.finetune import run_finetune

    s = run_finetune(pruned, out, data=data, epochs=epochs, batch_size=batch_size, lr=lr, drop_path=drop_path,
                     device=device, seed=seed, force=force, resume=resume, keep_checkpoint=keep_checkpoint,
                     progress=progress, augment=augment)
    click.echo(f"fine-tuned model: {out} (val top-1 {s['val_acc']:.2f}%)")


@main.command()
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True,
              help="Keep ratio of all parameters, (0, 1).")
@click.option("-o", "--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write into a non-empty OUT that is not an earlier demo's.")
@click.option("--resume/--no-resume", default=False, show_default=True, help="Continue an interrupted demo in OUT.")
@click.option("--target-speedup", type=click.FloatRange(min=1, min_open=True),
              help="Prune to a latency budget (this speedup on the fastest CPU runtime here) instead of --keep.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@boundary
def demo(keep, out, seed, force, resume, target_speedup, progress) -> None:
    """Train a tiny ViT on digits, prune it with P3B, fine-tune, export, compare speed (a few minutes on CPU)."""
    from p3bkit.demo import format_table, run_demo

    click.echo(format_table(run_demo(out, keep=keep, seed=seed, force=force, resume=resume, progress=progress,
                                     target_speedup=target_speedup)))
    click.echo(f"everything is under {out}")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@boundary
def info(model, as_json) -> None:
    """Parameters, FLOPs and per-block widths of a timm model, preset or pruned folder."""
    from p3bkit.models.arch import ARCH_FILE, create_stock_model, read_arch
    from p3bkit.models.factory import create_model
    from p3bkit.models.report import describe, pruning_rates

    net = create_model(model)
    d = describe(net)
    if (Path(model) / ARCH_FILE).is_file():  # a pruned folder: rates against its dense source
        d["rates"] = pruning_rates(net, create_stock_model(read_arch(model).source))
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(f"{model}: {d['params']:,} parameters, {d['flops'] / 1e9:.3f} GFLOPs (multiply-adds, per image)")
    if "rates" in d:
        r = d["rates"]
        click.echo(f"pruned {100 * r['prune_rate_total']:.1f}% of all parameters ({r['dense_params']:,} → "
                   f"{r['params']:,}) and {100 * r['prune_rate_blocks']:.1f}% of block parameters "
                   f"({r['dense_block_params']:,} → {r['block_params']:,})")
    click.echo(f"{'block':>9} {'c_in':>6} {'inner':>6} {'c_out':>6} {'params':>10}")
    for r in d["blocks"]:
        click.echo(f"{r['block']:>9} {r['c_in']:>6} {r['inner']:>6} {r['c_out']:>6} {r['params']:>10,}")


@main.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(formats()), required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--precision", help=f"{'|'.join(PRECISIONS)} (a runtime's own name such as f32 works too); "
                                  "what each format takes: p3bkit doctor.")
@click.option("--fp16", is_flag=True, help="Shorthand for --precision fp16.")
@click.option("--bf16", is_flag=True, help="Shorthand for --precision bf16.")
@click.option("--calib-data", help="INT8: calibration images (digits, ImageFolder or CIFAR-100 folder; train split).")
@click.option("--calib-size", type=POSITIVE, default=300, show_default=True, help="INT8: calibration images used.")
@click.option("--val-data", help="INT8 gate: validation split to measure top-1 on [default: --calib-data's].")
@click.option("--val-size", type=POSITIVE, default=2000, show_default=True,
              help="INT8 gate: validation images used (a seeded random subset of a larger split).")
@click.option("--max-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="INT8 gate: largest top-1 drop (points) vs fp32 through the runtime; above it (after the "
                   "runtime's remedies) the export fails and writes nothing.")
@click.option("--static-batch", type=POSITIVE, help="Fixed batch size instead of a dynamic batch axis.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Parity check against PyTorch.")
@click.option("--write-op", type=click.Choice(["scatter", "gather"]), help="Residual write op (default per format).")
@click.option("--min-batch", type=POSITIVE, default=1, show_default=True, help="TensorRT profile.")
@click.option("--opt-batch", type=POSITIVE, default=1024, show_default=True, help="TensorRT profile.")
@click.option("--max-batch", type=POSITIVE, default=1024, show_default=True, help="TensorRT profile.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read + updated).")
@click.option("--eval-data", help="Also measure top-1 of the artefact on this data's validation split (stored in the record).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@boundary
def export(model, fmt, out, precision, fp16, bf16, calib_data, calib_size, val_data, val_size, max_drop, static_batch,
           verify, write_op, min_batch, opt_batch, max_batch, timing_cache, eval_data, progress) -> None:
    """Export MODEL (pruned folder, timm name or preset) and verify it against PyTorch."""
    from p3bkit.exporters import export_model
    from p3bkit.exporters.quantize import Int8Config

    if fp16 and bf16:
        raise click.UsageError("--fp16 and --bf16 are exclusive")
    if fp16 or bf16:
        if precision:
            raise click.UsageError("give --precision or --fp16/--bf16, not both")
        precision = "fp16" if fp16 else "bf16"
    if (val_data or calib_data) and precision not in ("int8", "i8"):
        raise click.UsageError("--calib-data/--val-data are for --precision int8")
    int8 = Int8Config(calib_data, calib_size, val_data, max_drop, val_size) if calib_data else None
    rec = export_model(model, fmt, out, precision=precision, static_batch=static_batch, verify=verify,
                       write_op=write_op, trt_profile=(min_batch, opt_batch, max_batch), timing_cache=timing_cache,
                       int8=int8)
    worst = max((s["max_abs_diff"] for b in rec.parity.values() for s in b.values()), default=None)
    parity = f"max abs diff vs torch {worst:.2e}" if verify and worst is not None else "not verified against torch"
    if verify and rec.precision != "fp32":
        stats = [s for b in rec.parity.values() for s in b.values()]
        parity = (f"vs torch on {rec.parity_inputs}: top-1 agreement {min(s['top1_agreement'] for s in stats):.3f}, "
                  f"cosine mean {min(s.get('cosine_mean', 1.0) for s in stats):.4f} / worst "
                  f"{min(s['cosine_min'] for s in stats):.4f}")
    click.echo(f"wrote {', '.join(str(Path(out) / f) for f in rec.files)} ({rec.precision}, {rec.seconds:.1f} s); {parity}")
    gate = rec.extra.get("int8")
    if gate and gate["val_classes"] != gate["model_classes"]:
        click.echo(f"warning: {gate['val_data']} has {gate['val_classes']} classes and the model "
                   f"{gate['model_classes']}: the accuracy gate compares near-chance top-1s", err=True)
    if gate:
        kept = f"; kept in fp32: {len(gate['kept_in_fp32'])} layer(s)" if gate["kept_in_fp32"] else ""
        click.echo(f"INT8 gate: top-1 {gate['int8_top1']:.2f}% vs fp32 {gate['fp32_top1']:.2f}% (drop "
                   f"{gate['drop']:.2f} ≤ {gate['max_drop']:g}) on {gate['val_images']} images; calibrated on "
                   f"{gate['calib_size']} images of {gate['calib_data']}{kept}")
    if eval_data:
        from p3bkit.evaluate import record_accuracy

        acc = record_accuracy(Path(out) / rec.files[0], eval_data, progress=progress)
        click.echo(f"top-1 {acc['top1']:.2f}% on {acc['images']} validation images of {eval_data} (in the record)")


@main.command()
@boundary
def doctor() -> None:
    """Which backends are installed and usable here, with versions."""
    from p3bkit.bench.doctor import check_backends

    for row in check_backends():
        mark = "ok " if row["usable"] else "no "
        click.echo(f"{mark} {row['backend']:<12} {row['version']:<14} --format {row['format']:<9} "
                   f"precisions {','.join(row['precisions']):<19} {row['note']}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--backend", type=click.Choice(runtimes()), help="Default: from the artefact suffix, else torch.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="cpu: batch 1; cuda (or gpu): batch 1024 (the paper's protocol).")
@click.option("--batch", type=POSITIVE, help="Override the preset batch size.")
@click.option("--precision", help=f"{'|'.join(PRECISIONS)}. Default: an artefact's own, fp32 for a model (which "
                                  "onnxruntime/OpenVINO export on the fly at this precision). Refused where a "
                                  "runner would ignore it.")
@click.option("--runs", type=POSITIVE, default=1000, show_default=True)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--threads", type=POSITIVE, help="Threads to pin (recorded in the JSON).")
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile (torch backend).")
@click.option("--profile", is_flag=True, help="Time per op type (ORT profiler, OpenVINO counters, torch profiler).")
@click.option("--dense-baselines", is_flag=True,
              help="Also time the first model on every CPU runtime here (torch, onnxruntime plain and transformer-"
                   "optimised, OpenVINO) and show each model's speedup against the fastest.")
@click.option("--latency-table", type=click.Path(exists=True, dir_okay=False),
              help="Add this latency table's predicted ms (models on its runtime).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write raw latencies + machine info.")
@boundary
def bench(models, backend, device, batch, precision, runs, duration, warmup, threads, compile, profile,
          dense_baselines, latency_table, json_out) -> None:
    """Benchmark MODELS interleaved; speedups are relative to the first (the dense baseline)."""
    from p3bkit.bench import BenchConfig, run_bench

    device = "cpu" if device == "cpu" else "gpu"
    cfg = BenchConfig(runs=runs, duration=duration, warmup=warmup, threads=threads)
    report = run_bench(list(models), backend, device, batch, precision, cfg, profile, json_out, compile,
                       dense_baselines, latency_table)
    m = report["machine"]
    click.echo(f"{m['cpu']} ({m['threads']} threads){', ' + m['gpu'] if device == 'gpu' else ''}")
    click.echo(report["table"])
    for w in report["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if report.get("profile"):
        click.echo("per-op times: ms per run, summed over every node of that op type (self time; runtimes run nodes "
                   "in parallel threads and profiling adds overhead, so they can add up to more than the median)")
    for name, ops in report.get("profile", {}).items():
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
        click.echo(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in top))




@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--data", default="digits", show_default=True, help="For plain models: data to train the BPI on.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="For a plain model: local weights.")
@click.option("--steps", type=POSITIVE, default=200, show_default=True, help="BPI training steps for plain models.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@boundary
def analyze(inputs, out, data, checkpoint, steps, device) -> None:
    """Block Performance plots for prune runs (their logs) or plain models (BPI trained on the frozen model)."""
    from p3bkit.analyze import measure_model, read_run, write_report

    runs = [read_run(i) if (Path(i) / "log.jsonl").is_file() else
            measure_model(i, data=data, steps=steps, checkpoint=checkpoint, device=device) for i in inputs]
    click.echo(f"wrote {write_report(runs, out)}")


def _register_user_commands() -> None:
    from p3bkit.cli_latency import latency_table
    from p3bkit.cli_user import eval_, train

    main.add_command(latency_table)
    main.add_command(train)
    main.add_command(eval_)


_register_user_commands()

if __name__ == "__main__":
    main()
