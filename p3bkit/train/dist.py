"""torchrun / DistributedDataParallel support: process group, all-reduce, identical-state checks.

Under `torchrun` (WORLD_SIZE > 1) the process group is created with nccl on GPU and gloo on CPU.
Sampling that shards by rank is `p3bkit.data.loaders.EpochSampler`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from p3bkit.errors import P3BError


@dataclass(frozen=True)
class DistContext:
    world: int = 1
    rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def require_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one (before any work), in one sentence."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise P3BError(f"--device {device} asked for, but no CUDA GPU is available here")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise P3BError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def init_distributed(device: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun; a no-op otherwise."""
    require_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(1, 0, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise P3BError("--device cuda under torchrun, but no CUDA GPU is visible")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext(world, rank, device)


def all_reduce_sum_(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Sum each tensor over all ranks, in place (no-op in a single process)."""
    if ctx.active:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def check_identical(t: torch.Tensor, ctx: DistContext, what: str) -> None:
    """Raise if `t` differs between ranks (masks must be identical everywhere)."""
    if not ctx.active:
        return
    ref = t.detach().clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(ref, t):
        raise P3BError(f"{what} differs between rank 0 and rank {ctx.rank}")


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()
