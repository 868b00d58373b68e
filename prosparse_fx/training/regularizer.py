"""The activation regularizer: lambda(t) * sum over FFN layers of L1(x1) (ProSparse Sec. 3.2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..ffn import FFNSite, find_ffn_sites, resolve_module
from ..taps import (
    L1_NORMS,
    L1Norm,
    activation_l1,
    down_paths,
    register_sink,
    tap_inputs,
    unregister_sink,
    zero_fraction,
)

TAP_SOURCES = ("hooks", "graph")


class ActivationRegularizer:
    """Adds ``lambda(step) * sum_layers L1(x1)`` to a loss; x1 is each FFN's down_proj input.

    Hooks on the down_proj (fc2) of every FFN site record L1(x1) (:func:`activation_l1`, default:
    mean |x1| per layer, summed over layers) and the fraction of exact zeros on every forward;
    :meth:`penalty` turns what was recorded since its last call into the penalty. Works under
    ``torch.compile(fullgraph=True)``. Use in a plain loop::

        reg = ActivationRegularizer(model, ProSparseSchedule.from_stages(stages))
        loss = model(**batch).loss + reg.penalty(step)

    With ``taps="graph"`` there are no hooks: the values come from a model compiled by the
    ``prosparse`` backend with ``options={"regularize": True}``, whose graph computes them as
    extra outputs (:mod:`prosparse_fx.backend`); create the regularizer before the first call::

        reg = ActivationRegularizer(model, schedule, taps="graph")
        compiled = torch.compile(model, backend="prosparse",
                                 options={"activation": "relu", "regularize": True})
        loss = compiled(**batch).loss + reg.penalty(step)

    lambda is held in a 0-dim float32 tensor updated in place, so code that compiles the penalty
    too is not recompiled when the schedule moves lambda.

    Args:
        model: the (relufied) model; hooks are added to it until :meth:`remove`.
        schedule: callable ``step -> lambda`` (:class:`ProSparseSchedule`) or a constant float.
        norm: ``"mean"``, ``"token_l1"`` or ``"hoyer"`` (see :func:`activation_l1`).
        sites: FFN sites (found by capture when ``None``).
        taps: ``"hooks"`` (eager forward pre-hooks on each down_proj) or ``"graph"`` (fed by
            the ``prosparse`` compile backend).

    Raises:
        ValueError: unknown ``norm`` or ``taps``.
        FFNNotFoundError: the model has no FFN.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Callable[[int], float] | float = 0.0,
        *,
        norm: L1Norm = "mean",
        sites: Sequence[FFNSite] | None = None,
        taps: Literal["hooks", "graph"] = "hooks",
    ) -> None:
        if norm not in L1_NORMS:
            raise ValueError(f"unknown L1 normalisation {norm!r}; choose one of {L1_NORMS}")
        if taps not in TAP_SOURCES:
            raise ValueError(f"unknown taps source {taps!r}; choose one of {TAP_SOURCES}")
        self.sites = list(sites) if sites is not None else find_ffn_sites(model)
        self.schedule = schedule if callable(schedule) else (lambda _step, _c=float(schedule): _c)
        self.norm = norm
        self._l1: list[list[torch.Tensor]] = [[] for _ in self.sites]
        self._zero: list[list[torch.Tensor]] = [[] for _ in self.sites]
        self.last_lambda = 0.0
        self.last_l1: list[float] = [0.0] * len(self.sites)
        self.last_sparsity: list[float] = [0.0] * len(self.sites)
        self.taps = taps
        self._lambda = torch.zeros((), dtype=torch.float32)
        self._weights: list[torch.Tensor] = []
        self._ctx = None
        # per site: did its last forward run with gradients disabled (see _recomputed)
        self._forward_without_grad = [False] * len(self.sites)
        if taps == "hooks":
            self._ctx = tap_inputs(
                model, down_paths(self.sites), self._record, on_recompute=self._recomputed
            )
            self._ctx.__enter__()
        else:
            experts = [s.path for s in self.sites if s.expert is not None]
            if experts:
                raise ValueError(
                    f"taps='graph' cannot reach the experts of a mixture-of-experts layer "
                    f"({', '.join(experts[:2])} ...): the compile backend does not rewrite "
                    "them. Use taps='hooks' (the default) and train the model eagerly"
                )
            for i, site in enumerate(self.sites):
                weight = resolve_module(model, site.down).weight
                register_sink(weight, self, i)
                self._weights.append(weight)

    def _record(self, i: int, x1: torch.Tensor) -> None:
        self._forward_without_grad[i] = not torch.is_grad_enabled()
        self.receive(i, activation_l1(x1, self.norm), zero_fraction(x1))

    def _recomputed(self, i: int, x1: torch.Tensor) -> None:
        """Site ``i`` recomputed by gradient checkpointing inside the backward: not a new forward,
        so nothing is recorded. The L1 is computed again and dropped: its ops saved x1 for their
        backward inside the checkpointed region, so the recompute must save them again (the
        checkpoint checks that it does, and the penalty's backward reads them from it).

        Raises:
            RuntimeError: the forward ran without gradients, i.e. reentrant checkpointing (its
                forward runs under ``no_grad``): the L1 recorded then has no gradient and the
                penalty would not reach the FFN weights.
        """
        if self._forward_without_grad[i]:
            raise RuntimeError(
                "ActivationRegularizer: this model uses reentrant gradient checkpointing "
                "(torch.utils.checkpoint with use_reentrant=True), which runs the checkpointed "
                "forward without gradients, so the sparsity penalty would have no gradient; use "
                "non-reentrant checkpointing: model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False}) (the default of "
                "transformers 5), or TrainingArguments(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})"
            )
        activation_l1(x1, self.norm)

    def receive(self, i: int, l1: torch.Tensor, zeros: torch.Tensor) -> None:
        """Record site ``i``'s L1(x1) (0-dim, with gradient) and fraction of zeros of one forward.

        Called by the hooks, or by a graph compiled by the ``prosparse`` backend.
        """
        self._l1[i].append(l1)
        self._zero[i].append(zeros)

    def l1(self) -> torch.Tensor:
        """Sum over layers of L1(x1), averaged over the forwards since the last :meth:`penalty`.

        Raises:
            RuntimeError: no forward pass was recorded.
        """
        if not self._l1 or not self._l1[0]:
            if self.taps == "graph":
                raise RuntimeError(
                    "no activations recorded: with taps='graph' they come only from the model "
                    "compiled with torch.compile(..., backend='prosparse', options={'regularize': "
                    "True}); call that compiled model (not the eager one) before penalty()"
                )
            raise RuntimeError(
                "no activations recorded: run a forward pass of the model before penalty()"
            )
        per_layer = [torch.stack(v).mean() for v in self._l1]
        self.last_l1 = [float(v.detach()) for v in per_layer]
        # nanmean: an expert that no token reached has no fraction of zeros in that forward
        self.last_sparsity = [float(torch.stack(v).nanmean()) for v in self._zero]
        for v in self._l1 + self._zero:
            v.clear()
        return torch.stack(per_layer).sum()

    def penalty(self, step: int = 0) -> torch.Tensor:
        """``lambda(step) * l1()``, a 0-dim tensor with gradient; clears the recorded values."""
        self.last_lambda = float(self.schedule(step))
        l1 = self.l1()
        if self._lambda.device != l1.device:
            self._lambda = self._lambda.to(l1.device)
        # a lambda beyond float32's range is inf, as it would be in the float32 product
        big = abs(self.last_lambda) > torch.finfo(torch.float32).max
        self._lambda.fill_(math.copysign(math.inf, self.last_lambda) if big else self.last_lambda)
        return self._lambda * l1

    @property
    def sparsity(self) -> float:
        """Mean fraction of exact zeros in x1 over layers, at the last :meth:`penalty` call."""
        return sum(self.last_sparsity) / max(len(self.last_sparsity), 1)

    def clear(self) -> None:
        """Drop what was recorded (e.g. after an evaluation forward)."""
        for v in self._l1 + self._zero:
            v.clear()

    def remove(self) -> None:
        """Remove the hooks from the model (or stop receiving graph taps)."""
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        for weight in self._weights:
            unregister_sink(weight, self)
        self._weights = []

    def __enter__(self) -> ActivationRegularizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
