"""The backend registry (the concrete backends live in `p3bkit.exporters.backends`): every runtime p3bkit exports to or runs on, declared once.

A backend says what it is called (runtime name, and its export `format` on the CLI), which
files it writes and reads (artefact name, suffixes), which precisions it exports and runs (with
its native names: OpenVINO says f32 where we say fp32), which residual-write op suits it, what it
needs installed (`check_dependencies`), how it exports (`export`), how it runs an artefact
(`runner`, shared by verification, eval and bench) and how closely it must match PyTorch
(`tolerance`). The CLI's choices, `doctor`, export, verify, eval and bench all read this registry;
adding a backend is one class with `@register`.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Literal

from p3bkit.errors import BackendUnavailable, ExportError, P3BError
from p3bkit.exporters.tolerances import Tolerance, tolerance_for

Precision = Literal["fp32", "fp16", "bf16", "int8"]  # the canonical names, for annotations
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
if TYPE_CHECKING:
    import numpy as np
Runner = Callable[["np.ndarray"], "dict[str, np.ndarray]"]


class PrecisionError(P3BError):
    """A precision a backend cannot export or run (raised before any work)."""


class Backend:
    """One runtime. Subclasses set the class attributes and implement what they support."""

    name: ClassVar[str]                       # runtime name (bench/eval --backend)
    format: ClassVar[str | None] = None       # export format (export --format); None: runs models, exports nothing
    packages: ClassVar[tuple[str, ...]] = ()  # importable modules it needs
    extra: ClassVar[str] = ""                 # pip extra that installs them
    artefact: ClassVar[str | None] = None     # file the export writes (the one eval/bench run)
    suffixes: ClassVar[tuple[str, ...]] = ()  # artefact suffixes it runs
    precisions: ClassVar[dict[str, str]] = {"fp32": "fp32"}  # canonical → native, for export
    write_op: ClassVar[str] = "gather"        # residual write op of exported graphs
    device: ClassVar[str] = "cpu"

    def _canonical(self, name: str) -> str | None:
        """A canonical precision name from a canonical or this backend's native one (None: neither)."""
        if name in PRECISIONS:
            return name
        return {v: k for k, v in self.precisions.items()}.get(name)

    def precision(self, name: str | None, default: str = "fp32") -> str:
        """Canonical precision from a canonical or native name; refuses one this backend lacks."""
        if name is None:
            return default
        canonical = self._canonical(name)
        if canonical not in self.precisions:
            raise PrecisionError(f"{self.name} does not export precision {name!r} "
                                 f"(it has {', '.join(self.precisions)})")
        return canonical

    def check_dependencies(self, precision: str = "fp32") -> None:
        """Raise BackendUnavailable naming the fix when something this precision needs is missing."""
        for module in self.packages:
            require(module, self.extra)

    def version(self) -> str:
        try:
            return md.version(self.packages[0]) if self.packages else "-"
        except md.PackageNotFoundError:
            return "-"

    def status(self) -> tuple[bool, str]:
        """(usable, note) for `p3bkit doctor`."""
        try:
            self.check_dependencies()
        except BackendUnavailable as exc:
            return False, str(exc).split(";")[0]
        return True, self.device.upper()

    def export(self, model, tmp: Path, sample: tuple[int, ...], precision: str, static_batch: int | None,
               opts: dict) -> tuple[list[str], dict]:
        """Write the artefact (and its side files) into `tmp`; return (files, info)."""
        raise ExportError(f"{self.name} runs models but exports none")

    def run_precisions(self, artefact_precision: str) -> tuple[str, ...]:
        """Precisions a runner can honour for an artefact exported at `artefact_precision`."""
        return (artefact_precision,)

    def run_precision(self, artefact_precision: str, asked: str | None = None) -> str:
        """The precision a runner runs an artefact at: its own unless asked otherwise; refuses one
        the runtime would ignore or silently change."""
        run = (self._canonical(asked) or asked) if asked else artefact_precision
        allowed = self.run_precisions(artefact_precision)
        if run not in allowed:
            how = (f"export it at {run} (p3bkit export --format {self.format} --precision {run}) and run that"
                   if self.format and run in self.precisions else f"it runs {', '.join(allowed)}")
            raise PrecisionError(f"the {self.name} runner cannot run this {artefact_precision} model at {run}: {how}")
        return run

    def runner(self, path: str | Path, precision: str | None = None, threads: int | None = None) -> Runner:
        raise NotImplementedError

    def tolerance(self, precision: str) -> Tolerance:
        try:
            return tolerance_for(self.format or self.name, precision)
        except KeyError as exc:
            raise PrecisionError(f"{self.name} has no parity tolerance for {precision}") from exc


def require(module: str, extra: str, need: str = ""):
    """Import `module` or raise BackendUnavailable naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{need or module.split('.')[0]} is not importable ({exc}); install it with "
                                 f"pip install 'p3bkit[{extra}]'") from exc


_REGISTRY: dict[str, Backend] = {}


def _loaded() -> dict[str, Backend]:
    """The registry, after the built-in backends (p3bkit.exporters.backends) have registered."""
    importlib.import_module("p3bkit.exporters.backends")  # registers torch, onnxruntime, openvino, tensorrt

    return _REGISTRY


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend under its runtime name."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_backend(name: str) -> Backend:
    """A backend by runtime name (onnxruntime) or export format (onnx)."""
    for backend in _loaded().values():
        if name in (backend.name, backend.format):
            return backend
    raise P3BError(f"unknown backend {name!r}: choose one of {', '.join(runtimes())}")


def runtimes() -> list[str]:
    return list(_loaded())


def formats() -> list[str]:
    return [b.format for b in _loaded().values() if b.format]


def all_backends() -> list[Backend]:
    return list(_loaded().values())


def backend_for_artefact(path: str | Path) -> Backend | None:
    """The backend that runs an artefact with this suffix (None: not an artefact)."""
    suffix = Path(path).suffix
    return next((b for b in _loaded().values() if suffix in b.suffixes), None)


def artefact_suffixes() -> list[str]:
    return [s for b in _loaded().values() for s in b.suffixes]


def read_record(path: str | Path) -> dict:
    """An artefact's export record (its JSON beside it), or {} when there is none."""
    import json

    record = Path(f"{path}.json")
    return json.loads(record.read_text()) if record.is_file() else {}


def artefact_precision(path: str | Path) -> str:
    """The canonical precision an artefact was exported at (fp32 without a record)."""
    backend = backend_for_artefact(path)
    stored = read_record(path).get("precision")
    return backend.precision(stored) if backend and stored else "fp32"
