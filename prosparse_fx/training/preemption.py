"""Stopping a training run on SIGTERM at the next step boundary, with a checkpoint.

Schedulers (Slurm, Kubernetes, torchrun's elastic agent) send SIGTERM before they kill a job.
:class:`StopOnSignal` turns it into a request that the training loop reads after each optimizer
step; the run then writes its checkpoint and stops, so a preempted run loses no step (without
the handler it would lose up to ``checkpoint_every`` steps).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist


class Preempted(RuntimeError):
    """The run stopped on a signal after ``step``; its checkpoint holds that step (``hint``:
    where it is and how to continue, appended to the message)."""

    def __init__(self, step: int, signum: int, hint: str = "") -> None:
        self.step, self.signum = step, signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}" + (f"; {hint}" if hint else ""))


class StopOnSignal:
    """Context manager: while active, SIGTERM (and the other ``signals``) set :attr:`requested`
    instead of killing the process. Outside the main thread it installs nothing.

    Args:
        signals: signal numbers to catch (default: SIGTERM).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for in this process."""
        return self.signum is not None

    def agreed(self, world_size: int = 1) -> bool:
        """Whether any process asked to stop (all processes must stop at the same step, so with
        several this is an all-reduce; call it on every rank after every step)."""
        if world_size == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signum is None:
            self.signum = int(signal.SIGTERM)
        return flag.item() > 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
