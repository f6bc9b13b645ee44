"""Typed errors. The CLI turns every `P3BError` into one line and exit code 1."""

from __future__ import annotations


class P3BError(Exception):
    """Base class of every error p3bkit raises on purpose."""


class ArchError(P3BError):
    """A model or architecture file p3bkit cannot handle."""


class SurgeryError(P3BError):
    """Masks that cannot be turned into a dense model, or a failed exactness check."""


class ExportError(P3BError):
    """An export that could not be written."""


class ToleranceError(ExportError):
    """A runtime's outputs differ from PyTorch's by more than the tolerance."""


class BackendUnavailable(P3BError):
    """A backend (onnxruntime, openvino, tensorrt, CUDA) is not usable here."""


class DataError(P3BError):
    """Missing or malformed data."""


class Interrupted(P3BError):
    """SIGTERM/SIGINT during a run: a checkpoint was written, `--resume` continues."""


def message_of(exc: BaseException) -> str:
    """The message of `exc`; an error re-raised from a data-loading process carries the worker's
    traceback in its message, whose last line ("module.Type: message") holds the message."""
    import re

    msg = str(exc)
    if "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        return re.sub(r"^[\w.]+: ", "", last)
    return msg


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error (`--debug` shows the rest)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
