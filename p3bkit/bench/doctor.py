"""`p3bkit doctor`: which backends are installed and usable on this machine."""
from __future__ import annotations

import importlib
import importlib.metadata as md


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "-"


def _try(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except ImportError as exc:
        return f"not importable: {exc}"


def check_backends() -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    rows = [{"backend": "torch", "version": torch.__version__, "usable": True,
             "note": f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'no GPU visible'}"}]
    for backend, pkg in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        err = _try(backend)
        rows.append({"backend": backend, "version": _version(pkg), "usable": err is None, "note": err or "CPU"})
    err = _try("tensorrt")
    trt_ver = "-"
    if err is None:
        import tensorrt

        trt_ver = tensorrt.__version__
    note = err or ("" if cuda else "installed, but no CUDA GPU visible")
    rows.append({"backend": "tensorrt", "version": trt_ver, "usable": err is None and cuda, "note": note or "GPU"})
    return rows
