"""INT8 post-training quantisation behind an accuracy gate.

Calibration images come from the user's data (the train split, evaluation transform); the gate
measures top-1 of the fp32 graph and of the INT8 artefact on the validation split, both through
the runtime. Above `max_drop` points it applies the runtime's standard remedy — onnxruntime: keep
the layers that add the most quantisation error in fp32 (measured on validation images, 1, 2, 4 …
of them); OpenVINO: NNCF's accuracy-controlled quantisation, which reverts the most harmful
quantisers — and if the drop is still above the gate, raises `ExportError`, so the export writes
nothing. What was calibrated, both accuracies and what stayed in higher precision go into the
export record.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p3bkit.errors import ExportError

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")  # onnxruntime: only those with a weight (see `weighted_nodes`)


@dataclass
class Int8Config:
    """What `p3bkit export --precision int8` calibrates on and how strict its gate is."""

    calib_data: str
    calib_size: int = 300
    val_data: str | None = None   # default: the validation split of calib_data
    max_drop: float = 1.0         # top-1 points
    val_size: int = 2000          # validation images for the gate (a seeded random subset of larger splits)
    seed: int = 0


@dataclass
class Int8Data:
    config: Int8Config
    calib: np.ndarray   # [N, C, H, W] float32
    val_x: np.ndarray
    val_y: np.ndarray
    static_batch: int | None = None  # a graph with a fixed batch takes exactly this many images
    data_classes: int = 0
    model_classes: int = 0

    def chunks(self, x: np.ndarray, size: int) -> list[np.ndarray]:
        """`x` in batches of `size` (of the static batch, when the graph has one; the last one
        padded, callers trim to `len(x)`)."""
        from p3bkit.exporters.runtimes import fixed_batches

        return fixed_batches(x, self.static_batch) if self.static_batch else \
            [x[i:i + size] for i in range(0, len(x), size)]


def load_int8_data(cfg: Int8Config, model: torch.nn.Module, static_batch: int | None = None) -> Int8Data:
    """Calibration and validation images at the model's input size, channels and classes."""
    from p3bkit.train.data import ShiftAugment, load_data

    c, (h, _) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    k = model.num_classes
    train = load_data(cfg.calib_data, img_size=h, num_classes=k, in_chans=c, augment="none").train
    train = train.base if isinstance(train, ShiftAugment) else train  # calibrate on unshifted digits
    pick = np.random.default_rng(cfg.seed).permutation(len(train))[:cfg.calib_size]
    calib = np.stack([train[int(i)][0].numpy() for i in pick]).astype(np.float32)
    bundle = load_data(cfg.val_data or cfg.calib_data, img_size=h, num_classes=k, in_chans=c, augment="none")
    val = bundle.val  # a random subset, not the first N (an ImageFolder is sorted by class)
    pick = sorted(np.random.default_rng(cfg.seed).permutation(len(val))[:cfg.val_size].tolist())
    items = [val[i] for i in pick]
    return Int8Data(cfg, calib, np.stack([x.numpy() for x, _ in items]).astype(np.float32),
                    np.array([int(y) for _, y in items]), static_batch, bundle.num_classes, k)


def top1(runner, data: Int8Data, batch: int = 64) -> float:
    """Top-1 in percent of a numpy runner on the validation images."""
    pred = np.concatenate([next(iter(runner(b).values())).argmax(-1) for b in data.chunks(data.val_x, batch)])
    return 100.0 * float((pred[:len(data.val_y)] == data.val_y).mean()) if len(data.val_y) else 0.0


def gate(fp32: float, int8: float, data: Int8Data, kept: list[str], remedy: str, attempts: list) -> dict:
    cfg = data.config
    record = {"calib_data": cfg.calib_data, "calib_size": len(data.calib), "val_data": cfg.val_data or cfg.calib_data,
              "val_images": len(data.val_x), "val_classes": data.data_classes, "model_classes": data.model_classes, "fp32_top1": fp32, "int8_top1": int8, "drop": fp32 - int8,
              "max_drop": cfg.max_drop, "kept_in_fp32": kept, "remedy": remedy, "attempts": attempts}
    if fp32 - int8 > cfg.max_drop:
        raise ExportError(f"INT8 accuracy gate failed: top-1 {int8:.2f}% vs {fp32:.2f}% in fp32 (drop "
                          f"{fp32 - int8:.2f} > --max-drop {cfg.max_drop:g}) after {remedy}; nothing was written")
    return {"int8": record}


# ---- onnxruntime: static QDQ, per-channel weights -------------------------------------------

def weighted_nodes(path: Path) -> list:
    """MatMul/Gemm/Conv nodes with a weight initializer. The attention matmuls (activation ×
    activation) stay fp32: quantising them too made a 90%-pruned DeiT-S slower than fp32 in
    onnxruntime (9.32 vs 6.16 ms; weighted only 5.86) and the dense one 16% slower than
    weighted-only (19.93 vs 17.13 ms), `benchmarks/int8_why.py`."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [n for n in graph.node if n.op_type in QUANTIZED_OPS and any(i in inits for i in n.input)]


def _ort_quantize(src: Path, out: Path, calib: list[np.ndarray], exclude: list[str], symmetric: bool = False) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixel_values": b} for b in calib])

        def get_next(self):
            return next(self.batches, None)

    nodes = [n.name for n in weighted_nodes(src) if n.name not in exclude]
    if not nodes:  # an empty list would mean "quantise everything" to onnxruntime
        raise ExportError(f"{src.name}: no weighted layer left to quantise")
    # symmetric: zero points of 0, which TensorRT's explicit quantization requires
    options = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    with _quiet():
        quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=nodes, extra_options=options)


def _ort_runner(path: Path):
    from p3bkit.exporters.registry import get_backend

    return get_backend("onnxruntime").runner(path)


def layer_errors(fp32: Path, int8: Path, x: np.ndarray) -> dict[str, float]:
    """Quantisation error each quantised node adds: relative error of its output minus that of
    its input, fp32 graph vs QDQ graph on the same images (both keep the fp32 tensor names)."""
    import onnx

    from p3bkit.exporters.runtimes import ort_session

    graph = onnx.load(str(fp32)).graph
    nodes = weighted_nodes(fp32)
    names = sorted({t for n in nodes for t in (n.input[0], n.output[0])} - {i.name for i in graph.input})
    acts = []
    for path in (fp32, int8):
        model = onnx.load(str(path))
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                  for t in names if t not in have)
        sess = ort_session(model.SerializeToString())
        outs = sess.run(names, {"pixel_values": x})
        acts.append(dict(zip(names, outs)))
    ref, q = acts

    def err(t: str) -> float:
        if t not in ref:
            return 0.0
        return float(np.linalg.norm(ref[t] - q[t]) / (np.linalg.norm(ref[t]) + 1e-12))
    return {n.name: err(n.output[0]) - err(n.input[0]) for n in nodes}


def quantize_onnxruntime(src: Path, out: Path, data: Int8Data, symmetric: bool = False) -> dict:
    """Static QDQ INT8 of the fp32 graph `src` into `out`, behind the gate (see module doc).
    `symmetric`: zero points of 0 (TensorRT); the gate then scores the QDQ graph on onnxruntime."""
    fp32 = top1(_ort_runner(src), data)
    _ort_quantize(src, out, data.chunks(data.calib, 16), [], symmetric)
    int8 = top1(_ort_runner(out), data)
    attempts, kept = [{"kept": 0, "int8_top1": int8}], []
    if fp32 - int8 > data.config.max_drop:
        ranked = sorted(layer_errors(src, out, data.chunks(data.val_x[:32], 32)[0]).items(), key=lambda kv: -kv[1])
        k = 1
        while fp32 - int8 > data.config.max_drop and k <= max(1, len(ranked) // 4):
            kept = [name for name, _ in ranked[:k]]
            _ort_quantize(src, out, data.chunks(data.calib, 16), kept, symmetric)
            int8 = top1(_ort_runner(out), data)
            attempts.append({"kept": k, "int8_top1": int8})
            k *= 2
    remedy = "nothing (within the gate)" if len(attempts) == 1 else \
        f"keeping up to {len(kept)} most error-adding layers in fp32"
    return gate(fp32, int8, data, kept, remedy, attempts)


# ---- OpenVINO: NNCF post-training quantisation, transformer preset -------------------------

def quantize_openvino(src_onnx: Path, xml: Path, data: Int8Data) -> dict:
    """NNCF INT8 of the ONNX graph into an OpenVINO IR, behind the gate (see module doc)."""
    import nncf
    import openvino as ov

    from p3bkit.exporters.runtimes import ov_runner

    fp32_model = ov.convert_model(str(src_onnx))
    fp32 = top1(ov_runner(fp32_model), data)
    items = data.chunks(data.calib, 1)
    calib = nncf.Dataset(items)
    with _quiet():
        q = nncf.quantize(fp32_model, calib, subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER)
    int8 = top1(ov_runner(q), data)
    attempts, kept, remedy = [{"method": "nncf.quantize", "int8_top1": int8}], [], "nothing (within the gate)"
    if fp32 - int8 > data.config.max_drop:
        val = nncf.Dataset(list(zip(data.chunks(data.val_x, 1), data.chunks(data.val_y, 1))), lambda item: item[0])

        def validate(compiled, batches) -> tuple[float, list[float]]:  # per item: one image, or a static batch
            hits = [float((np.argmax(compiled(x)[0], -1) == y).mean()) for x, y in batches]
            return float(np.mean(hits)) if hits else 0.0, hits

        with _quiet():
            q = nncf.quantize_with_accuracy_control(
                fp32_model, calib, val, validate, max_drop=data.config.max_drop / 100.0,
                drop_type=nncf.DropType.ABSOLUTE, subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER)
        int8 = top1(ov_runner(q), data)
        kept = _unquantized(q)
        remedy = "NNCF accuracy-controlled quantisation"
        attempts.append({"method": "nncf.quantize_with_accuracy_control", "int8_top1": int8})
    info = gate(fp32, int8, data, kept, remedy, attempts)
    ov.save_model(q, str(xml), compress_to_fp16=False)
    return info


def _unquantized(q) -> list[str]:
    """Weighted layers (MatMul/Convolution) of `q` whose inputs no FakeQuantize feeds."""
    out = []
    for op in q.get_ordered_ops():
        if op.get_type_name() in ("MatMul", "Convolution"):
            fed = [op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())]
            if "FakeQuantize" not in fed:
                out.append(op.get_friendly_name())
    return out


@contextlib.contextmanager
def _quiet():
    """NNCF and onnxruntime's quantiser print progress bars and INFO lines; restored afterwards."""
    logs = [logging.getLogger(), logging.getLogger("nncf")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
