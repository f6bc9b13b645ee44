"""The package version (one place; `p3bkit.__version__` and every written record read it)."""
__version__ = "0.1.0"
