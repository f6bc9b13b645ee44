"""Fixtures shared by the test files; helper functions live in helpers.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def sample():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def pruned_folder(tmp_path_factory):
    """A small P3B-pruned model (real engine, digits), shared by export/bench/CLI tests."""
    from p3bkit.prune.job import PruneJob, run_prune
    from p3bkit.prune.pruner import P3BConfig

    out = tmp_path_factory.mktemp("prune")
    run_prune(
        PruneJob(
            out=str(out), epochs=(0, 1, 1), structure="full", progress=False, p3b=P3BConfig(keep=0.4, update_every=5)
        )
    )
    return out / "pruned"
