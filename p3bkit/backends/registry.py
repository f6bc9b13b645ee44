"""The backend registry: every runtime p3bkit exports to or runs on, declared once.

A backend says what it is called (its runtime name, `--backend`, and its export format,
`export --format`), which files it writes and reads (artefact name, suffixes), which precisions
it exports and runs (with its native names: OpenVINO says f32 where we say fp32), which residual
write op suits it, what it needs installed (`check_dependencies`), how it exports (`export`,
INT8 through the runtime's own quantiser), how it runs an artefact (`runner`, shared by
verification, eval and the INT8 gate), how it times one (`timer`, shared by bench, latency
tables and the demo) and how closely it must match PyTorch (`tolerance`). Everything above this
package reads this registry; this package is the only one that imports a runtime, and adding a
backend is one class with `@register`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from p3bkit.backends.tolerances import Tolerance, tolerance_for
from p3bkit.errors import BackendUnavailable, ExportError, P3BError

if TYPE_CHECKING:
    import numpy as np
    import torch.nn as nn

    from p3bkit.backends.quantization import Int8Data, QuantResult
    from p3bkit.backends.timing import Timed

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
FP32, FP16, BF16, INT8 = PRECISIONS


class Runner(Protocol):
    """Runs an artefact (or, for torch, a model reference): numpy images in, named outputs (logits) out."""

    input_shape: list  # the graph's input shape; a dynamic axis is None, a name, or -1 (as the runtime says)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class FnRunner:
    """A `Runner` made of a function, with what its input takes."""

    fn: Callable[[np.ndarray], dict[str, np.ndarray]]
    input_shape: list
    input_dtype: Any = "float32"
    input_name: str = ""

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.fn(x)


class PrecisionError(P3BError):
    """A precision a backend cannot export or run (raised before any work)."""


class Backend:
    """One runtime. Subclasses set the class attributes and implement what they support."""

    name: ClassVar[str]  # runtime name (bench/eval/latency-table --backend)
    format: ClassVar[str | None] = None  # export format (export --format); None: runs models, exports nothing
    packages: ClassVar[tuple[str, ...]] = ()  # importable modules it needs
    extra: ClassVar[str] = ""  # pip extra that installs them
    artefact: ClassVar[str | None] = None  # file the export writes (the one eval/bench run)
    suffixes: ClassVar[tuple[str, ...]] = ()  # artefact suffixes it runs
    precisions: ClassVar[dict[str, str]] = {FP32: "fp32"}  # canonical → native, for export
    write_op: ClassVar[str] = "gather"  # residual write op of exported graphs
    device: ClassVar[str] = "cpu"  # where its artefacts run: cpu or cuda
    table_preference: ClassVar[int] = 0  # latency tables when the user names no runtime: highest first

    # ---- names and precisions ---------------------------------------------------------------

    def _canonical(self, name: str) -> str | None:
        """A canonical precision name from a canonical or this backend's native one (None: neither)."""
        if name in PRECISIONS:
            return name
        return {v: k for k, v in self.precisions.items()}.get(name)

    def precision(self, name: str | None, default: str = FP32) -> str:
        """Canonical precision from a canonical or native name; refuses one this backend lacks."""
        if name is None:
            return default
        canonical = self._canonical(name)
        if canonical not in self.precisions:
            raise PrecisionError(
                f"{self.name} does not export precision {name!r} (it has {', '.join(self.precisions)})"
            )
        return canonical

    def run_precisions(self, artefact_precision: str) -> tuple[str, ...]:
        """Precisions a runner can honour for an artefact exported at `artefact_precision`."""
        return (artefact_precision,)

    def run_precision(self, artefact_precision: str, asked: str | None = None) -> str:
        """The precision a runner runs an artefact at: its own unless asked otherwise; refuses one
        the runtime would ignore or silently change."""
        run = (self._canonical(asked) or asked) if asked else artefact_precision
        allowed = self.run_precisions(artefact_precision)
        if run not in allowed:
            how = (
                f"export it at {run} (p3bkit export --format {self.format} --precision {run}) and run that"
                if self.format and run in self.precisions
                else f"it runs {', '.join(allowed)}"
            )
            raise PrecisionError(f"the {self.name} runner cannot run this {artefact_precision} model at {run}: {how}")
        return run

    def detect_precision(self, path: str | Path) -> str:
        """The precision an artefact was exported at, read from the artefact itself (no record)."""
        return FP32

    def tolerance(self, precision: str) -> Tolerance:
        try:
            return tolerance_for(self.format or self.name, precision)
        except KeyError as exc:
            raise PrecisionError(f"{self.name} has no parity tolerance for {precision}") from exc

    # ---- installation --------------------------------------------------------------------------

    def check_dependencies(self, precision: str = FP32) -> None:
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

    # ---- export ----------------------------------------------------------------------------------

    def exported_as(self) -> tuple[str, str]:
        """(export format, artefact file name); refuses a backend that runs models but exports none."""
        if self.format is None or self.artefact is None:
            raise ExportError(f"{self.name} runs models but exports none: choose an export format")
        return self.format, self.artefact

    def export(
        self, model: nn.Module, tmp: Path, sample: tuple[int, ...], precision: str, static_batch: int | None, opts: dict
    ) -> tuple[list[str], dict]:
        """Write the artefact (and its side files) into `tmp`; return (files, info). INT8 runs the
        runtime's quantiser on `opts["int8"]` (`Int8Data`) and puts its `QuantResult` in info["int8"]."""
        raise ExportError(f"{self.name} runs models but exports none")

    def quantize(self, src_onnx: Path, out: Path, data: Int8Data) -> QuantResult:
        """INT8 of an fp32 ONNX graph with the runtime's own post-training quantiser (+ its remedy
        when the accuracy drop is above `data.max_drop`)."""
        raise ExportError(f"{self.name} has no INT8 quantiser")

    # ---- running and timing ----------------------------------------------------------------------

    def runner(
        self, path: str | Path, precision: str | None = None, threads: int | None = None, device: str | None = None
    ) -> Runner:
        """A callable that runs the artefact (or, for torch, the model reference) on numpy images."""
        raise NotImplementedError

    def check_device(self, device: str | None) -> str:
        """The device to run on (this backend's own when None); refuses one its artefacts cannot run on."""
        if device is None:
            return self.device
        if device.split(":")[0] != self.device:
            raise P3BError(f"{self.name} runs on the {self.device.upper()} here, not on {device}")
        return device

    def timer(
        self,
        ref: str,
        batch: int,
        precision: str,
        threads: int | None = None,
        device: str | None = None,
        compile: bool = False,
    ) -> Timed:
        """One batch of random input, ready to be timed: `step()` runs it, `sync()` waits for it."""
        raise NotImplementedError

    def onnx_artefact(self, onnx_path: Path, workdir: Path, batch: int) -> Path:
        """The artefact this runtime runs, built from an ONNX graph (latency tables time graphs this way)."""
        return onnx_path

    def time_module(
        self, module: nn.Module, x, workdir: Path, whole: bool, threads: int | None = None, device: str | None = None
    ) -> Timed:
        """`module(x)` on this runtime, ready to be timed: exported like `p3bkit export` (`whole`) or
        with the quick exporter for the latency tables' small branch graphs."""
        import dataclasses
        import tempfile

        from p3bkit.backends.onnx import export_onnx, export_onnx_quick

        with tempfile.TemporaryDirectory(prefix="graph-", dir=workdir) as tmp:  # the runtime keeps its own copy
            path = Path(tmp) / "graph.onnx"
            if whole:
                export_onnx(module, path, tuple(x.shape[1:]), static_batch=x.shape[0])
            else:
                export_onnx_quick(module, x, path)
            timed = self.timer(str(self.onnx_artefact(path, Path(tmp), x.shape[0])), x.shape[0], FP32, threads, device)
        return dataclasses.replace(timed, profile=None)  # a profile would need the files just removed

    def variants(self, artefact: Path, workdir: Path, num_heads: int, dim: int) -> list[tuple[str, str, Path]]:
        """Other graphs of the same model a user of this runtime would deploy (tag, label, artefact),
        e.g. onnxruntime's transformer-optimised graph; bench times them as dense baselines."""
        return []


def require(module: str, extra: str, need: str = ""):
    """Import `module` or raise BackendUnavailable naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"{need or module.split('.')[0]} is not importable ({exc}); install it with pip install 'p3bkit[{extra}]'"
        ) from exc


_REGISTRY: dict[str, Backend] = {}
BUILT_IN = ("torch_eager", "onnxruntime", "openvino", "tensorrt")  # modules of this package that register


def _loaded() -> dict[str, Backend]:
    """The registry, after the built-in backends have registered."""
    for module in BUILT_IN:
        importlib.import_module(f"p3bkit.backends.{module}")
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


def eager_backend() -> Backend:
    """The backend that runs model references themselves (no export): the default for models."""
    return next(b for b in _loaded().values() if not b.format)


def cpu_backends() -> list[Backend]:
    """Backends whose artefacts run on the CPU, in registry order."""
    return [b for b in _loaded().values() if b.device == "cpu"]


def default_table_backend() -> str:
    """The runtime latency tables are made for when none is named: the preferred installed CPU one."""
    ranked = sorted((b for b in cpu_backends() if b.format), key=lambda b: -b.table_preference)
    for b in ranked:
        if b.status()[0]:
            return b.name
    return ranked[0].name if ranked else "torch"


def backend_for_artefact(path: str | Path) -> Backend | None:
    """The backend that runs an artefact with this suffix (None: not an artefact)."""
    suffix = Path(path).suffix
    return next((b for b in _loaded().values() if suffix in b.suffixes), None)


def artefact_suffixes() -> list[str]:
    return [s for b in _loaded().values() for s in b.suffixes]


def runtime_packages() -> list[str]:
    """The distribution names of every registered runtime (for machine records)."""
    return list(dict.fromkeys(p.split(".")[0] for b in _loaded().values() for p in b.packages))


def backend_status() -> list[dict]:
    """One row per backend: version, usable, a note (device or what is missing), export precisions."""
    rows = []
    for b in all_backends():
        usable, note = b.status()
        rows.append(
            {
                "backend": b.name,
                "format": b.format or "-",
                "version": b.version(),
                "usable": usable,
                "note": note,
                "precisions": list(b.precisions),
            }
        )
    return rows
