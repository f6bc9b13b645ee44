"""Which runtime runs which exported file, and how an export folder stands for its artefact."""
from __future__ import annotations

from pathlib import Path

from p3bkit.errors import P3BError

ARTEFACT_BACKEND = {".onnx": "onnxruntime", ".xml": "openvino", ".plan": "tensorrt", ".engine": "tensorrt"}


def artefact_in_folder(ref: str, backend: str | None = None) -> str:
    """An export folder (no arch.json, one exported model inside) → its artefact; anything else as is."""
    folder = Path(ref)
    if not folder.is_dir() or (folder / "arch.json").is_file():
        return ref
    found = [folder / name for name in ("model.onnx", "model.xml", "model.plan") if (folder / name).is_file()]
    if backend:
        found = [f for f in found if ARTEFACT_BACKEND.get(f.suffix) == backend]
    if len(found) == 1:
        return str(found[0])
    if not found:
        raise P3BError(f"{ref} holds no model (arch.json) and no exported model.onnx/.xml/.plan")
    raise P3BError(f"{ref} holds several exports ({', '.join(f.name for f in found)}): name one, or pass --backend")
