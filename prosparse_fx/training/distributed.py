"""Data-parallel training under ``torchrun``: the process group from its environment, each
process's shard of the global batch, DistributedDataParallel, and rank-0-only writes.

The penalty needs nothing special: each process adds ``lambda * L1(x1)`` of its own shard to its
loss and DDP averages the gradients, so with equal shards the update is that of one process on
the whole global batch (both the LM loss and the mean-|x1| L1 are means over tokens).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op with one process)."""
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when there are several processes."""
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model)

    def check_batch(self, global_batch: int) -> None:
        """Raise :class:`InputError` if the world size does not divide the global batch."""
        if global_batch % self.world_size:
            raise InputError(
                f"the global batch of {global_batch} windows does not split over "
                f"{self.world_size} processes; choose a batch_size divisible by the world size"
            )


def init_from_env(device: str) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...); gloo on CPU, NCCL on CUDA. Without torchrun: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())


class ShardedBatches:
    """This process's rows of each global batch: rows ``[rank * b, (rank + 1) * b)`` with
    ``b = global_batch / world_size``. Delegates ``state_dict`` to the global stream, so every
    process resumes at the same position."""

    def __init__(self, batches: Any, ctx: DistContext) -> None:
        self.batches = batches
        self.ctx = ctx

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.batches)
        per = batch.shape[0] // self.ctx.world_size
        return batch[self.ctx.rank * per : (self.ctx.rank + 1) * per]

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)
