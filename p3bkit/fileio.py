"""File-system rules shared by every stage: atomic writes, usual permissions, safe output folders.

A command never deletes or overwrites what it did not write: output folders must be new or
empty, or `--force` is given (which overwrites only the command's own files and never its
input), and they are checked for writability before any work starts. While a command writes into
a folder it holds the folder's lock (`folder_lock`): a second run into the same folder is refused
instead of interleaving its files; the lock of a run that was killed is taken over.
"""

from __future__ import annotations

import contextlib
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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text`; a crash mid-write leaves the previous file (or none), never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as JSON, atomically (`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, indent=1))


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


LOCK = ".p3bkit.lock"


def _holder(path: Path) -> int | None:
    """The pid of the live process holding lock file `path`, or None (no lock, or its process is gone)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def check_not_in_use(folder: str | os.PathLike) -> None:
    """Refuse a folder whose lock a live process other than this one holds."""
    _in_use(Path(folder))


def _in_use(folder: Path) -> None:
    pid = _holder(folder / LOCK)
    if pid is not None and pid != os.getpid():
        raise P3BError(
            f"{folder} is in use by another p3bkit run (pid {pid}): wait for it to end or choose another folder"
        )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike):
    """Hold `folder`'s lock while writing into it (the folder is created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    mine = folder / f"{LOCK}.{os.getpid()}"
    mine.write_text(f"{os.getpid()}\n")  # the lock appears with its pid in it (a link is atomic): never empty
    try:
        for _ in range(2):
            try:
                os.link(mine, path)
            except FileExistsError:
                _in_use(folder)
                path.unlink(missing_ok=True)  # its run was killed: take the lock over
                continue
            break
        else:
            _in_use(folder)
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield folder
    finally:
        if _holder(path) == os.getpid():  # only our own lock
            path.unlink(missing_ok=True)


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_folder(
    out: str | os.PathLike,
    command: str,
    inputs: tuple[str | os.PathLike, ...] = (),
    force: bool = False,
    allowed: tuple[str, ...] = (),
) -> None:
    """Refuse an output folder that would lose data; then check that it is writable.

    The folder must not be (or contain, or lie inside) one of the `inputs`; it must be new or
    empty unless `force` is given or every entry in it is in `allowed` (the command's own files,
    e.g. a run being resumed). Nothing is deleted here, ever.
    """
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if _inside(src, out) or _inside(out, src):
            raise P3BError(
                f"`p3bkit {command}` would write its output {out} over its input {src}: choose another output folder"
            )
    if out.exists() and not out.is_dir():
        raise P3BError(f"{out} exists and is not a folder")
    if out.is_dir():
        _in_use(out)
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    foreign = [e for e in entries if e not in allowed]
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise P3BError(
            f"{out} is not empty ({shown}): choose a new folder, or pass --force to write into it "
            "(files this command did not write are kept)"
        )
    check_writable(out)
