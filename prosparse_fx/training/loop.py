"""The small training loop the CLI runs: LM loss plus the progressive L1 penalty (ProSparse
Sec. 3.2), AdamW, gradient clipping, one optimizer step per batch of token windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import failpoint
from .distill import Distillation
from .distributed import DistContext
from .regularizer import ActivationRegularizer


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the step where it happened."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss became {value} at step {step}; stopping")
        self.step = step


@dataclass
class StepLog:
    """What one optimizer step did (units: lambda dimensionless, losses in nats, sparsity 0..1)."""

    step: int
    stage: int
    lam: float
    lm_loss: float
    l1: float
    sparsity: float
    kl: float | None = None  # the distillation term (nats, times T^2), when distilling


class BatchStream:
    """Endless ``[batch_size, T]`` batches: epochs over the windows, each in a fresh order.

    Its position (the order generator at the start of the epoch and the batch index in it) is
    saved by :meth:`state_dict`, so a resumed run reads the same batches an uninterrupted one
    would.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch_state = self._gen.get_state()
        self._order = torch.randperm(windows.shape[0], generator=self._gen)
        self._index = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._index + self.batch_size > len(self._order):
            self._epoch_state = self._gen.get_state()
            self._order = torch.randperm(self.windows.shape[0], generator=self._gen)
            self._index = 0
        i = self._index
        self._index += self.batch_size
        return self.windows[self._order[i : i + self.batch_size]]

    def state_dict(self) -> dict[str, Any]:
        """The data position: generator state at the epoch start and the index in the epoch."""
        return {"epoch_state": self._epoch_state.clone(), "index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
            ValueError: an index outside ``[0, number of windows]`` (a damaged state).
        """
        index = state["index"]
        n = self.windows.shape[0]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= n:
            raise ValueError(f"data position {index!r} is not in [0, {n}]")
        self._gen.set_state(state["epoch_state"])
        self._epoch_state = self._gen.get_state()
        self._order = torch.randperm(self.windows.shape[0], generator=self._gen)
        self._index = int(state["index"])


def batches_forever(windows: torch.Tensor, batch_size: int, seed: int = 0) -> BatchStream:
    """Endless ``[batch_size, T]`` batches (a :class:`BatchStream`)."""
    return BatchStream(windows, batch_size, seed)


def train(
    model: nn.Module,
    regularizer: ActivationRegularizer,
    batches: Iterator[torch.Tensor],
    *,
    start_step: int,
    end_step: int,
    optimizer: torch.optim.Optimizer,
    stage_of: Callable[[int], int],
    max_grad_norm: float = 1.0,
    progress: tqdm | None = None,
    autocast_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
    ctx: DistContext | None = None,
    distillation: Distillation | None = None,
    before_step: Callable[[int], None] | None = None,
) -> list[StepLog]:
    """Run optimizer steps ``start_step + 1 .. end_step``; return one :class:`StepLog` each.

    ``ctx``: the processes of a data-parallel run; each step's logged LM loss, L1 and sparsity
    are then their means over the processes (each holds an equal share of the global batch), so
    the log is the global batch's, as one process would log it.

    ``should_stop`` is asked after every step; when it answers True the loop returns early
    (fewer logs than steps asked for), e.g. on SIGTERM (:class:`~.preemption.StopOnSignal`).

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under ``torch.autocast``;
    weights, gradients and the optimizer stay float32, and the penalty is summed in float32, so
    its weight relative to the LM loss is that of a float32 run.

    ``before_step(step)`` is called before each step's forward (e.g.
    :meth:`~.substitution.SmoothSubstitution.set_step`).

    ``distillation``: the task loss is ``(1 - mix) * LM + mix * KL`` to the teacher
    (:class:`~.distill.Distillation`) instead of the LM loss; the log keeps both terms.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the step's update is not applied).
    """
    model.train()
    device = next(model.parameters()).device
    logs = []
    for step in range(start_step + 1, end_step + 1):
        batch = next(batches).to(device)
        if before_step is not None:
            before_step(step)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(input_ids=batch, labels=batch)
        penalty = regularizer.penalty(step)
        kl = distillation.kl(out.logits, batch) if distillation is not None else None
        task = distillation.combine(out.loss, kl) if distillation is not None else out.loss
        loss = task + penalty
        value = float(loss.detach())
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(step, value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        measured = [float(out.loss.detach()), sum(regularizer.last_l1), regularizer.sparsity]
        if kl is not None:
            measured.append(float(kl.detach()))
        if ctx is not None:
            measured = ctx.mean(measured)
        log = StepLog(
            step=step,
            stage=stage_of(step),
            lam=regularizer.last_lambda,
            lm_loss=measured[0],
            l1=measured[1],
            sparsity=measured[2],
            kl=measured[3] if kl is not None else None,
        )
        logs.append(log)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                stage=log.stage,
                lam=f"{log.lam:.3g}",
                lm=f"{log.lm_loss:.3f}",
                l1=f"{log.l1:.3g}",
                sparsity=f"{log.sparsity:.3f}",
            )
        failpoint("train.step")  # the crash tests stop here at a chosen step
        if should_stop is not None and should_stop():
            break
    return logs
