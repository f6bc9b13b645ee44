"""Deterministic, resumable, rank-sharded loading (training, evaluation, calibration).

`EpochSampler` gives every epoch one seeded permutation; rank r takes every world-th index, so
the union of the ranks' k-th batches equals the k-th batch of a single process whose batch is
the global batch. It can start mid-epoch (resume after an interruption) without touching the
skipped samples, so augmentation RNG streams continue exactly.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """Seeded permutation, sharded by rank, truncated to whole batches, optionally started mid-epoch."""

    def __init__(
        self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1, start_batch: int = 0, shuffle: bool = True
    ) -> None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        mine = perm[rank::world]
        whole = (len(mine) // batch) * batch if shuffle else len(mine)
        self.indices = mine[:whole][start_batch * batch :].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    start_batch: int = 0,
) -> DataLoader:
    """A loader whose order depends only on `seed` (so a resumed epoch replays exactly).

    Training loaders (shuffle) drop the last partial batch; `rank`/`world` shard it for DDP.
    """
    sampler = EpochSampler(len(cast(Sized, ds)), batch_size, seed, rank, world, start_batch, shuffle)
    # an own generator: creating the iterator must not draw from the global RNG (resume exactness)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=gen)
