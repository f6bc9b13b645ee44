"""What `p3bkit bench` times: any model reference on any registered backend, ready to time.

A reference is a pruned or dense model folder, a timm name or preset, an exported artefact
(`.onnx`, `.xml`, `.plan`) or an export folder holding one. A model given to a backend that runs
artefacts is exported on the fly (and verified) into a working folder, for the batch it is timed
at: a fixed batch axis, the graph a deployment at that batch runs (a dynamic axis made pruned
DeiT-S 5–12% slower at batch 1 on OpenVINO, `benchmarks/static_batch.py`). The backend's `timer`
does the rest. The precision is an artefact's own unless another one its runtime honours is asked
for; anything a runner would ignore or silently change is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from p3bkit.backends import (
    FP32,
    INT8,
    Backend,
    Timed,
    artefact_suffixes,
    backend_for_artefact,
    cpu_backends,
    eager_backend,
    get_backend,
)
from p3bkit.errors import BackendUnavailable, P3BError
from p3bkit.export.records import artefact_in_folder, artefact_precision, exported_from, read_record


def run_precision(backend: Backend, ref: str, is_artefact: bool, asked: str | None) -> str:
    """What a runner will run at: an artefact's own precision (or one its runtime can honour for
    it); a model is exported on the fly at the asked precision."""
    if is_artefact:
        return backend.run_precision(artefact_precision(ref), asked)
    try:
        run = backend.precision(asked)
    except P3BError:
        raise P3BError(
            f"the {backend.name} runner cannot run --precision {asked} (it takes {', '.join(backend.precisions)})"
        ) from None
    if run == INT8:
        raise P3BError(
            f"INT8 needs calibration images: p3bkit export {ref} --format {backend.format or 'onnx'} "
            "--precision int8 --calib-data DATA, then bench that artefact"
        )
    return backend.run_precision(run)  # the runtime's own refusals (OpenVINO: bf16 on a CPU without bf16 units)


def _exported(ref: str, be: Backend, workdir: Path, precision: str, batch: int) -> str:
    from p3bkit.export import export_model

    fmt, artefact = be.exported_as()
    out = workdir / f"{len(list(workdir.iterdir()))}-{fmt}-{precision}"
    export_model(ref, fmt, out, precision=precision, static_batch=batch)
    return str(out / artefact)


def dynamic_batch_note(ref: str, batch: int) -> str | None:
    """A note when an exported artefact has a dynamic batch axis: bench's own exports have a fixed
    one, so a dense baseline it exports can run ahead of the user's artefact for that reason alone."""
    if backend_for_artefact(ref) is None or read_record(ref).get("input_shape", [None])[0] != "batch":
        return None
    return (
        f"{ref} has a dynamic batch axis; the models bench exports itself have a fixed one (batch {batch}), "
        f"which CPU runtimes run faster: export it with --static-batch {batch} to compare like with like"
    )


def prepare(
    ref: str,
    backend: str | None,
    batch: int,
    device: str,
    precision: str | None,
    threads: int | None,
    workdir: Path,
    compile: bool = False,
) -> Timed:
    """Build the timer for `ref` (backend inferred from an artefact's suffix when not given)."""
    import torch

    ref = artefact_in_folder(ref, backend)
    suffix = Path(ref).suffix
    owner = backend_for_artefact(ref)
    if backend and owner and backend != owner.name:
        raise P3BError(f"{ref} is a {suffix} artefact, which the {backend} backend cannot run (use {owner.name})")
    if suffix and not owner and not Path(ref).is_dir():
        raise P3BError(
            f"{ref}: unknown artefact type {suffix!r} (expected a pruned folder, a model name, "
            f"or one of {', '.join(artefact_suffixes())})"
        )
    be = get_backend(backend) if backend else owner or eager_backend()
    if owner is None and be.device == "cuda" and be.format:  # an engine is built for one GPU and batch profile
        raise P3BError(
            f"the {be.name} backend runs built artefacts: p3bkit export {ref} --format {be.format} "
            f"(--min-batch/--opt-batch/--max-batch {batch}), then bench {be.artefact}"
        )
    if compile and be.format:
        raise P3BError(f"--compile is torch.compile: it applies to the torch backend, not to {be.name}")
    run = run_precision(be, ref, owner is not None, precision)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("--device gpu asked for, but no CUDA GPU is visible here")
    target = _exported(ref, be, workdir, run, batch) if owner is None and be.format else ref
    timed = be.timer(target, batch, run, threads, device, compile)
    return dataclasses.replace(timed, name=ref, source=exported_from(target) if owner else ref)


def dense_baselines(ref: str, batch: int, threads: int | None, workdir: Path, skip: str = "") -> list[Timed]:
    """The dense model on every CPU runtime importable here (and each runtime's variant graphs, e.g.
    onnxruntime's transformer-optimised one): the fastest of them is what a pruned model must beat.
    `skip`: a runtime already timed."""
    from p3bkit.models.adapter import inspect_vit
    from p3bkit.models.factory import create_model

    spec = inspect_vit(create_model(ref))
    out = []
    for be in cpu_backends():
        try:
            if not be.format:
                out += [prepare(ref, be.name, batch, "cpu", None, threads, workdir)] if be.name != skip else []
                continue
            artefact = _exported(ref, be, workdir, FP32, batch)  # once, for the plain graph and its variants
            if be.name != skip:
                out.append(dataclasses.replace(be.timer(artefact, batch, FP32, threads, "cpu"), name=ref, source=ref))
            for tag, label, path in be.variants(Path(artefact), workdir, spec.num_heads, spec.dim):
                timed = be.timer(str(path), batch, FP32, threads, "cpu")
                out.append(dataclasses.replace(timed, name=f"{ref} [{tag}]", source=ref, variant=label))
        except BackendUnavailable:
            continue
    return out
