"""Refuse FFN activations that Dynamo runs outside the ``prosparse`` backend's graphs.

The backend changes what a model computes only inside the graphs Dynamo hands it. Code that
Dynamo runs eagerly keeps the model's own activation, and graph taps never see it. Three common
cases:

- an activation-checkpointed layer whose body Dynamo cannot trace into one graph (a graph break
  inside it, e.g. from a forward hook). ``torch.utils.checkpoint`` is Dynamo-disabled, so the
  whole layer then runs eagerly;
- a frame past Dynamo's recompile limit;
- a region under ``torch.compiler.disable``.

Left alone, such a layer would keep SiLU while the rest of the model is ReLU: a silently
different model. So when the backend substitutes activations or inserts taps, it watches the
model it compiles. :func:`watch_compiled_model` puts a forward pre-hook on each activation module
that the substitution replaces, and on each module with two or more linear children and no
activation module (an FFN that calls its activation as a function). The hook does nothing
inside a graph being traced, nor in an eager call of the model. It raises
:class:`EagerFallbackError` when the module runs eagerly inside a call of that compiled model.

The compiled model is found on the Python stack: Dynamo's ``compile_wrapper`` frame holds the
callable being compiled (an ``nn.Module``'s bound ``__call__``, or a function whose closure or
globals hold modules) and the callback of that ``torch.compile`` call.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import nn

from .activations import FATReLU

log = logging.getLogger(__name__)

# transformers' ACT2FN names of the activations the substitution replaces (ProSparse Sec. 3.1)
_SOURCE_NAMES = (
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_python",
    "gelu_pytorch_tanh",
    "gelu_accurate",
    "quick_gelu",
    "gelu_10",
)


class EagerFallbackError(RuntimeError):
    """An FFN activation ran eagerly inside a call of a model compiled with the ``prosparse``
    backend, so the backend's substitution or taps did not apply to it."""


def _source_types() -> tuple[type[nn.Module], ...]:
    """Module classes of the SiLU/GELU-family activations the substitution replaces."""
    types: list[type[nn.Module]] = [nn.SiLU, nn.GELU]
    try:
        from transformers.activations import ACT2CLS
    except ImportError:  # pragma: no cover - transformers is a dependency
        return tuple(types)
    for name in _SOURCE_NAMES:
        entry = ACT2CLS.get(name)
        cls = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in types:
            types.append(cls)
    return tuple(types)


def watched_types(activation: str | None, regularize: bool) -> tuple[type[nn.Module], ...]:
    """The activation module classes whose eager run would be silently different: the SiLU/GELU
    family when ``activation`` substitutes them; with ``regularize`` also ReLU and FATReLU,
    whose eager run would give the graph taps nothing."""
    types = _source_types() if activation is not None or regularize else ()
    if regularize:
        types = (*types, nn.ReLU, FATReLU)
    return types


@dataclass
class _Watch:
    """One watched activation module: its path in the compiled model, what the backend was asked
    to do, and the ``torch.compile`` callbacks whose calls it must not run eagerly in."""

    path: str
    asked: str
    hub_kernels: bool = False
    callbacks: weakref.WeakSet = field(default_factory=weakref.WeakSet)


_WATCHED: weakref.WeakKeyDictionary[nn.Module, _Watch] = weakref.WeakKeyDictionary()


def _compile_frames() -> Iterator[FrameType]:
    """Dynamo's ``compile_wrapper`` frames on the stack, innermost first."""
    from torch._dynamo import eval_frame

    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename == eval_frame.__file__:
            yield frame
        frame = frame.f_back


def _modules_of(fn: Any) -> list[nn.Module]:
    """The modules a compiled callable runs: the module itself, the owner of a bound method,
    or the modules in a function's closure and in the globals its code names."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    if isinstance(fn, nn.Module):
        return [fn]
    found: list[nn.Module] = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, nn.Module):
            found.append(value)
    code, names = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    for name in code.co_names if code is not None else ():
        if isinstance(names.get(name), nn.Module):
            found.append(names[name])
    return found


def watch_compiled_model(activation: str | None, regularize: bool, threshold: Any = None) -> bool:
    """Watch the activation modules of the model being compiled (called by the backend while
    Dynamo compiles a graph of it).

    Args:
        activation: the backend's ``activation`` option (``None``: no substitution).
        regularize: the backend's ``regularize`` option.
        threshold: the ``threshold`` option, for the error message.

    Returns:
        Whether a compiled model was found on the stack (``False``: nothing could be watched,
        and the backend logs that eager fallbacks of that callable go unchecked).
    """
    types = watched_types(activation, regularize)
    if not types:
        return True
    frame = next(_compile_frames(), None)
    if frame is None:
        return False
    callback, roots = frame.f_locals.get("callback"), _modules_of(frame.f_locals.get("fn"))
    if callback is None or not roots:
        return False
    parts = [f"activation={activation!r}"] if activation is not None else []
    if activation is not None and threshold not in (None, 0.0):
        parts.append(f"threshold={threshold!r}")
    if regularize:
        parts.append("regularize=True")
    asked = ", ".join(parts)
    for root in roots:
        hub_kernels = _uses_hub_kernels(root)
        for path, module in root.named_modules():
            if not (isinstance(module, types) or _may_call_an_activation(module, types)):
                continue
            watch = _WATCHED.get(module)
            if watch is None:
                watch = _WATCHED[module] = _Watch(path, asked)
                module.register_forward_pre_hook(_refuse_eager_run)
            watch.asked, watch.hub_kernels = asked, hub_kernels
            watch.callbacks.add(callback)
    return True


def _may_call_an_activation(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """A module with two or more linear children and no activation module among them: an FFN
    may call its activation as a function (LFM2's ``w2(F.silu(w1(x)) * w3(x))``), which no
    module hook sees, so the module itself is watched (an attention block matches too: running
    it eagerly inside a compiled call is refused along with its layer)."""
    children = list(module.children())
    linears = sum(isinstance(c, nn.Linear) for c in children)
    return linears >= 2 and not any(isinstance(c, types) for c in children)


def _uses_hub_kernels(root: nn.Module) -> bool:
    """Some layer of ``root`` is wrapped by the ``kernels`` package (transformers >= 5.25 with
    ``kernels`` installed): each call sets a global of that package, a side effect Dynamo does
    not trace inside an activation-checkpointed layer unless told to skip it in the backward."""
    return any("_kernel_funcs" in vars(m) for m in root.modules())


_HUB_KERNELS_HINT = (
    " This model's layers are wrapped by the `kernels` package (transformers >= 5.25), whose "
    "per-call global Dynamo refuses to trace inside a checkpointed layer: with "
    "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True set before "
    "the first call, Dynamo traces the layer and the backend rewrites it."
)


def _refuse_eager_run(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a watched module: raise when it runs eagerly inside a call of the
    compiled model (a no-op while Dynamo traces it, and in eager calls of the model)."""
    if torch.compiler.is_compiling():
        return
    watch = _WATCHED.get(module)
    if watch is None:
        return
    for frame in _compile_frames():
        if frame.f_locals.get("callback") in watch.callbacks:
            raise EagerFallbackError(
                f"{watch.path} ({type(module).__name__}) ran eagerly inside a call of the model "
                f"compiled with backend='prosparse' (options {watch.asked}): Dynamo left it out "
                "of the compiled graphs (a graph break inside an activation-checkpointed layer "
                "makes Dynamo run the whole layer eagerly; so do the recompile limit and "
                "torch.compiler.disable), so the FFN activations run there would keep the "
                "model's own and the model would silently differ. Run with "
                "TORCH_LOGS=graph_breaks to see the break. To go on, apply the activation "
                "eagerly before compiling "
                "(prosparse_fx.relufy_(model, ...), exact on every path; with taps, "
                "ActivationRegularizer(model, schedule) with hook taps), or remove the cause of "
                "the break." + (_HUB_KERNELS_HINT if watch.hub_kernels else "")
            )


__all__ = ["EagerFallbackError", "watch_compiled_model", "watched_types"]
