"""File-system rules shared by every stage: atomic writes, usual permissions, safe output folders.

A command never deletes or overwrites what it did not write: output folders must be new or
empty, or `--force` is given (which overwrites only the command's own files and never its
input), and they are checked for writability before any work starts.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from p3bkit.errors import P3BError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_usual_permissions(path: str | os.PathLike) -> None:
    """rw-r--r-- / rwxr-xr-x under the usual umask (temp files and folders are created private)."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as JSON; a crash mid-write leaves the previous file (or none), never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def check_writable(folder: str | os.PathLike) -> None:
    """Prove that `folder` can be written (or, if it does not exist yet, created) without creating it.

    Raises:
        P3BError: when it cannot (read-only, no permission, a file in the way, …).
    """
    folder = Path(folder).absolute()
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise P3BError(f"cannot write to {folder}: {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".p3bkit-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise P3BError(f"cannot write to {folder}: {exc.strerror or exc}") from exc


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_folder(out: str | os.PathLike, command: str, inputs: tuple[str | os.PathLike, ...] = (),
                        force: bool = False, allowed: tuple[str, ...] = ()) -> None:
    """Refuse an output folder that would lose data; then check that it is writable.

    The folder must not be (or contain, or lie inside) one of the `inputs`; it must be new or
    empty unless `force` is given or every entry in it is in `allowed` (the command's own files,
    e.g. a run being resumed). Nothing is deleted here, ever.
    """
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if _inside(src, out) or _inside(out, src):
            raise P3BError(f"`p3bkit {command}` would write its output {out} over its input {src}: "
                           "choose another output folder")
    if out.exists() and not out.is_dir():
        raise P3BError(f"{out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [e for e in entries if e not in allowed]
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise P3BError(f"{out} is not empty ({shown}): choose a new folder, or pass --force to write into it "
                       "(files this command did not write are kept)")
    check_writable(out)
