"""Training through the ProSparse stages (Sec. 3.2, Algorithm 1) with everything around the
step loop of :func:`~prosparse_fx.training.loop.train`: AdamW and its learning-rate schedule,
optional distillation from the original model, crash-consistent checkpoints in a
:class:`~prosparse_fx.run_folder.RunFolder`, held-out measurement at each stage end, resume,
SIGTERM and divergence handling. The main job (:func:`prosparse_fx.pipeline.run_sparsify`)
builds one :class:`StageTrainer` and calls :meth:`StageTrainer.fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import LR_DECAYS, SparsifyConfig
from ..environment import autocast_dtype
from ..errors import InputError
from ..ffn import FFNSite
from ..measure import evaluate
from ..models import save_model
from ..report import evaluation_dict
from ..run_folder import RunFolder
from .checkpoint import check_optimizer_state
from .distill import Distillation
from .distributed import (
    DistContext,
    ShardedBatches,
    full_model_state,
    load_optimizer_state,
    optimizer_state,
)
from .loop import NonFiniteLossError, batches_forever, train
from .preemption import Preempted, StopOnSignal
from .regularizer import ActivationRegularizer
from .schedule import ProSparseSchedule
from .substitution import SmoothSubstitution


def lr_factor(step: int, *, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """The learning rate at optimizer step ``step + 1`` as a fraction of the peak: linear warmup
    over ``warmup`` steps, then ``"constant"``, or a ``"linear"``/``"cosine"`` decay from 1 at
    the end of warmup to ``min_ratio`` at step ``total``.

    Raises:
        ValueError: an unknown ``decay``.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"lr decay must be one of {list(LR_DECAYS)}, got {decay!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant" or total <= warmup:
        return 1.0
    done = min(1.0, (step - warmup) / max(total - warmup, 1))
    shape = 1.0 - done if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return min_ratio + (1.0 - min_ratio) * shape


class StageTrainer:
    """Trains ``model`` through the stages of ``schedule`` in the run folder ``run``.

    Args:
        model: the causal LM (its FFN activations already ReLU-family).
        tokenizer: saved with every checkpoint.
        sites: the model's FFN sites (for the regularizer and the stage-end measurement).
        schedule: the lambda schedule (stage ends, lambdas).
        config: learning rate and its schedule, batch size, norm, precision, checkpoint
            interval, distillation mix and temperature.
        run: the locked output folder; checkpoints go to ``run.path/checkpoint``.
        report: the run's report so far; saved in each checkpoint, and marked ``"diverged"``
            if the loss stops being finite.
        device: the training device.
        ctx: the processes of a torchrun run (default: one process).
        teacher: the original model for distillation (``config.distill > 0``), or ``None``.
        elapsed: seconds of work so far (recorded in checkpoints).
        show_progress: show a progress bar on rank 0.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sites: list[FFNSite],
        schedule: ProSparseSchedule,
        config: SparsifyConfig,
        run: RunFolder,
        report: dict[str, Any],
        device: str,
        *,
        ctx: DistContext | None = None,
        teacher: Any = None,
        elapsed: Callable[[], float] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sites = sites
        self.schedule = schedule
        self.config = config
        self.run = run
        self.report = report
        self.ctx = ctx or DistContext()
        self.elapsed = elapsed
        self.show_progress = show_progress
        self.train_dtype = autocast_dtype(config.precision, device)
        self.distillation = (
            Distillation(
                teacher,
                mix=config.distill,
                temperature=config.distill_temperature,
                autocast_dtype=self.train_dtype,
                ctx=self.ctx,
            )
            if teacher is not None
            else None
        )
        self.history: list[dict[str, Any]] = []
        self.stage_ends: list[dict[str, Any]] = []
        self.step = 0

    def fit(
        self,
        train_windows: torch.Tensor,
        held_out: torch.Tensor,
        resume_state: dict[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Train to the schedule's last step (from ``resume_state``'s step when given), with a
        checkpoint every ``config.checkpoint_every`` steps and at each stage end that is at
        least ``checkpoint_every // 4`` steps after the last checkpoint (so a run of a few steps
        writes few), and measure the held-out windows at each stage end.

        Returns:
            ``(history, stage_ends)``: one dict per optimizer step (step, stage, lambda, LM
            loss, L1, sparsity; plus the KL term when distilling), one per stage (lambda,
            held-out perplexity, sparsity and per-layer sparsity).

        Raises:
            InputError: a ``resume_state`` that does not fit this run.
            NonFiniteLossError: the loss became NaN/inf (recorded as ``"diverged"``).
            Preempted: SIGTERM (after a checkpoint of every finished step).
        """
        config, ctx, model = self.config, self.ctx, self.model
        self.train_model = ctx.wrap(model)  # before the optimizer: FSDP2 replaces parameters
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        total = self.schedule.total_steps
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(
                s,
                warmup=max(config.warmup_steps, 0),
                total=total,
                decay=config.lr_decay,
                min_ratio=config.min_lr_ratio,
            ),
        )
        batches: Any = batches_forever(train_windows, config.batch_size, seed=config.seed)
        if ctx.world_size > 1:
            batches = ShardedBatches(batches, ctx)
        self.batches = batches
        if resume_state is not None:
            self._resume(resume_state)
        self.probe = held_out[: max(1, config.batch_size // ctx.world_size)]
        self.last_checkpoint_step = self.step
        bar = tqdm(
            total=total,
            initial=self.step,
            desc="sparsify",
            disable=not self.show_progress or not ctx.is_main,
        )
        stop = StopOnSignal()
        self.substitution = self._substitution()
        try:
            with (
                stop,
                ActivationRegularizer(
                    model, self.schedule, norm=config.norm, sites=self.sites
                ) as reg,
                self.substitution or contextlib.nullcontext(),
            ):
                try:
                    for stage, end in enumerate(self.schedule.ends):
                        if stage < len(self.stage_ends):
                            continue  # measured before the run was interrupted
                        self._train_stage(reg, end, bar, stop)
                        self._end_stage(reg, stage, end, held_out, bar)
                except NonFiniteLossError as exc:  # in a step, or a checkpoint's weights
                    self._diverged(exc)
                    raise
        finally:
            bar.close()
        return self.history, self.stage_ends

    def _substitution(self) -> SmoothSubstitution | None:
        """The smooth substitution over ``config.substitution`` of stage 0 (``None``: the
        abrupt swap); the original activations are those the report recorded before
        ``relufy_``."""
        fraction = self.config.substitution
        if fraction <= 0:
            return None
        steps = max(1, round(fraction * self.schedule.ends[0]))
        originals = [site["activation"] for site in self.report["sites"]]
        paths = [site.activation_module for site in self.sites]
        return SmoothSubstitution(self.model, paths, originals, steps)

    def _resume(self, state: dict[str, Any]) -> None:
        folder = state["checkpoint_dir"]
        try:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.ctx)
            check_optimizer_state(self.model, self.optimizer, state["step"])
            self.lr_sched.load_state_dict(state["lr_schedule"])
            self.batches.load_state_dict(state["data"])
            torch.set_rng_state(state["rng"])
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001  (forged values deep in a state dict)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"the training state in {folder} does not fit this run ({reason}); delete it "
                "and start a new run"
            ) from exc
        self.history = state["history"]
        self.stage_ends = state["stage_ends"]
        self.step = state["step"]

    def _train_stage(
        self, reg: ActivationRegularizer, end: int, bar: tqdm, stop: StopOnSignal
    ) -> None:
        every = self.config.checkpoint_every
        while self.step < end:
            chunk_end = min(end, (self.step // every + 1) * every)
            logs = train(
                self.train_model,
                reg,
                self.batches,
                start_step=self.step,
                end_step=chunk_end,
                optimizer=_Stepper(self.optimizer, self.lr_sched),
                stage_of=self.schedule.stage,
                progress=bar,
                autocast_dtype=self.train_dtype,
                should_stop=lambda: stop.agreed(self.ctx.world_size),
                ctx=self.ctx,
                distillation=self.distillation,
                before_step=self.substitution.set_step if self.substitution else None,
            )
            self.history.extend(dataclasses.asdict(entry) for entry in logs)
            self.step += len(logs)
            if stop.requested:  # SIGTERM: keep every finished step, then stop
                self._checkpoint(reg)
                assert stop.signum is not None
                raise Preempted(self.step, stop.signum, self._resume_hint())
            if self.step < end:
                self._checkpoint(reg)

    def _end_stage(
        self, reg: ActivationRegularizer, stage: int, end: int, held_out: torch.Tensor, bar: tqdm
    ) -> None:
        ev = evaluate(self.model, held_out, sites=self.sites, batch_size=self.config.batch_size)
        reg.clear()
        lam = self.schedule(end)
        self.stage_ends.append({"stage": stage, "step": end, "lambda": lam, **evaluation_dict(ev)})
        if self.ctx.is_main:
            bar.write(
                f"stage {stage} ends at step {end}: lambda {lam:.3g}, held-out perplexity "
                f"{ev.perplexity:.2f}, sparsity {ev.sparsity.sparsity:.4f}"
            )
        # in proportion to the run: a stage end a few steps after the last checkpoint (a short
        # run's stages) gets none; a stop loses at most those steps and this measurement
        if self.step - self.last_checkpoint_step >= max(1, self.config.checkpoint_every // 4):
            self._checkpoint(reg)

    def _checkpoint(self, reg: ActivationRegularizer) -> None:
        ctx, model = self.ctx, self.model
        # the weights saved must be finite and give a finite loss (else resuming diverges)
        loss = _probe_loss(self.train_model, model, self.probe, self.train_dtype, ctx)
        reg.clear()
        if not math.isfinite(loss):
            raise NonFiniteLossError(self.step, loss)
        # collectives under FSDP2: every process gathers, rank 0 writes
        full_state = full_model_state(model, ctx)
        optim_state = optimizer_state(model, self.optimizer, ctx)
        if ctx.is_main:
            if self.elapsed is not None:
                self.report["seconds"] = self.elapsed()  # so far; a resumed run adds its own
            state = {
                "step": self.step,
                "optimizer": optim_state,
                "lr_schedule": self.lr_sched.state_dict(),
                "data": self.batches.state_dict(),
                "rng": torch.get_rng_state(),
                # JSON text: the checkpoint loads with torch.load(weights_only=True)
                "history": json.dumps(self.history),
                "stage_ends": json.dumps(self.stage_ends),
                "report": json.dumps(self.report),
            }
            self.run.save_checkpoint(
                self.step,
                lambda folder: save_model(model, self.tokenizer, folder, full_state),
                state,
            )
        self.last_checkpoint_step = self.step
        ctx.barrier()

    def _resume_hint(self) -> str:
        kept = self.run.latest_checkpoint()
        if kept is None:
            return f"no checkpoint was written in {self.run.path}"
        return (
            f"its checkpoint is {kept}: continue with `prosparse-fx sparsify --resume "
            f"{self.run.path}`"
        )

    def _diverged(self, exc: NonFiniteLossError) -> None:
        """Record a divergence: ``report.json`` says ``"diverged"`` and names the last
        checkpoint with finite weights and loss, which the error's message names too."""
        kept = self.run.latest_checkpoint()
        self.report.update(
            status="diverged",
            diverged_at_step=exc.step,
            last_good_checkpoint=str(kept) if kept else None,
            history=self.history,
            stage_ends=self.stage_ends,
        )
        self.run.write_report(self.report)
        if kept is None:
            where = (
                f"no checkpoint with finite weights was written before step {exc.step}, so "
                "there is nothing to resume"
            )
        else:
            where = f"the last checkpoint with finite weights and loss is {kept}"
        exc.args = (
            f"{exc.args[0]}; {where}. Resuming would repeat the same steps: start a new run "
            "with a lower lr (for example half of it), or lower stage lambdas, with "
            "--overwrite to replace this one",
        )


def _probe_loss(
    train_model: Any, model: Any, probe: torch.Tensor, dtype: torch.dtype | None, ctx: DistContext
) -> float:
    """The LM loss of the current weights on a few held-out windows (NaN if any weight is not
    finite), the same on every process; no gradient, no dropout, the RNG untouched."""
    bad = any(not bool(torch.isfinite(_local(p)).all()) for p in model.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        ):
            loss = float(train_model(input_ids=probe.to(device), labels=probe.to(device)).loss)
    finally:
        model.train(was_training)
    flag, loss = ctx.mean([float(bad), loss])
    return math.nan if flag > 0 else loss


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


class _Stepper:
    """Optimizer facade that also steps the LR schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_sched: Any) -> None:
        self.optimizer = optimizer
        self.lr_sched = lr_sched

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        self.lr_sched.step()
