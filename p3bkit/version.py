"""The package version (one place; `p3bkit.__version__` and every written record read it), and the
one record of the versions a file was made with (`package_versions`)."""

from __future__ import annotations

__version__ = "0.1.0"

CORE_PACKAGES = ("torch", "timm")


def package_versions(*packages: str) -> dict[str, str]:
    """Python, p3bkit, torch, timm and `packages` ("missing" for one not installed; local build
    tags such as torch's "+cpu" dropped): what arch.json, export records and latency tables store."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version(), "p3bkit": __version__}
    for name in dict.fromkeys([*CORE_PACKAGES, *packages]):
        try:
            out[name] = md.version(name).split("+")[0]
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out
