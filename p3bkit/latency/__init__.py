"""Latency tables: what each branch width (and head count) costs on one runtime, measured through
that runtime on this machine (`measure`), checked on whole models it never saw (`check`), and
read as plain data by the pruner's latency budget (`table`)."""

from p3bkit.latency.table import LatencyTable, model_dims

__all__ = ["LatencyTable", "model_dims"]
