"""Smooth ReLU substitution: the original activation blends into ReLU over the first steps of
training instead of being swapped at once.

ProSparse (Sec. 3.1) swaps SiLU/GELU for ReLU before training and argues against "radical
shifts in activation distributions" for the penalty (Sec. 3.2); the swap itself is the most
radical shift of all (SmolLM2's perplexity goes from 23 to thousands). Here, for steps
``1..steps`` each FFN computes::

    act_s(x) = (1 - beta_s) * original(x) + beta_s * relu_t(x),   beta_s = min(1, s / steps)

where ``relu_t`` is the ReLU/FATReLU module :func:`~prosparse_fx.relufy.relufy_` put in place,
so from step ``steps`` on the model is exactly the ReLU model. It works through forward hooks
on the activation modules: the state dict, the saved config and the FFN-site analysis are those
of the ReLU model throughout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

ORIGINAL_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}
"""The activations a smooth substitution can start from, by :class:`~prosparse_fx.ffn.FFNSite`
activation kind."""


class SmoothSubstitution:
    """Blend each FFN's original activation into its ReLU over ``steps`` optimizer steps.

    Use as a context manager around training and call :meth:`set_step` before each forward.

    Args:
        model: the model after ``relufy_`` (its activation modules are ReLU/FATReLU).
        activation_modules: module path of each FFN's activation module.
        originals: each FFN's original activation kind (``"silu"``, ``"gelu"``,
            ``"gelu_tanh"``), as :func:`~prosparse_fx.ffn.find_ffn_sites` reported it before
            ``relufy_``.
        steps: optimizer steps of the blend (>= 1).

    Raises:
        InputError: an original activation with no blend (e.g. already ReLU), a count that
            does not match, or ``steps`` < 1.
    """

    def __init__(
        self,
        model: nn.Module,
        activation_modules: Sequence[str],
        originals: Sequence[str],
        steps: int,
    ) -> None:
        if len(activation_modules) != len(originals):
            raise InputError(
                f"{len(activation_modules)} activation modules but {len(originals)} originals"
            )
        bad = sorted({k for k in originals if k not in ORIGINAL_ACTIVATIONS})
        if bad:
            raise InputError(
                f"smooth substitution starts from {sorted(ORIGINAL_ACTIVATIONS)}, not {bad}; "
                "set substitution = 0 (an abrupt swap)"
            )
        if steps < 1:
            raise InputError(f"a smooth substitution needs >= 1 step, got {steps}")
        self.model = model
        self.paths = list(activation_modules)
        self.originals = [ORIGINAL_ACTIVATIONS[k] for k in originals]
        self.steps = steps
        self.beta = 1.0
        self._handles: list[Any] = []

    def set_step(self, step: int) -> None:
        """Blend for optimizer step ``step`` (1-based): ``beta = min(1, step / steps)``."""
        self.beta = min(1.0, step / self.steps)

    def __enter__(self) -> SmoothSubstitution:
        modules = dict(self.model.named_modules())
        for path, original in zip(self.paths, self.originals):
            hook = functools.partial(self._blend, original)
            self._handles.append(modules[path].register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _blend(
        self,
        original: Callable[[torch.Tensor], torch.Tensor],
        module: nn.Module,
        args: tuple,
        output: torch.Tensor,
    ) -> torch.Tensor | None:
        beta = self.beta
        if beta >= 1.0:
            return None  # the ReLU model itself
        return (1.0 - beta) * original(args[0]) + beta * output
