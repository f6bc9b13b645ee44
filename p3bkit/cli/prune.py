"""`p3bkit prune` and `p3bkit analyze`: P3B on your model, and its Block Performance plots."""

from __future__ import annotations

from pathlib import Path

import click

from p3bkit.cli.options import (
    DEVICE,
    POSITIVE,
    RATE,
    augment_option,
    boundary,
    data_option,
    distill_options,
    model_options,
    parse_model_kwargs,
    workers_option,
)
from p3bkit.prune.config import (
    AllocationName,
    BudgetScope,
    ClassHead,
    EmptyBlocks,
    IoModeName,
    P3BConfig,
    PruneJob,
    StructureName,
    choices,
)
from p3bkit.prune.recipes import RECIPES

# every default and choice below is read from the settings model (prune.config); None = the recipe's
JOB, P3B = PruneJob, P3BConfig


@click.command()
@click.option(
    "--model",
    default=JOB.model,
    show_default=True,
    help="Preset, timm model name or a dense model folder (from p3bkit train).",
)
@model_options
@data_option
@augment_option
@click.option(
    "--keep",
    type=click.FloatRange(0, 1, min_open=True),
    help="Keep ratio (0, 1] of all parameters (--budget total) or of block parameters.",
)
@click.option(
    "--prune",
    "prune_rate",
    type=click.FloatRange(0, 1, max_open=True),
    help="Pruning rate [0, 1) (= 1 − keep), same scope as --keep.",
)
@click.option(
    "--target-latency-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="Latency budget: predicted ms on the --latency-table's runtime (with --keep/--prune: both are "
    "ceilings, the latency allocation keeps within the parameter budget too).",
)
@click.option(
    "--target-speedup",
    type=click.FloatRange(min=1, min_open=True),
    help="Latency budget: speedup over the table's measured dense model (with --keep/--prune as above).",
)
@click.option(
    "--latency-table",
    type=click.Path(exists=True, dir_okay=False),
    help="Table from p3bkit latency-table (same machine, model and runtime).",
)
@click.option(
    "--accept-table-error",
    is_flag=True,
    help="Use a latency table whose own check found a median prediction error above 15%.",
)
@click.option(
    "--speed-checks",
    type=click.IntRange(min=0),
    default=JOB.speed_checks,
    show_default=True,
    help="With a latency target: times the architecture the run is heading for against the dense model on "
    "the table's runtime this many times during sparsify (at 1/2, 3/4, 7/8 of it) and corrects the "
    "target by what it measured; the result is timed too. 0: trust the table.",
)
@click.option(
    "--budget",
    type=click.Choice(choices(BudgetScope)),
    default=P3B.budget,
    show_default=True,
    help="total: fraction of all parameters (the paper's); blocks: of Attention/MLP Linear parameters only.",
)
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=JOB.recipe,
    show_default=True,
    help="; ".join(
        f"{n}: {'/'.join(map(str, r.epochs))} epochs, update every {r.update_every} it, base lr "
        f"{r.lr:g}, batch {r.batch_size}"
        for n, r in RECIPES.items()
    )
    + " (paper: Table 5; quick: small data). Flags below override it.",
)
@click.option("--epochs", nargs=3, type=click.IntRange(min=0), help="Warm-up, sparsify, sharpen epochs [recipe].")
@click.option("--update-every", type=POSITIVE, help="Iterations between mask updates [recipe].")
@click.option("--batch-size", type=POSITIVE, help="Global batch size [recipe].")
@click.option("--alpha", type=RATE, default=P3B.alpha, show_default=True, help="Class vs patch importance balance.")
@click.option("--tau", type=click.FloatRange(min=0), help="Soft-mask sharpness during sparsify [recipe].")
@click.option(
    "--m-ref", type=click.FloatRange(0.5, 1, min_open=True, max_open=True), default=P3B.m_ref, show_default=True
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Base model lr at batch 512, scaled by batch/512, constant [recipe].",
)
@click.option(
    "--lr-bpi",
    type=click.FloatRange(min=0, min_open=True),
    help="Base BPI lr at batch 512, scaled by batch/512 [recipe].",
)
@click.option(
    "--allocation",
    type=click.Choice(choices(AllocationName)),
    default=P3B.allocation,
    show_default=True,
    help="p3b: BPI block budgets; uniform: equal κ; global-magnitude: one weight-magnitude threshold.",
)
@click.option(
    "--structure",
    type=click.Choice(choices(StructureName)),
    default=JOB.structure,
    show_default=True,
    help="full: the paper's six gates per layer (P3B); inner: head dims + MLP hidden only (P3B-inner); "
    "heads: whole heads + head dims + MLP hidden.",
)
@click.option(
    "--remove-below",
    type=click.FloatRange(0, 1, max_open=True),
    default=P3B.remove_below,
    show_default=True,
    help="Remove a whole branch when P3B's share for it (γ per full cost) falls below this fraction of its "
    "cost for --removal-patience mask updates; 0: never remove.",
)
@click.option(
    "--removal-patience",
    type=POSITIVE,
    default=P3B.removal_patience,
    show_default=True,
    help="Consecutive mask updates a branch must be below --remove-below before it is removed.",
)
@click.option(
    "--bpi-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=P3B.bpi_fraction,
    show_default=True,
    help="Share of each batch the block performance indicators see (1: all, the "
    "paper's; they cost several times the model's own forward).",
)
@click.option(
    "--bpi-class-head",
    type=click.Choice(choices(ClassHead)),
    default=P3B.bpi_class_head,
    show_default=True,
    help="linear: the paper's class head; norm-linear: LayerNorm + Linear.",
)
@click.option(
    "--empty-blocks",
    type=click.Choice(choices(EmptyBlocks)),
    default=P3B.empty_blocks,
    show_default=True,
    help="A block emptied at a mask update stays empty (disable) or may be given parameters again.",
)
@click.option(
    "--round-to", type=POSITIVE, default=JOB.round_to, show_default=True, help="Round kept widths up to a multiple."
)
@click.option("--io-mode", type=click.Choice(choices(IoModeName)), default=JOB.io_mode, show_default=True)
@click.option("--frozen/--no-frozen", default=P3B.frozen, show_default=True, help="Frozen ablation (model lr 1e-8).")
@click.option(
    "--distill-teacher",
    help="Teacher model for the DeiT hard-distillation loss of a distillation token "
    "(not --teacher's logit distillation).",
)
@click.option(
    "--teacher-weights",
    "--teacher-checkpoint",
    "teacher_weights",
    type=click.Path(dir_okay=False),
    help="Local weights of the --distill-teacher (strict).",
)
@distill_options("prune", JOB.teacher)
@click.option("--device", type=DEVICE, default=JOB.device, show_default=True)
@click.option("--bf16/--no-bf16", default=JOB.bf16, show_default=True, help="bf16 autocast.")
@click.option("--seed", type=int, default=JOB.seed, show_default=True)
@workers_option
@click.option(
    "--resume/--no-resume",
    default=False,
    show_default=True,
    help="Continue from OUT/checkpoint.pt (the settings must match the interrupted run's).",
)
@click.option(
    "--force", is_flag=True, help="Write into a non-empty OUT (replaces an earlier run's files, keeps others)."
)
@click.option("--keep-checkpoint", is_flag=True, help="Keep OUT/checkpoint.pt after a successful run.")
@click.option(
    "--progress/--no-progress",
    default=JOB.progress,
    show_default=True,
    help="Progress bars (the per-epoch lines are printed either way).",
)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run folder (new or empty).")
@boundary
def prune(**kw) -> None:
    """Prune a ViT with P3B and write OUT/pruned (arch.json + model.safetensors)."""
    from p3bkit.prune.job import run_prune
    from p3bkit.prune.recipes import resolve_recipe

    sizes = [k for k in ("keep", "prune_rate") if kw[k] is not None]
    latencies = [k for k in ("target_latency_ms", "target_speedup") if kw[k] is not None]
    if len(sizes) > 1 or len(latencies) > 1 or not sizes + latencies:
        raise click.UsageError(
            "give a parameter budget (--keep or --prune), a latency target (--target-latency-ms "
            "or --target-speedup), or one of each"
        )
    keep = kw["keep"] if kw["keep"] is not None else 1 - (kw["prune_rate"] or 0.0)
    from p3bkit.models.factory import loads_weights

    scratch = not loads_weights(kw["model"], kw["pretrained"], kw["pretrained_file"], kw["weights"])
    r = resolve_recipe(
        kw["recipe"],
        scratch=scratch,
        epochs=kw["epochs"],
        update_every=kw["update_every"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        lr_bpi=kw["lr_bpi"],
        tau=kw["tau"],
    )
    if r["batch_size"] < 1:
        raise click.UsageError("--batch-size must be ≥ 1")
    cfg = P3BConfig(
        keep=keep,
        update_every=r["update_every"],
        tau=r["tau"],
        lr_model=r["lr"],
        lr_bpi=r["lr_bpi"],
        target_ms=kw["target_latency_ms"],
        keep_too=bool(sizes and latencies),
        **{f: kw[f] for f in option_fields(P3BConfig)},
    )
    job = PruneJob(
        model_kwargs=parse_model_kwargs(kw),
        epochs=r["epochs"],
        batch_size=r["batch_size"],
        augment="deit" if kw["recipe"] == "paper" and kw["augment"] == "auto" else kw["augment"],
        p3b=cfg,
        **{f: kw[f] for f in option_fields(PruneJob) if f != "augment"},
    )
    from_scratch = (
        " (no weights loaded: from scratch)" if scratch and kw["lr"] is None and kw["recipe"] == "quick" else ""
    )
    plan = (
        f"recipe {kw['recipe']}: epochs {'/'.join(map(str, r['epochs']))}, mask update every "
        f"{r['update_every']} it, batch {r['batch_size']}, model lr {r['lr'] * r['batch_size'] / 512:.2e}"
        f"{from_scratch}, "
        + " and ".join(
            ([f"budget {kw['budget']} keep {keep:.3f}"] if sizes else [])
            + ([f"latency budget from {kw['latency_table']}"] if latencies else [])
        )
    )
    s = run_prune(job, resume=kw["resume"], force=kw["force"], plan=plan)
    click.echo(f"pruned model: {Path(kw['out']) / 'pruned'}")
    click.echo(
        f"kept {100 * s['total_keep']:.1f}% of all parameters ({s['params_kept']:,} of {s['params_dense']:,}) "
        f"and {100 * s['block_keep_nominal']:.1f}% of block parameters; val top-1 {s['val_acc_pruned']:.2f}%, "
        f"surgery max abs diff {s['surgery_max_abs_diff']:.2e}"
    )
    if "latency" in s:
        lat = s["latency"]
        click.echo(
            f"predicted {lat['predicted_ms']:.3f} ms on {lat['backend']} (target {lat['target_ms']:.3f} ms; "
            f"{lat['predicted_speedup']:.2f}× over the measured dense {lat['dense_ms_measured']:.3f} ms; "
            + (
                "table error unknown: made without --check)"
                if lat.get("table_check_error") is None
                else f"the table's checked median error {100 * lat['table_check_error']:.1f}%)"
            )
        )
        if "error" in lat.get("measured", {}):
            click.echo(f"the pruned model was not timed beside the dense one: {lat['measured']['error']}")
        elif "measured" in lat:
            m = lat["measured"]
            click.echo(
                f"measured {m['measured_speedup']:.2f}× over the dense model timed beside it on {lat['backend']} "
                f"({m['pruned_ms']:.3f} vs {m['dense_ms']:.3f} ms; {lat['target_speedup']:.2f}× asked, "
                f"{len(lat['speed_checks'])} speed check(s) during sparsify)"
                + (
                    "; the host was busy (the dense model > 10% slower than its steadiest time)"
                    if m.get("host_busy")
                    else ""
                )
            )
        if "fastest_at_parameter_budget_ms" in lat:
            bound = {
                "parameters": "the parameter budget bound the last allocation; ",
                "latency": "the latency target bound the last allocation; ",
            }.get(lat.get("bound"), "")
            click.echo(
                f"{bound}at this parameter budget no architecture is predicted faster than "
                f"{lat['fastest_at_parameter_budget_ms']:.3f} ms "
                f"({lat['fastest_at_parameter_budget_speedup']:.2f}×)"
            )
    click.echo(stored_note(s["params_stored"], s["params_kept"], s["total_keep_stored"]) or "", nl=False)


# settings that are not an option of the same name: set from other options, or not a user's to set
_FROM_BUDGET_AND_RECIPE = {"keep", "update_every", "tau", "lr_model", "lr_bpi", "target_ms", "keep_too", "model_kwargs"}
_FROM_BUDGET_AND_RECIPE |= {"epochs", "batch_size", "p3b"}
_ABLATIONS = {"gate_factors", "keep_ratios", "head_weight", "head_score_floor"}  # P3BConfig in Python
_PAPER_CONSTANTS = {"smoothing", "ema_momentum", "weight_decay"}  # Table 5
_HOOKS = {"stop_after_epoch", "train_images"}  # a testing hook; benchmarks' quick allocation search
DERIVED = _FROM_BUDGET_AND_RECIPE | _ABLATIONS | _PAPER_CONSTANTS | _HOOKS


def option_fields(settings) -> list[str]:
    """The fields of a settings dataclass that an option of `p3bkit prune` sets under the same name."""
    import dataclasses

    return [f.name for f in dataclasses.fields(settings) if f.name not in DERIVED]


def stored_note(stored: int, kept: int, ratio: float) -> str | None:
    """Why the saved model stores more or fewer parameters than the budget kept (None: the same)."""
    if stored == kept:
        return None
    head = f"the saved model stores {stored:,} parameters ({100 * ratio:.1f}%), {abs(stored - kept):,} "
    if stored > kept:
        return (
            head + "more than kept: widths rounded up (--round-to) or channel selections folded into "
            "full-width weights (--io-mode)\n"
        )
    return (
        head + "fewer than kept: a branch emptied on one axis is written as an identity residual, and the "
        "parameters its other axes still counted (biases, its norm) go with it\n"
    )


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@data_option
@click.option(
    "--weights",
    "--checkpoint",
    "weights",
    type=click.Path(dir_okay=False),
    help="For a plain model: its local weights file.",
)
@click.option("--steps", type=POSITIVE, default=200, show_default=True, help="BPI training steps for plain models.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option(
    "--force", is_flag=True, help="Write into a non-empty OUT (replaces the report's own files, keeps others)."
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@boundary
def analyze(inputs, out, data, weights, steps, device, force, progress) -> None:
    """Block Performance plots for prune runs (their logs) or plain models (BPI trained on the frozen model)."""
    from p3bkit.fileio import check_output_folder
    from p3bkit.prune.analyze import REPORT_FILES, measure_model, read_run, write_report

    check_output_folder(out, "analyze", tuple(i for i in inputs if Path(i).exists()), force=force, allowed=REPORT_FILES)

    runs = [
        read_run(i)
        if (Path(i) / "log.jsonl").is_file()
        else measure_model(i, data=data, steps=steps, weights=weights, device=device, progress=progress)
        for i in inputs
    ]
    click.echo(f"wrote {write_report(runs, out)}")
