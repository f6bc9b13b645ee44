"""Export records and export folders: what an artefact is, read back (the record is its JSON beside it)."""

from __future__ import annotations

import json
from pathlib import Path

from p3bkit.backends import FP32, all_backends, backend_for_artefact, get_backend
from p3bkit.errors import P3BError
from p3bkit.models.arch import ARCH_FILE


def record_path(artefact: str | Path) -> Path:
    return Path(f"{artefact}.json")


def read_record(path: str | Path) -> dict:
    """An artefact's export record, or {} when there is none."""
    record = record_path(path)
    if not record.is_file():
        return {}
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise P3BError(f"{record}: unreadable export record ({exc})") from exc


def artefact_precision(path: str | Path) -> str:
    """The canonical precision an artefact was exported at: from its record, else read from the artefact."""
    backend = backend_for_artefact(path)
    stored = read_record(path).get("precision")
    if backend is None:
        return FP32
    return backend.precision(stored) if stored else backend.detect_precision(path)


def exported_from(ref: str) -> str:
    """The model an artefact was exported from (its record), else the reference itself."""
    return read_record(ref).get("source", ref) if backend_for_artefact(ref) else ref


def artefact_in_folder(ref: str, backend: str | None = None) -> str:
    """An export folder (no arch.json, one exported model inside) → its artefact; anything else as is."""
    folder = Path(ref)
    if not folder.is_dir() or (folder / ARCH_FILE).is_file():
        return ref
    owners = [get_backend(backend)] if backend else all_backends()
    found = [folder / b.artefact for b in owners if b.artefact and (folder / b.artefact).is_file()]
    if len(found) == 1:
        return str(found[0])
    names = "/".join(b.artefact for b in all_backends() if b.artefact)
    if not found:
        raise P3BError(f"{ref} holds no model ({ARCH_FILE}) and no exported {names}")
    raise P3BError(f"{ref} holds several exports ({', '.join(f.name for f in found)}): name one, or pass --backend")
