"""Mixture-of-experts FFNs: each expert is an FFN site.

Expert routing is data-dependent (which tokens reach which expert), so an expert's FFN does not
trace like a dense FFN: ``torch.export`` cannot follow transformers' per-expert loop, and in a
Dynamo graph an expert's weights are slices of 3-D parameters picked by the router. Instead of
matching a graph, this module reads the experts protocol that transformers 5 gives every MoE
family (``@use_experts_implementation``: Mixtral, Qwen2-MoE, Qwen3-MoE, ...): an experts module
holds 3-D ``gate_up_proj`` ``[E, 2 d_ff, d]`` (or ``up_proj`` without a gate) and ``down_proj``
``[E, d, d_ff]`` parameters, an ``act_fn`` module, and the flags ``has_gate``, ``has_bias``,
``is_transposed``, ``is_concatenated``. One expert's computation is that of a gated FFN with a
fused gate_up linear, so each expert becomes one :class:`~prosparse_fx.ffn.FFNSite` with
``expert=e``, whose ``path`` is ``"<experts module>.<e>"``.

What works on expert sites: ``relufy_`` (the experts share one ``act_fn``, swapped once; dReLU
also changes the experts module's class so that it computes ``act_fn(gate) * relu(up)``,
:func:`set_experts_up_relu`), the
regularizer's and the measurement's x1 taps (:func:`expert_taps`, one x1 per expert per forward,
computed by the same per-expert loop as transformers' eager implementation) and so
``prosparse-fx sparsify``. The sparse-FFN ops and the graph paths refuse experts by name.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import FFNSite

# activation module class name -> activation kind of an FFNSite
_MODULE_KINDS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "GELUPytorchTanh": "gelu_tanh",
    "ReLU": "relu",
    "FATReLU": "fatrelu",
}


def is_experts_module(module: nn.Module) -> bool:
    """True for a module that follows transformers' experts protocol (3-D expert weights)."""
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(getattr(module, "act_fn", None), nn.Module)
        and hasattr(module, "has_gate")
        and isinstance(up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and up.dim() == 3
        and down.dim() == 3
    )


def _activation_kind(act: nn.Module, up_relu: bool = False) -> tuple[str, float | None]:
    kind, threshold = _gate_kind(act)
    if not up_relu:
        return kind, threshold
    if kind in ("relu", "fatrelu"):
        return "drelu", threshold
    return f"unknown({kind} gate, relu up)", None


def _gate_kind(act: nn.Module) -> tuple[str, float | None]:
    name = type(act).__name__
    kind = _MODULE_KINDS.get(name)
    if kind is None and isinstance(act, nn.GELU):
        kind = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if kind == "fatrelu":
        return kind, float(act.t)
    if kind == "relu":
        return kind, 0.0
    return (kind or f"unknown({name})"), None


def find_expert_sites(model: nn.Module) -> list[FFNSite]:
    """One :class:`FFNSite` per expert of every experts module of ``model``, in module order.

    Returns:
        Sites with ``expert=e``, ``path="<experts module>.<e>"``, ``kind="gated"`` (fused
        gate_up, :attr:`FFNSite.gate_up_split` ``(0, d_ff)``) or ``"plain"`` (no gate), and
        ``activation_module="<experts module>.act_fn"``; empty when there are none.
    """
    sites = []
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        gated = bool(module.has_gate)
        up_name = "gate_up_proj" if gated else "up_proj"
        w_up, w_down = getattr(module, up_name), module.down_proj
        transposed = bool(getattr(module, "is_transposed", False))
        d = int(w_up.shape[1] if transposed else w_up.shape[2])
        d_ff = int(w_down.shape[1] if transposed else w_down.shape[2])
        kind, threshold = _activation_kind(module.act_fn, experts_up_relu(module))
        for e in range(int(w_up.shape[0])):
            sites.append(
                FFNSite(
                    path=f"{path}.{e}",
                    kind="gated" if gated else "plain",
                    gate=f"{path}.{up_name}" if gated else None,
                    up=f"{path}.{up_name}",
                    down=f"{path}.down_proj",
                    activation=kind,
                    activation_module=f"{path}.act_fn",
                    threshold=threshold,
                    hidden_size=d,
                    intermediate_size=d_ff,
                    bias=bool(getattr(module, "has_bias", False)),
                    gate_up_split=(0, d_ff) if gated else None,
                    expert=e,
                )
            )
    return sites


@contextmanager
def traceable_experts(model: nn.Module) -> Iterator[None]:
    """Within the context, the experts modules of ``model`` use transformers' ``batched_mm``
    experts implementation, which has no data-dependent loop, so ``torch.export`` can capture
    the rest of the model (attention, dense and shared-expert FFNs) around them."""
    changed = []
    try:
        for module in model.modules():
            config = getattr(module, "config", None)
            if is_experts_module(module) and hasattr(config, "_experts_implementation"):
                changed.append((config, config._experts_implementation))
                config._experts_implementation = "batched_mm"
        yield
    finally:
        for config, old in reversed(changed):
            config._experts_implementation = old


def experts_path(site: FFNSite) -> str:
    """Module path of the experts module of an expert site."""
    return site.path.rpartition(".")[0]


def _expert_linear(module: nn.Module, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
    weight = getattr(module, name)[e]
    bias = getattr(module, f"{name}_bias")[e] if getattr(module, "has_bias", False) else None
    if getattr(module, "is_transposed", False):
        out = x @ weight
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


_TAPS_ATTR = "_prosparse_expert_taps"


def _eager_experts(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts forward of transformers' eager implementation (a loop over experts), with
    the gate applied by ``self._apply_gate``, calling every registered ``fn(taps[e], x1_e)``
    (see :func:`expert_taps`) with each tapped expert's x1 ``[n_e, d_ff]`` (``n_e`` may be 0)."""
    final = torch.zeros_like(hidden_states)
    gated = bool(self.has_gate)
    up_name = "gate_up_proj" if gated else "up_proj"
    for e in range(getattr(self, up_name).shape[0]):
        token_idx, k_pos = torch.where(top_k_index == e)
        h = _expert_linear(self, hidden_states[token_idx], up_name, e)
        x1 = self._apply_gate(h) if gated else self.act_fn(h)
        for taps, fn in list(getattr(self, _TAPS_ATTR, ())):
            if e in taps:
                fn(taps[e], x1)
        out = _expert_linear(self, x1, "down_proj", e)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights[token_idx, k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _tapped_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """:func:`_eager_experts` bound to ``module``."""
    return types.MethodType(_eager_experts, module)


# --- dReLU experts (TurboSparse Sec. 3): act_fn(gate) * relu(up) ------------------------------

# implementations of transformers' experts interface that apply the gate via self._apply_gate
_GATE_CALLING = ("batched_mm", "grouped_mm")


class DReLUExperts:
    """Mixin of a dReLU experts module: ``_apply_gate`` computes ``act_fn(gate) * relu(up)``
    (TurboSparse Sec. 3) by putting a ReLU on the whole gate_up output before transformers'
    default gate, which is exact since ``act_fn`` is ReLU/FATReLU_t (t >= 0):
    ``FATReLU_t(relu(g)) == FATReLU_t(g)``. The forward runs the implementation the config names
    when it calls ``_apply_gate`` (``batched_mm``, ``grouped_mm``), else the eager loop
    (transformers' own eager loop writes ``act_fn(gate) * up`` inline)."""

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        return super()._apply_gate(torch.relu(gate_up_out))  # type: ignore[misc]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        impl = getattr(getattr(self, "config", None), "_experts_implementation", None)
        if impl in _GATE_CALLING:
            return super().forward(hidden_states, top_k_index, top_k_weights)  # type: ignore[misc]
        return _eager_experts(self, hidden_states, top_k_index, top_k_weights)


_DRELU_CLASSES: dict[type, type] = {}


def experts_up_relu(module: nn.Module) -> bool:
    """True if ``module`` is an experts module made dReLU by :func:`set_experts_up_relu`."""
    return isinstance(module, DReLUExperts)


def check_experts_up_relu(module: nn.Module, path: str) -> None:
    """Raise unless :func:`set_experts_up_relu` can make ``module`` dReLU exactly.

    Raises:
        ValueError: the experts have no gate, or their ``_apply_gate`` is not transformers'
            default ``act_fn(gate) * up`` on concatenated gate/up rows (naming the class).
    """
    from transformers.integrations import moe as hf_moe

    base = _base_class(module)
    default = getattr(hf_moe, "_default_apply_gate", None)
    if not module.has_gate or getattr(base, "_apply_gate", None) is not default:
        raise ValueError(
            f"dReLU cannot be applied exactly to the experts at {path} ({base.__name__}): they "
            "have no gate, or a gate other than transformers' default act_fn(gate) * up. Use "
            "activation 'relu' or 'fatrelu' for this model"
        )


def set_experts_up_relu(module: nn.Module, on: bool) -> None:
    """Make an experts module compute ``act_fn(gate) * relu(up)`` (``on``) or its own
    ``act_fn(gate) * up`` again, in place, by changing its class to (or back from) a subclass
    with the :class:`DReLUExperts` mixin (parameters and state-dict keys stay).

    Raises:
        ValueError: see :func:`check_experts_up_relu` (only when ``on``).
    """
    if not on:
        module.__class__ = _base_class(module)
        return
    if experts_up_relu(module):
        return
    check_experts_up_relu(module, type(module).__name__)
    base = type(module)
    cls = _DRELU_CLASSES.get(base)
    if cls is None:
        cls = type(f"DReLU{base.__name__}", (DReLUExperts, base), {"_prosparse_base": base})
        _DRELU_CLASSES[base] = cls
    module.__class__ = cls


def _base_class(module: nn.Module) -> type:
    """The experts class ``module`` had before :func:`set_experts_up_relu`."""
    return getattr(type(module), "_prosparse_base", type(module))


@contextmanager
def expert_taps(
    model: nn.Module,
    sites: Sequence[tuple[int, FFNSite]],
    fn: Callable[[int, torch.Tensor], None],
) -> Iterator[None]:
    """Call ``fn(i, x1)`` with the x1 of expert site ``site`` on every forward, for each
    ``(i, site)``, while the context is open.

    Each tapped experts module runs transformers' eager per-expert loop (the reference the other
    implementations are checked against), so every tapped expert is seen once per forward, with
    an empty ``[0, d_ff]`` x1 when no token was routed to it. Contexts nest (a regularizer's
    taps and a measurement's at once); the module's own forward returns when the last closes.

    Raises:
        LookupError: a site's experts module is not in ``model``.
    """
    by_module: dict[str, dict[int, int]] = {}
    for i, site in sites:
        assert site.expert is not None
        by_module.setdefault(experts_path(site), {})[site.expert] = i
    added = []
    try:
        for path, taps in by_module.items():
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                raise LookupError(f"experts module {path!r} is not in the model") from exc
            if not hasattr(module, _TAPS_ATTR):
                setattr(module, _TAPS_ATTR, [])
                module.forward = _tapped_forward(module)
            entry = (taps, fn)
            getattr(module, _TAPS_ATTR).append(entry)
            added.append((module, entry))
        yield
    finally:
        for module, entry in reversed(added):
            registered = getattr(module, _TAPS_ATTR)
            registered.remove(entry)
            if not registered:
                delattr(module, _TAPS_ATTR)
                del module.forward
