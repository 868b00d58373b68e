"""Data-parallel training under ``torchrun``: the process group from its environment, each
process's shard of the global batch, DistributedDataParallel, and rank-0-only writes.

The penalty needs nothing special: each process adds ``lambda * L1(x1)`` of its own shard to its
loss and DDP averages the gradients, so with equal shards the update is that of one process on
the whole global batch (both the LM loss and the mean-|x1| L1 are means over tokens).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.constants import default_pg_timeout

from ..errors import InputError

log = logging.getLogger(__name__)

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

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """A frozen model (a distillation teacher: no gradients, no optimizer) placed like
        :meth:`wrap` places the student: as is under one process or ``"ddp"`` (a full copy per
        process; it needs no gradient averaging), sharded with FSDP2 under ``"fsdp"``."""
        if not self.sharded:
            return model
        return self.wrap(model)

    def check_batch(self, global_batch: int) -> None:
        """Raise :class:`InputError` if the world size does not divide the global batch."""
        if global_batch % self.world_size:
            raise InputError(
                f"the global batch of {global_batch} windows does not split over "
                f"{self.world_size} processes; choose a batch_size divisible by the world size"
            )


RENDEZVOUS_TIMEOUT_ENV = "PROSPARSE_FX_RENDEZVOUS_TIMEOUT"
"""Environment variable: seconds to wait for the other torchrun processes (default 300)."""

DEFAULT_RENDEZVOUS_TIMEOUT = 300.0


@dataclass(frozen=True)
class TorchrunEnv:
    """The torchrun variables of one process of ``world_size`` (checked by :func:`torchrun_env`)."""

    world_size: int
    rank: int = 0
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0

    @property
    def address(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


_LAUNCH_HINT = (
    "launch with torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
)


def _env_int(name: str, lo: int, hi: int | None, fix: str) -> int:
    """The whole-number environment variable ``name`` in ``[lo, hi]``; InputError otherwise."""
    raw = os.environ.get(name)
    accepted = f"a whole number from {lo} to {hi}" if hi is not None else f"a whole number >= {lo}"
    if raw is None or not raw.strip():
        raise InputError(f"{name} is not set; it must be {accepted}; {fix}")
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        raise InputError(f"{name}={raw!r} is not {accepted}; {fix}")
    return value


def torchrun_env() -> TorchrunEnv:
    """The process-group variables of the environment, checked before anything waits on them.

    ``WORLD_SIZE`` unset or ``1``: one process (the other variables are not read). Otherwise
    ``RANK`` and ``LOCAL_RANK`` must be whole numbers in ``[0, WORLD_SIZE)``, and
    ``MASTER_ADDR`` and ``MASTER_PORT`` (1 to 65535) must be set, as torchrun sets them.

    Raises:
        InputError: a variable that is not a whole number, out of range or missing; the message
            names it, its value and the fix (launch with torchrun, or unset the variable).
    """
    if os.environ.get("WORLD_SIZE") is None:
        return TorchrunEnv(world_size=1)
    world = _env_int(
        "WORLD_SIZE", 1, None, f"{_LAUNCH_HINT}, or unset WORLD_SIZE to run one process"
    )
    if world == 1:
        return TorchrunEnv(world_size=1)
    stale = (
        f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} says this is one of {world} processes: "
        f"{_LAUNCH_HINT}, or unset WORLD_SIZE to run one process"
    )
    rank = _env_int("RANK", 0, world - 1, stale)
    local_rank = _env_int("LOCAL_RANK", 0, world - 1, stale)
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise InputError(f"MASTER_ADDR is not set (the host of rank 0); {stale}")
    port = _env_int("MASTER_PORT", 1, 65535, stale)
    return TorchrunEnv(world, rank, local_rank, addr, port)


def rendezvous_timeout(timeout: float | None = None) -> float:
    """Seconds to wait for the other processes: ``timeout`` if given, else
    ``$PROSPARSE_FX_RENDEZVOUS_TIMEOUT``, else 300.

    Raises:
        InputError: a value that is not a finite number of seconds > 0.
    """
    source, value = "timeout", timeout
    if value is None:
        raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_RENDEZVOUS_TIMEOUT
        source = f"{RENDEZVOUS_TIMEOUT_ENV}={raw!r}"
        try:
            value = float(raw)
        except ValueError:
            value = None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (math.isfinite(value) and 0 < value <= 7 * 24 * 3600):
        raise InputError(
            f"{source} is not a number of seconds > 0 and <= 604800 (one week); "
            f"give e.g. {RENDEZVOUS_TIMEOUT_ENV}=600"
        )
    return float(value)


def init_from_env(
    device: str, sharding: str = "ddp", *, timeout: float | None = None
) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); gloo on CPU, NCCL on CUDA.
    Without torchrun (``WORLD_SIZE`` unset or 1): one process.

    The variables are checked first (:func:`torchrun_env`), so a stale ``WORLD_SIZE`` is named
    instead of failing inside torch. Joining logs a warning that this process waits for
    ``WORLD_SIZE`` processes at ``MASTER_ADDR:MASTER_PORT``, and waits at most ``timeout``
    seconds (default: ``$PROSPARSE_FX_RENDEZVOUS_TIMEOUT``, else 300) for all of them to
    arrive; collectives after that keep torch's own timeout.

    Raises:
        InputError: an unknown ``sharding``; a torchrun variable that is malformed, out of range
            or missing; a bad timeout; or processes that did not all arrive within the timeout
            (the message names the variables to check).
    """
    env = torchrun_env()
    if env.world_size == 1:
        return DistContext(sharding=sharding)
    if dist.is_initialized():
        return DistContext(
            rank=dist.get_rank(), world_size=dist.get_world_size(), sharding=sharding
        )
    DistContext(sharding=sharding)  # an unknown sharding is refused before any wait
    seconds = rendezvous_timeout(timeout)
    log.warning(
        "rank %d: waiting up to %g s for %d processes at %s (MASTER_ADDR:MASTER_PORT; %s sets "
        "the limit)",
        env.rank,
        seconds,
        env.world_size,
        env.address,
        RENDEZVOUS_TIMEOUT_ENV,
    )
    store = _rendezvous(env, seconds)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), sharding=sharding)


def _rendezvous(env: TorchrunEnv, seconds: float) -> dist.Store:
    """The store of the process group once all ``env.world_size`` processes have reached it,
    waiting at most ``seconds`` in all: torch's env:// rendezvous, then a barrier on the store.

    A process that connects to the store (every one but a self-hosting rank 0) first waits for
    ``MASTER_ADDR:MASTER_PORT`` to accept connections with a plain socket, so that a missing
    rank 0 ends in :class:`InputError` rather than in torch's C++ stack dumps on stderr.
    """
    from torch.distributed.rendezvous import rendezvous

    deadline = time.monotonic() + seconds

    def left() -> timedelta:
        return timedelta(seconds=max(deadline - time.monotonic(), 0.001))

    def timed_out(detail: str) -> InputError:
        return InputError(
            f"not all of WORLD_SIZE={env.world_size} processes reached MASTER_ADDR:MASTER_PORT="
            f"{env.address} within {seconds:g} s (rank {env.rank}: {detail}); start every "
            f"process with torchrun, check that MASTER_ADDR/MASTER_PORT point at rank 0, or "
            f"unset WORLD_SIZE to run one process; {RENDEZVOUS_TIMEOUT_ENV} sets the wait"
        )

    hosts_store = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if not hosts_store:
        _wait_until_listening(env, deadline, timed_out)
    try:
        store, _, _ = next(rendezvous("env://", timeout=left()))
        # under torchrun's agent store every process connects at once: wait for all of them
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        arrived = dist.PrefixStore(f"prosparse_fx/arrived/{attempt}", store)
        arrived.set(str(env.rank), "1")
        arrived.wait([str(r) for r in range(env.world_size)], left())
    except (RuntimeError, OSError) as exc:  # DistStoreError, DistNetworkError: timeouts
        raise timed_out(str(exc)) from exc
    store.set_timeout(default_pg_timeout)  # later collectives keep torch's own limit
    return dist.PrefixStore("default_pg", store)


def _wait_until_listening(
    env: TorchrunEnv, deadline: float, timed_out: Callable[[str], InputError]
) -> None:
    """Return once ``MASTER_ADDR:MASTER_PORT`` accepts a TCP connection; raise
    :class:`InputError` if the host cannot be resolved or nothing listens by ``deadline``."""
    try:
        socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InputError(
            f"MASTER_ADDR={env.master_addr!r} cannot be resolved ({exc}); give the host of "
            f"rank 0 (torchrun sets it), or unset WORLD_SIZE to run one process"
        ) from exc
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise timed_out("nothing listens there")
        try:
            with socket.create_connection(
                (env.master_addr, env.master_port), timeout=min(remaining, 1.0)
            ):
                return
        except OSError:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


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
