"""The activation regularizer: lambda(t) * sum over FFN layers of L1(x1) (ProSparse Sec. 3.2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..ffn import FFNSite, find_ffn_sites
from ..taps import L1_NORMS, L1Norm, activation_l1, down_paths, tap_inputs


class ActivationRegularizer:
    """Adds ``lambda(step) * sum_layers L1(x1)`` to a loss; x1 is each FFN's down_proj input.

    Hooks on the down_proj (fc2) of every FFN site record L1(x1) (:func:`activation_l1`, default:
    mean |x1| per layer, summed over layers) and the fraction of exact zeros on every forward;
    :meth:`penalty` turns what was recorded since its last call into the penalty. Works under
    ``torch.compile(fullgraph=True)``. Use in a plain loop::

        reg = ActivationRegularizer(model, ProSparseSchedule.from_stages(stages))
        loss = model(**batch).loss + reg.penalty(step)

    Args:
        model: the (relufied) model; hooks are added to it until :meth:`remove`.
        schedule: callable ``step -> lambda`` (:class:`ProSparseSchedule`) or a constant float.
        norm: ``"mean"`` or ``"token_l1"`` (see :func:`activation_l1`).
        sites: FFN sites (found by capture when ``None``).

    Raises:
        ValueError: unknown ``norm``.
        FFNNotFoundError: the model has no FFN.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Callable[[int], float] | float = 0.0,
        *,
        norm: L1Norm = "mean",
        sites: Sequence[FFNSite] | None = None,
    ) -> None:
        if norm not in L1_NORMS:
            raise ValueError(f"unknown L1 normalisation {norm!r}; choose one of {L1_NORMS}")
        self.sites = list(sites) if sites is not None else find_ffn_sites(model)
        self.schedule = schedule if callable(schedule) else (lambda _step, _c=float(schedule): _c)
        self.norm = norm
        self._l1: list[list[torch.Tensor]] = [[] for _ in self.sites]
        self._zero: list[list[torch.Tensor]] = [[] for _ in self.sites]
        self.last_lambda = 0.0
        self.last_l1: list[float] = [0.0] * len(self.sites)
        self.last_sparsity: list[float] = [0.0] * len(self.sites)
        self._ctx = tap_inputs(model, down_paths(self.sites), self._record)
        self._ctx.__enter__()

    def _record(self, i: int, x1: torch.Tensor) -> None:
        self._l1[i].append(activation_l1(x1, self.norm))
        self._zero[i].append((x1.detach() == 0).float().mean())

    def l1(self) -> torch.Tensor:
        """Sum over layers of L1(x1), averaged over the forwards since the last :meth:`penalty`.

        Raises:
            RuntimeError: no forward pass was recorded.
        """
        if not self._l1 or not self._l1[0]:
            raise RuntimeError(
                "no activations recorded: run a forward pass of the model before penalty()"
            )
        per_layer = [torch.stack(v).mean() for v in self._l1]
        self.last_l1 = [float(v.detach()) for v in per_layer]
        self.last_sparsity = [float(torch.stack(v).mean()) for v in self._zero]
        for v in self._l1 + self._zero:
            v.clear()
        return torch.stack(per_layer).sum()

    def penalty(self, step: int = 0) -> torch.Tensor:
        """``lambda(step) * l1()``, a 0-dim tensor with gradient; clears the recorded values."""
        self.last_lambda = float(self.schedule(step))
        return self.last_lambda * self.l1()

    @property
    def sparsity(self) -> float:
        """Mean fraction of exact zeros in x1 over layers, at the last :meth:`penalty` call."""
        return sum(self.last_sparsity) / max(len(self.last_sparsity), 1)

    def clear(self) -> None:
        """Drop what was recorded (e.g. after an evaluation forward)."""
        for v in self._l1 + self._zero:
            v.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        self._ctx.__exit__(None, None, None)

    def __enter__(self) -> ActivationRegularizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
