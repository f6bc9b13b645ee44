"""Parity tolerances per backend and precision (one table; `verify` reads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """Max abs diff (atol + rtol·|ref|), and for reduced precision floors on the logits' cosine
    (the worst image, and the mean over images) and on top-1 agreement."""

    atol: float
    rtol: float = 0.0
    min_cosine: float | None = None
    min_top1: float | None = None
    min_mean_cosine: float | None = None


# INT8 on real images: a few images of a heavily pruned model may sit near a decision boundary
# (worst cosine 0.94 seen on a 90%-pruned digits model that lost 0.3 points), so the floor is on
# the mean, with a looser worst case; the accuracy gate judges the rest.
INT8 = Tolerance(atol=float("inf"), min_cosine=0.9, min_top1=0.95, min_mean_cosine=0.98)

# Keys: (export format, canonical precision). Reduced precision is judged by the cosine of the
# logits and top-1 agreement; INT8 on real images (the validation split), never on noise.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("onnx", "fp32"): Tolerance(atol=1e-4),
    ("onnx", "fp16"): Tolerance(atol=float("inf"), min_cosine=0.999, min_top1=0.99),
    ("onnx", "int8"): INT8,
    ("openvino", "fp32"): Tolerance(atol=1e-4),
    ("openvino", "fp16"): Tolerance(atol=float("inf"), min_cosine=0.999, min_top1=0.99),
    ("openvino", "bf16"): Tolerance(atol=float("inf"), min_cosine=0.99, min_top1=0.95),
    ("openvino", "int8"): INT8,
    ("trt", "fp32"): Tolerance(atol=1e-4, rtol=1e-4),
    ("trt", "fp16"): Tolerance(atol=float("inf"), min_cosine=0.999, min_top1=0.99),
    ("trt", "bf16"): Tolerance(atol=float("inf"), min_cosine=0.99, min_top1=0.95),
    ("trt", "int8"): INT8,
}


def tolerance_for(fmt: str, precision: str) -> Tolerance:
    try:
        return TOLERANCES[(fmt, precision)]
    except KeyError:
        raise KeyError(f"no tolerance for {fmt}/{precision}") from None
