"""Parity checks: the same seeded inputs through PyTorch and a runtime (optimum-style, but failing).

Order: output names, then shapes, then values; every failure is collected before raising one
`ToleranceError` that lists each output's max abs diff and the tolerance used.
"""

from __future__ import annotations

import numpy as np
import torch

from p3bkit.backends import Runner
from p3bkit.backends.tolerances import Tolerance
from p3bkit.errors import ExportError, ToleranceError, first_line


def seeded_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).numpy()


CONFIDENT_MARGIN = 0.1  # top-1 agreement counts images whose reference top-2 softmax gap is at least this


def confident(logits: np.ndarray) -> np.ndarray:
    """Rows whose top-1 the reference is sure of: softmax p1 − p2 ≥ CONFIDENT_MARGIN. On near-uniform
    logits (an untrained model) no row is, and a flipped argmax there means nothing: the cosine judges."""
    if logits.shape[1] < 2:
        return np.ones(len(logits), dtype=bool)
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    top2 = np.sort(p, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) >= CONFIDENT_MARGIN


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], tol: Tolerance) -> dict:
    """Per-output stats; raises ToleranceError listing every failing output. Top-1 agreement is
    measured on the images the reference is confident about (`confident`)."""
    failures: list[str] = []
    if set(reference) != set(actual):
        raise ToleranceError(f"output names differ: expected {sorted(reference)}, got {sorted(actual)}")
    for name in reference:
        if reference[name].shape != actual[name].shape:
            failures.append(f"{name}: shape {actual[name].shape} != {reference[name].shape}")
    if failures:
        raise ToleranceError("; ".join(failures))
    stats = {}
    for name, ref in reference.items():
        ref, out = ref.astype(np.float64), actual[name].astype(np.float64)
        diff = float(np.abs(ref - out).max()) if ref.size else 0.0
        allowed = tol.atol + tol.rtol * float(np.abs(ref).max()) if ref.size else tol.atol
        a, b = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
        cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        cos, mean_cos = float(np.min(cosines)), float(np.mean(cosines))
        sure = confident(a)
        top1 = float((a.argmax(1) == b.argmax(1))[sure].mean()) if sure.any() else None
        stats[name] = {
            "max_abs_diff": diff,
            "cosine_min": cos,
            "cosine_mean": mean_cos,
            "top1_agreement": top1,
            "confident_images": int(sure.sum()),
        }
        if not np.isfinite(out).all():
            failures.append(f"{name}: non-finite values")
        if not diff <= allowed:
            failures.append(f"{name}: max abs diff {diff:.3g} > atol {tol.atol:g} + rtol {tol.rtol:g}·max|ref|")
        if tol.min_cosine is not None and not cos >= tol.min_cosine:
            failures.append(f"{name}: cosine {cos:.5f} < {tol.min_cosine}")
        if tol.min_mean_cosine is not None and not mean_cos >= tol.min_mean_cosine:
            failures.append(f"{name}: mean cosine {mean_cos:.5f} < {tol.min_mean_cosine}")
        if tol.min_top1 is not None and top1 is not None and not top1 >= tol.min_top1:
            failures.append(
                f"{name}: top-1 agreement {top1:.3f} < {tol.min_top1} on the {int(sure.sum())} "
                "images the model is confident about"
            )
    if failures:
        raise ToleranceError("parity check failed: " + "; ".join(failures))
    return stats


@torch.inference_mode()
def verify_runner(
    model: torch.nn.Module,
    runner: Runner,
    sample_shape: tuple[int, ...],
    tol: Tolerance,
    batches: tuple[int, ...] = (1, 4),
    device: str = "cpu",
    inputs: list[np.ndarray] | None = None,
) -> dict:
    """Run seeded inputs of each batch size (or the given real `inputs`, e.g. validation images)
    through `model` and `runner`; return stats per batch."""
    model = model.eval()
    report = {}
    xs = inputs or [seeded_input((b, *sample_shape), seed=i) for i, b in enumerate(batches)]
    for x in xs:
        b = len(x)
        ref = model(torch.from_numpy(x).to(device)).float().cpu().numpy()
        try:
            out = runner(x)
        except Exception as exc:  # the runtimes raise many types; a crash is not a parity failure
            raise ExportError(
                f"the runtime could not run the exported model on a batch of {b}: "
                f"{type(exc).__name__}: {first_line(exc)}"
            ) from exc
        report[f"batch{b}"] = compare({"logits": ref}, out, tol)
    return report
