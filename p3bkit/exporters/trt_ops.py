"""ONNX operators our graphs may use, with TensorRT 10 ONNX-parser support (onnx-tensorrt's
operators.md, "Supported ONNX Operators", TensorRT 10.x, opset 9–20). A table, checked by
`check_trt_ops` before any engine build so that an unsupported graph fails before the GPU work.
"""
from __future__ import annotations

from p3bkit.errors import ExportError

TRT_SUPPORTED_OPS: frozenset[str] = frozenset({
    "Abs", "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Erf", "Expand",
    "Flatten", "Gather", "GatherElements", "Gemm", "Identity", "LayerNormalization", "MatMul", "Mul",
    "Neg", "Pow", "ReduceMean", "Relu", "Reshape", "ScatterND", "ScatterElements", "Shape", "Sigmoid",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
})
# ScatterND's `reduction` attribute was ignored by older ONNX-parser releases (onnx-tensorrt issue
# 957): our TRT path therefore writes residual channels with Concat + Gather (`set_write_op`).
TRT_FORBIDDEN_ATTRS: dict[str, str] = {"ScatterND": "reduction"}


def check_trt_ops(path: str) -> dict[str, int]:
    """Op counts of an ONNX file; raises ExportError naming every op TensorRT cannot parse."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    bad: set[str] = set()
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type not in TRT_SUPPORTED_OPS:
            bad.add(node.op_type)
        attr = TRT_FORBIDDEN_ATTRS.get(node.op_type)
        if attr and any(a.name == attr and a.s not in (b"", b"none") for a in node.attribute):
            bad.add(f"{node.op_type}({attr})")
    if bad:
        raise ExportError(f"{path}: operators TensorRT's ONNX parser does not support: {', '.join(sorted(bad))}")
    return counts
