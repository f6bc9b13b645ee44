"""How an export folder stands for its artefact (the backend registry says which file is whose)."""
from __future__ import annotations

from pathlib import Path

from p3bkit.errors import P3BError


def artefact_in_folder(ref: str, backend: str | None = None) -> str:
    """An export folder (no arch.json, one exported model inside) → its artefact; anything else as is."""
    from p3bkit.exporters.registry import all_backends, get_backend

    folder = Path(ref)
    if not folder.is_dir() or (folder / "arch.json").is_file():
        return ref
    owners = [get_backend(backend)] if backend else all_backends()
    found = [folder / b.artefact for b in owners if b.artefact and (folder / b.artefact).is_file()]
    if len(found) == 1:
        return str(found[0])
    names = "/".join(b.artefact for b in all_backends() if b.artefact)
    if not found:
        raise P3BError(f"{ref} holds no model (arch.json) and no exported {names}")
    raise P3BError(f"{ref} holds several exports ({', '.join(f.name for f in found)}): name one, or pass --backend")
