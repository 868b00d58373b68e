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

SHARDING = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (1 process: rank 0 of 1), and how :meth:`wrap`
    spreads the model: ``"ddp"`` (DistributedDataParallel, a full copy per process) or
    ``"fsdp"`` (FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded).

    Raises:
        InputError: an unknown ``sharding``.
    """

    rank: int = 0
    world_size: int = 1
    sharding: str = "ddp"

    def __post_init__(self) -> None:
        if self.sharding not in SHARDING:
            raise InputError(f"sharding must be one of {list(SHARDING)}, got {self.sharding!r}")

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether :meth:`wrap` shards the model (FSDP2 over several processes)."""
        return self.world_size > 1 and self.sharding == "fsdp"

    def barrier(self) -> None:
        """Wait for every process (no-op with one process)."""
        if self.world_size > 1:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each value over the processes (one all-reduce; with one process the
        values themselves). Every process must call it at the same point."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` ready for data-parallel training when there are several processes.

        ``"ddp"``: wrapped in DistributedDataParallel. ``"fsdp"``: sharded in place with FSDP2
        ``fully_shard``, each module of a class in the Hugging Face ``_no_split_modules`` list
        (the decoder layers) as its own unit, then the root; build the optimizer after this
        call (the parameters become DTensors), and gather weights with
        ``param.full_tensor()`` or ``torch.distributed.checkpoint.state_dict``. Activation
        hooks (the regularizer's) see ordinary local tensors in both cases, and both average
        gradients over processes, so the penalty is averaged like the loss.

        Raises:
            InputError: ``"fsdp"`` on a torch without ``torch.distributed.fsdp.fully_shard``.
        """
        if self.world_size == 1:
            return model
        if self.sharding == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:
            raise InputError(
                "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): "
                "use sharding='ddp'"
            ) from exc
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.world_size,))
        units = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if module is not model and type(module).__name__ in units:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def check_batch(self, global_batch: int) -> None:
        """Raise :class:`InputError` if the world size does not divide the global batch."""
        if global_batch % self.world_size:
            raise InputError(
                f"the global batch of {global_batch} windows does not split over "
                f"{self.world_size} processes; choose a batch_size divisible by the world size"
            )


def init_from_env(device: str, sharding: str = "ddp") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...); gloo on CPU, NCCL on CUDA. Without torchrun: one process.

    Raises:
        InputError: an unknown ``sharding``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(sharding=sharding)
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), sharding=sharding)


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU for saving, gathered from the shards under FSDP2.

    A collective under ``"fsdp"``: every process must call it. Returns ``None`` when the model
    is not sharded (save the model itself).
    """
    if not ctx.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> dict[str, Any]:
    """The optimizer's state dict for a checkpoint: whole (gathered) under FSDP2, so that a run
    can resume with any world size. A collective under ``"fsdp"``."""
    if not ctx.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ctx: DistContext
) -> None:
    """Inverse of :func:`optimizer_state` (every process passes the whole state)."""
    if not ctx.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


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
