"""`p3bkit doctor`: which registered backends are installed and usable on this machine."""
from __future__ import annotations


def check_backends() -> list[dict]:
    """One row per backend in the registry: version, usable, a note (device or what is missing),
    and the precisions it exports."""
    import torch

    from p3bkit.exporters.registry import all_backends

    rows = []
    for b in all_backends():
        usable, note = b.status()
        if b.name == "torch":
            note = f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible'}"
        rows.append({"backend": b.name, "format": b.format or "-", "version": b.version(), "usable": usable,
                     "note": note, "precisions": list(b.precisions)})
    return rows
