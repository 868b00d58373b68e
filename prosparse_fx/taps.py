"""Activation taps: where x1 (the down_proj input) is observed, in eager and graph form.

Eager form: forward pre-hooks on each site's down_proj (fc2) module, used by the regularizer,
the sparsity measurement and threshold calibration. Hooks are traced by Dynamo, so they work
under ``torch.compile(fullgraph=True)``. The graph form is
:class:`prosparse_fx.passes.activation_taps.InsertActivationTapsPass`; both compute the L1 of x1
with :func:`activation_l1`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, Protocol

import torch
from torch import nn

from .ffn import FFNSite, resolve_module

L1Norm = Literal["mean", "token_l1", "hoyer"]
L1_NORMS: tuple[str, ...] = ("mean", "token_l1", "hoyer")


def activation_l1(x1: torch.Tensor, norm: L1Norm = "mean") -> torch.Tensor:
    """L1 of one layer's x1 as a 0-dim tensor (the per-layer term of ProSparse's penalty, Sec. 3.2).

    The paper does not state its normalisation. Ours:

    * ``"mean"`` (default): mean of ``|x1|`` over all elements (tokens and neurons), so lambda
      does not depend on the FFN width or the batch size;
    * ``"token_l1"``: the L1 norm over the d_ff neurons, averaged over tokens (``d_ff`` times
      ``"mean"``);
    * ``"hoyer"``: scale-invariant, per token ``||x1||_1 / (sqrt(d_ff) * ||x1||_2)`` averaged
      over tokens (Hoyer's sparsity measure, in ``[1/sqrt(d_ff), 1]``; 0 for an all-zero
      token). Shrinking every activation leaves it unchanged, so it can only be lowered by
      making zeros (issue 14: at small budgets the L1 term was met by shrinking magnitudes).

    The result is float32 whatever the dtype of x1 (bf16 under autocast), so the penalty keeps
    its weight relative to the LM loss.

    Args:
        x1: ``[..., d_ff]`` float tensor, the input of down_proj.
        norm: ``"mean"``, ``"token_l1"`` or ``"hoyer"``.

    An empty x1 (a mixture-of-experts expert that no token reached) gives 0.

    Raises:
        ValueError: unknown ``norm``.
    """
    if x1.numel() == 0:  # an expert no token was routed to: no activation, no penalty
        return x1.abs().sum(dtype=torch.float32)
    if norm == "mean":
        return x1.abs().mean(dtype=torch.float32)
    if norm == "token_l1":
        return x1.abs().sum(-1, dtype=torch.float32).mean()
    if norm == "hoyer":
        x = x1.float()
        l1 = x.abs().sum(-1)
        # the tiny floor keeps an all-zero token at 0 with a finite gradient
        l2 = torch.sqrt((x * x).sum(-1) + 1e-20)
        return (l1 / (l2 * math.sqrt(x.shape[-1]))).mean()
    raise ValueError(f"unknown L1 normalisation {norm!r}; choose one of {', '.join(L1_NORMS)}")


def zero_fraction(x1: torch.Tensor) -> torch.Tensor:
    """Fraction of exact zeros in x1 (0-dim float32, no gradient): the activation sparsity of
    one layer on one forward; NaN for an empty x1 (an expert that no token reached)."""
    return (x1.detach() == 0).float().mean()


class TapSink(Protocol):
    """Receives the graph taps of one FFN site (see :func:`register_sink`)."""

    norm: L1Norm

    def receive(self, i: int, l1: torch.Tensor, zeros: torch.Tensor) -> None: ...


# down_proj weight (by identity) -> (sink, site index); how graph taps find their regularizer.
_SINKS: dict[int, tuple[weakref.ref, weakref.ref, int]] = {}


def register_sink(weight: torch.Tensor, sink: TapSink, i: int) -> None:
    """Route the graph taps of the FFN site whose down_proj weight is ``weight`` to
    ``sink.receive(i, ...)``. Graphs compiled by the ``prosparse`` backend look sinks up by the
    identity of that weight, so a sink follows its model, not its module paths."""
    _SINKS[id(weight)] = (weakref.ref(weight), weakref.ref(sink), i)


def unregister_sink(weight: torch.Tensor, sink: TapSink) -> None:
    """Undo :func:`register_sink` (only if ``sink`` is still the one registered)."""
    entry = _SINKS.get(id(weight))
    if entry is not None and entry[1]() is sink:
        del _SINKS[id(weight)]


def sink_for(weight: torch.Tensor) -> tuple[TapSink, int] | None:
    """The live sink and site index registered for ``weight``, or ``None``."""
    entry = _SINKS.get(id(weight))
    if entry is None:
        return None
    w, sink, i = entry[0](), entry[1](), entry[2]
    if w is not weight or sink is None:
        return None
    return sink, i


def in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread.

    A module forward seen then is activation checkpointing's recompute
    (``torch.utils.checkpoint``, reentrant or not: both rerun the checkpointed forward from inside
    the backward), not a new forward of the model. Inside a graph being compiled this is ``False``:
    there checkpointing is a higher-order op whose recompute does not rerun Python hooks.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


@contextmanager
def tap_inputs(
    model: nn.Module,
    paths: Sequence[str | FFNSite],
    fn: Callable[[int, torch.Tensor], None],
    *,
    on_recompute: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Call ``fn(i, x)`` with the first input of module ``paths[i]`` on every forward.

    An entry that is an expert site (:attr:`FFNSite.expert`, as :func:`down_paths` gives for
    mixture-of-experts layers) is tapped through :func:`prosparse_fx.moe.expert_taps`: ``fn``
    gets that expert's x1, ``[n_e, d_ff]`` with ``n_e`` the tokens routed to it (maybe 0).

    Forwards that run inside a backward (:func:`in_backward`: activation checkpointing's
    recompute) are not forwards of the model: ``fn`` is not called for them, so each forward is
    seen once whether or not the model uses gradient checkpointing; ``on_recompute(i, x)`` is
    called instead when given.

    Raises:
        LookupError: a path is not a submodule of ``model``.
    """
    from .moe import expert_taps

    def seen(i: int, x: torch.Tensor) -> None:
        if in_backward():
            if on_recompute is not None:
                on_recompute(i, x)
            return
        fn(i, x)

    experts = [(i, p) for i, p in enumerate(paths) if isinstance(p, FFNSite)]
    handles = []
    try:
        for i, path in enumerate(paths):
            if isinstance(path, FFNSite):
                continue
            module = resolve_module(model, path)

            def hook(_mod: nn.Module, args: tuple, _i: int = i) -> None:
                seen(_i, args[0])

            handles.append(module.register_forward_pre_hook(hook))
        with expert_taps(model, experts, seen):
            yield
    finally:
        for h in handles:
            h.remove()


def run_tapped(
    model: nn.Module,
    windows: torch.Tensor,
    paths: Sequence[str | FFNSite],
    fn: Callable[[int, torch.Tensor], None],
    batch_size: int,
) -> None:
    """Run ``windows`` (``[N, T]`` token ids) through ``model`` in eval mode, ``batch_size``
    windows at a time on the model's device, with :func:`tap_inputs` calling ``fn``; the
    model's training mode is restored afterwards. Gradient mode is the caller's."""
    modes = [(m, m.training) for m in model.modules()]  # each module's own, restored as it was
    model.eval()
    device = next(model.parameters()).device
    try:
        with tap_inputs(model, paths, fn):
            for batch in windows.split(batch_size):
                model(input_ids=batch.to(device))
    finally:
        for m, training in modes:
            m.training = training


def down_paths(sites: Sequence[FFNSite]) -> list[str | FFNSite]:
    """Where each site's x1 is tapped for :func:`tap_inputs`: the module path of its down_proj
    (fc2), where x1 enters; an expert site itself (its down_proj is a slice of a 3-D
    parameter, not a module)."""
    return [s if s.expert is not None else s.down for s in sites]
