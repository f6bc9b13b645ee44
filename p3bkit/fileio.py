"""Atomic file writes shared by every stage: a temp file beside the target, then a rename."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as JSON; a crash mid-write leaves the previous file (or none), never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path
