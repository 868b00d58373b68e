"""ProSparse in ``transformers.Trainer``: the penalty through ``compute_loss_func``, lambda stepped
and logged by a callback (ProSparse Sec. 3.2, Algorithm 1).

    reg = ActivationRegularizer(model, ProSparseSchedule.from_stages(stages))
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    ProSparseTrainerPlugin(reg).attach(trainer)
    trainer.train()
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distill import Distillation
from .regularizer import ActivationRegularizer


class ProSparseTrainerPlugin(TrainerCallback):
    """Adds ``lambda(step) * sum_layers L1(x1)`` to a ``Trainer``'s loss and logs it.

    :meth:`attach` makes the plugin the Trainer's ``compute_loss_func`` (the LM loss is the
    model's own ``loss_function``, normalised by the Trainer's ``num_items_in_batch``) and its
    first callback, so that ``lambda``, the L1 term and the running sparsity of x1 are in the
    logs before any ``report_to`` logger sees them (keys ``prosparse/lambda``, ``prosparse/l1``,
    ``prosparse/sparsity``, averaged over the optimizer steps since the last log).

    Evaluation: ``eval_loss`` is the LM loss alone (the penalty is a training term), so it
    stays comparable as lambda rises.

    Weighting: lambda is read at the optimizer step being computed (``global_step + 1``). Under
    gradient accumulation over k micro-batches each micro-batch adds ``penalty / k``, and under
    data parallelism the Trainer's scaling of the returned loss by the number of processes is
    undone for the penalty, so its weight relative to the LM loss is that of one full batch on
    one process (the L1 term is a mean over tokens, as in the eager loop).

    Args:
        regularizer: an :class:`ActivationRegularizer` on the model the Trainer trains.
        distillation: optional :class:`~prosparse_fx.training.distill.Distillation` from the
            original model: the task loss becomes ``(1 - mix) * LM + mix * KL`` (as in the
            library loop); the teacher reads the ``input_ids`` of each training forward
            (captured by a forward pre-hook), and ``prosparse/kl`` is logged.

    Gradient checkpointing (``gradient_checkpointing=True``): the penalty and its gradients are
    those of a run without it (the taps ignore the backward's recompute); only non-reentrant
    checkpointing, the default of transformers 5, is supported.

    Raises:
        ValueError (from :meth:`attach` and at the start of training): the Trainer already has a
            ``compute_loss_func`` or a label smoother, which the plugin would silently replace; or
            its arguments ask for reentrant gradient checkpointing, under which the penalty would
            have no gradient.
    """

    def __init__(
        self, regularizer: ActivationRegularizer, distillation: Distillation | None = None
    ) -> None:
        self.regularizer = regularizer
        self.distillation = distillation
        self.trainer: Trainer | None = None
        self._step = 1
        self._logged: list[tuple[float, ...]] = []
        self._input_ids: torch.Tensor | None = None

    def attach(self, trainer: Trainer) -> ProSparseTrainerPlugin:
        """Install the plugin in ``trainer``; returns ``self``."""
        if self.trainer is not None:
            raise ValueError("this ProSparseTrainerPlugin is already attached to a Trainer")
        if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
            raise ValueError(
                "this Trainer already has a compute_loss_func or label smoothing; the ProSparse "
                "plugin computes the loss itself: remove them, or add reg.penalty(step) to your "
                "own compute_loss_func"
            )
        _refuse_reentrant_checkpointing(trainer.args)
        self.trainer = trainer
        trainer.compute_loss_func = self
        trainer.callback_handler.callbacks.insert(0, self)
        if self.distillation is not None:
            trainer.model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)
        return self

    def _capture_inputs(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids if isinstance(ids, torch.Tensor) else None

    def __call__(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The Trainer's ``compute_loss_func``: LM loss plus the scaled penalty."""
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("call ProSparseTrainerPlugin.attach(trainer) before training")
        model = trainer.accelerator.unwrap_model(trainer.model)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        vocab = model.config.vocab_size
        n_items = num_items_in_batch
        lm = model.loss_function(logits, labels, vocab_size=vocab, num_items_in_batch=n_items)
        if not model.training:
            # evaluation: eval_loss stays the LM loss (comparable across lambda); drop the taps
            self.regularizer.clear()
            return lm
        scale = 1.0 / max(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1, 1)
        if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale /= max(trainer.accelerator.num_processes, 1)
        penalty = self.regularizer.penalty(self._step)
        reg = self.regularizer
        logged: tuple[float, ...] = (reg.last_lambda, sum(reg.last_l1), reg.sparsity)
        if self.distillation is not None:
            if self._input_ids is None:
                raise RuntimeError(
                    "distillation: the model's forward was called without input_ids (inputs_"
                    "embeds?); the teacher needs the token ids"
                )
            kl = self.distillation.kl(logits, self._input_ids)
            lm = self.distillation.combine(lm, kl)
            logged = (*logged, float(kl.detach()))
        self._logged.append(logged)
        return lm + scale * penalty

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.trainer is None:
            raise RuntimeError(
                "ProSparseTrainerPlugin was passed as a callback but not attached: the penalty "
                "would not be applied; call ProSparseTrainerPlugin(reg).attach(trainer) instead"
            )
        _refuse_reentrant_checkpointing(args)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._step = state.global_step + 1

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs is None or not self._logged:
            return
        n = len(self._logged)
        logs["prosparse/lambda"] = self._logged[-1][0]
        logs["prosparse/l1"] = sum(v[1] for v in self._logged) / n
        logs["prosparse/sparsity"] = sum(v[2] for v in self._logged) / n
        if self.distillation is not None:
            logs["prosparse/kl"] = sum(v[3] for v in self._logged) / n
        self._logged.clear()


def _refuse_reentrant_checkpointing(args: TrainingArguments) -> None:
    """Reentrant checkpointing runs the checkpointed forward under ``no_grad``: the taps would
    see x1 without gradient and the penalty would not train the FFNs."""
    enabled = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    kwargs = kwargs or args.gradient_checkpointing_kwargs or {}
    if enabled and isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
        raise ValueError(
            "ProSparse plugin: gradient checkpointing with use_reentrant=True runs the "
            "checkpointed forward without gradients, so the sparsity penalty would have no "
            "gradient; set gradient_checkpointing_kwargs={'use_reentrant': False} (the default of "
            "transformers 5) or remove use_reentrant"
        )
