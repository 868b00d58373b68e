"""Distillation from the original model during ProSparse training.

The original (SiLU/GELU) model, before ReLU substitution, is the teacher; the sparsified model
learns from a mix of the LM loss and the KL divergence to the teacher's next-token distribution
at temperature T (Hinton et al. 2015; ReluLLaMA trained its ReLU models this way, the ProSparse
paper did not)::

    task = (1 - mix) * LM + mix * T^2 * mean_tokens KL(softmax(z_teacher / T) || softmax(z / T))

The teacher runs under ``no_grad`` in the training precision, in eval mode. Under torchrun it is
placed like the student (:meth:`~prosparse_fx.training.distributed.DistContext.wrap_frozen`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..environment import available_memory
from ..errors import InputError
from .distributed import DistContext


def check_teacher(teacher: Any, student: Any) -> None:
    """Refuse a teacher that is not the student's architecture and vocabulary: the KL needs the
    same vocabulary, and the teacher is meant to be the student before substitution.

    Raises:
        InputError: different ``model_type``, vocabulary size or hidden size, naming both.
    """
    t, s = teacher.config, student.config
    for field in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        a, b = getattr(t, field, None), getattr(s, field, None)
        if a != b:
            raise InputError(
                f"the distillation teacher's {field} is {a!r}, the student's is {b!r}: the "
                "teacher must be the same architecture and vocabulary as the student (the "
                "original model before ReLU substitution)"
            )


def check_teacher_memory(teacher: Any, ctx: DistContext, device: str) -> None:
    """Refuse distillation before training when the teacher's copy will not fit: each process
    holds a full copy of the teacher's weights while it is placed (under FSDP2 it is then
    sharded), on top of the student, its gradients and AdamW's two moments (4 copies).

    Raises:
        InputError: the free memory of ``device`` (as :func:`~prosparse_fx.environment.
            available_memory` reads it) is below the teacher's bytes plus, under FSDP2, the
            student's training state per process; the message gives both numbers and the ways
            out.
    """
    free = available_memory(device)
    if free is None:
        return
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    shards = ctx.world_size if ctx.sharded else 1
    # the student is already on the device; its gradients and moments are not yet allocated
    needed = teacher_bytes + 3 * teacher_bytes // shards
    if needed > free:
        gib = 2**30
        raise InputError(
            f"distillation needs about {needed / gib:.2f} GiB more on {device} (the teacher, "
            f"{teacher_bytes / gib:.2f} GiB, plus this process's share of the student's "
            f"gradients and optimizer moments), but {free / gib:.2f} GiB are free: set "
            "distill = 0, use more processes with --sharding fsdp, or a device with more memory"
        )


def check_mix(mix: float, temperature: float) -> None:
    """Raise :class:`InputError` unless ``0 <= mix <= 1`` and ``temperature > 0`` (both
    finite)."""
    if not isinstance(mix, (int, float)) or not math.isfinite(mix) or not 0.0 <= mix <= 1.0:
        raise InputError(f"distill (the KL mix) must be a number in [0, 1], got {mix!r}")
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise InputError(f"distill_temperature must be a finite number > 0, got {temperature!r}")


class Distillation:
    """The KL term against a frozen teacher and its mix with the LM loss.

    Args:
        teacher: the original causal LM (same vocabulary as the student); frozen here
            (``requires_grad_(False)``, ``eval()``).
        mix: weight of the KL term in ``[0, 1]`` (the LM loss gets ``1 - mix``).
        temperature: T > 0; the KL is scaled by T^2 so its gradient size does not depend on T.
        autocast_dtype: the training precision (e.g. ``torch.bfloat16``), or ``None``.
        ctx: the torchrun processes; the teacher is placed like the student.

    Raises:
        InputError: a mix outside [0, 1] or a temperature <= 0 (or not finite).
    """

    def __init__(
        self,
        teacher: Any,
        *,
        mix: float,
        temperature: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        check_mix(mix, temperature)
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = (ctx or DistContext()).wrap_frozen(teacher)
        self.mix = float(mix)
        self.temperature = float(temperature)
        self.autocast_dtype = autocast_dtype

    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits ``[B, T, V]`` for ``input_ids`` ``[B, T]`` (int64), under
        ``no_grad`` in the training precision."""
        device = input_ids.device
        dtype = self.autocast_dtype
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        ):
            return self.teacher(input_ids=input_ids).logits

    def kl(self, student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``T^2`` times the mean over tokens of KL(teacher || student) at temperature T, in
        nats, a float32 scalar with the student's gradient.

        Args:
            student_logits: ``[B, T, V]`` logits of the student for ``input_ids``.
            input_ids: ``[B, T]`` token ids (the teacher reads the same tokens).
        """
        t = self.temperature
        teacher = self.teacher_logits(input_ids).float() / t
        student = student_logits.float() / t
        per_token = F.kl_div(
            F.log_softmax(student, dim=-1),
            F.log_softmax(teacher, dim=-1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        return per_token.mean() * (t * t)

    def combine(self, lm_loss: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """``(1 - mix) * lm_loss + mix * kl``."""
        return (1.0 - self.mix) * lm_loss + self.mix * kl
