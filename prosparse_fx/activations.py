"""The activations an FFN can be given, as one table: :data:`ACTIVATIONS` (ReLU, FATReLU, dReLU),
one :class:`Activation` record each, read through :func:`get_activation` by ``relufy_``, the
activation-substitution pass and the compile backend's options. Also here: the
``prosparse::fatrelu`` op, the :class:`FATReLU` module, :class:`ReLULinear` (the up projection
of a dReLU FFN), and their names in transformers' ``ACT2FN``.

ReLU replaces SiLU/GELU (ProSparse, Song et al. 2024, Sec. 3.1); FATReLU (Sec. 3.3, Eq. 3) is
``FATReLU_t(x) = x if x >= t else 0``; ``t = 0`` equals ReLU. dReLU (TurboSparse, Song et al.
2024, "Turbo Sparse: Achieving LLM SOTA Performance with Minimal Activated Parameters", Sec. 3)
puts a ReLU on both branches of a gated FFN: ``x1 = ReLU(gate(x)) * ReLU(up(x))``; here the
gate's ReLU may be a FATReLU_t (``t = 0`` is the paper's dReLU), so
``x1 = FATReLU_t(gate(x)) * ReLU(up(x))``, zero wherever the gate is below t or up is <= 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .capture import Dialect, fatrelu_target, relu_target
from .kernels.reference import fatrelu_ref


@torch.library.custom_op("prosparse::fatrelu", mutates_args=())
def fatrelu(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """FATReLU: ``x`` where ``x >= threshold``, else 0 (paper Eq. 3); shape and dtype of ``x``.

    A ``torch.library`` custom op, so torch.export keeps it as one node and the graph passes see
    the threshold as an argument. Its gradient is ``grad * (x >= threshold)``. NaN stays NaN.
    """
    return fatrelu_ref(x, threshold)


@fatrelu.register_fake
def _fatrelu_fake(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.empty_like(x)


def _fatrelu_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, threshold = inputs
    ctx.save_for_backward(x)
    ctx.threshold = threshold


def _fatrelu_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    (x,) = ctx.saved_tensors
    return grad * (x >= ctx.threshold).to(grad.dtype), None


fatrelu.register_autograd(_fatrelu_backward, setup_context=_fatrelu_setup)


def _to_bits(t: float) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.float64).view(torch.int64)


class FATReLU(nn.Module):
    """FATReLU activation module, ``x if x >= threshold else 0`` (paper Eq. 3).

    The threshold is kept twice: as a persistent buffer ``threshold_bits`` (the float64 bit
    pattern as int64, so ``model.to(dtype)`` never rounds it), which ``save_pretrained`` writes
    into the safetensors file and ``from_pretrained`` restores exactly, per layer; and as a
    Python float that the forward passes to ``prosparse::fatrelu`` (so torch.export and
    torch.compile see a constant, not a data-dependent value). The float follows the buffer on
    :meth:`set_threshold`, ``load_state_dict``, ``train()``/``eval()`` (``from_pretrained`` ends
    with ``eval()``) and on any eager forward after the buffer was replaced or changed in place.
    A checkpoint without the buffer (the published ProSparse format) gets its threshold from the
    config's ``hidden_act_param`` on ``from_pretrained``, never uninitialised memory (the hooks in
    :mod:`prosparse_fx.relufy`).

    Args:
        threshold: t >= 0 (float, in the units of the gate pre-activation).

    Raises:
        ValueError: ``threshold`` is negative or not finite.
    """

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("threshold_bits", _to_bits(check_threshold(threshold)))
        self._sync()

    def _sync(self) -> None:
        bits = self.threshold_bits
        if bits.is_meta:  # being built by from_pretrained; weights come later
            self._t, self._synced = 0.0, None
            return
        self._t = check_threshold(float(bits.cpu().view(torch.float64)))
        self._synced = (id(bits), bits._version)

    @property
    def t(self) -> float:
        """The threshold as a Python float."""
        return self._t

    def set_threshold(self, threshold: float) -> None:
        """Change the threshold in place (``threshold >= 0``)."""
        with torch.no_grad():
            self.threshold_bits.copy_(_to_bits(check_threshold(threshold)))
        self._sync()

    def train(self, mode: bool = True) -> FATReLU:
        super().train(mode)
        self._sync()
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self._synced != (
            id(self.threshold_bits),
            self.threshold_bits._version,
        ):
            self._sync()
        return fatrelu(x, self._t)

    def extra_repr(self) -> str:
        return f"threshold={self._t:g}"


def check_threshold(threshold: float) -> float:
    """Validate a FATReLU threshold; return it as a float.

    Raises:
        ValueError: negative, NaN or infinite.
    """
    t = float(threshold)
    if not (t >= 0.0 and t != float("inf")):
        raise ValueError(
            f"FATReLU threshold must be a finite number >= 0, got {threshold!r}; "
            "use 0 for plain ReLU."
        )
    return t


class ReLULinear(nn.Linear):
    """``ReLU(x @ weight.T + bias)``: the up projection of a dReLU FFN (TurboSparse Sec. 3).

    An ``nn.Linear`` whose output goes through ReLU; its parameters and state-dict keys are those
    of the linear it replaces (``relufy_`` changes the class of the existing module in place, so
    ``up_proj.weight`` is saved and loaded under the same name). For a fused gate_up linear
    (Phi-3's ``gate_up_proj``) the ReLU covers the gate rows too, which changes nothing: the
    gate's own ReLU/FATReLU_t (t >= 0) follows, and ``FATReLU_t(ReLU(g)) == FATReLU_t(g)``.

    Shapes and dtypes are those of ``nn.Linear``: ``[..., in_features]`` ->
    ``[..., out_features]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.linear(x, self.weight, self.bias))


@dataclass(frozen=True)
class Activation:
    """One ReLU-family activation an FFN can be given: a row of :data:`ACTIVATIONS`.

    Its ``name`` is the one config value that every entry point takes: ``relufy_(model, name)``,
    ``SubstituteActivationPass(name)``, the ``activation`` option of the ``prosparse``
    torch.compile backend, and the Hugging Face ``hidden_act`` value that a relufied model is saved
    with (transformers' ``ACT2FN[name]`` builds :attr:`module_type`).

    Attributes:
        name: ``"relu"``, ``"fatrelu"`` or ``"drelu"``.
        module_type: the eager module class of the gate's activation (``nn.ReLU``,
            :class:`FATReLU`; dReLU's gate is a :class:`FATReLU`, ``t = 0`` by default).
        graph_target: dialect (``"aten"`` from torch.export, ``"torch"`` from Dynamo) -> the
            callable that a graph node of this activation calls (see :mod:`prosparse_fx.capture`).
        takes_threshold: the module is built as ``module_type(t)`` and the node called as
            ``target(x, t)``; otherwise ``module_type()`` and ``target(x)``.
        exact_zeros: inactive outputs are exactly ``0.0`` (so the sparsity metric counts them and
            the sparse-FFN kernels may skip them).
        hf_param: the config key that holds the threshold in the published ProSparse format
            (``hidden_act_param``); a FATReLU whose threshold is missing from the weights takes it
            from there on ``from_pretrained``. ``None`` when there is no parameter.
        up_relu: the up projection's output goes through a ReLU too (dReLU, TurboSparse Sec. 3):
            only gated FFNs can have it; eagerly the up linear becomes a :class:`ReLULinear`, in
            a graph a ``relu`` node follows it, and the sparse-FFN ops also skip the neurons
            whose up is <= 0.
    """

    name: str
    module_type: type[nn.Module]
    graph_target: Callable[[Dialect], Any]
    takes_threshold: bool
    exact_zeros: bool
    hf_param: str | None
    up_relu: bool = False

    def make_module(self, threshold: float = 0.0) -> nn.Module:
        """A new eager module (on the CPU); ``threshold`` is validated, and ignored for ReLU.

        Raises:
            ValueError: a negative or non-finite ``threshold``.
        """
        t = check_threshold(threshold)
        return self.module_type(t) if self.takes_threshold else self.module_type()

    def graph_args(self, x: Any, threshold: float) -> tuple[Any, ...]:
        """Arguments of :attr:`graph_target` for input node ``x``."""
        return (x, check_threshold(threshold)) if self.takes_threshold else (x,)


# ReLU (ProSparse Sec. 3.1, the substitution), FATReLU (Sec. 3.3, Eq. 3, threshold shifting)
# and dReLU (TurboSparse Sec. 3: ReLU on gate and up; the gate's may be shifted to FATReLU_t).
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", nn.ReLU, relu_target, False, True, None),
        Activation("fatrelu", FATReLU, fatrelu_target, True, True, "hidden_act_param"),
        Activation("drelu", FATReLU, fatrelu_target, True, True, "hidden_act_param", True),
    )
}


def get_activation(name: str) -> Activation:
    """The :class:`Activation` record called ``name``.

    Raises:
        ValueError: ``name`` is not in :data:`ACTIVATIONS`; the message lists the valid names.
    """
    if isinstance(name, str) and name in ACTIVATIONS:
        return ACTIVATIONS[name]
    names = [repr(n) for n in ACTIVATIONS]
    valid = ", ".join(names[:-1]) + " or " + names[-1]
    raise ValueError(f"activation must be {valid}, got {name!r}")


def _register_with_transformers() -> None:
    """Make every activation's ``name`` resolve in transformers' ``ACT2FN`` (``"relu"`` is there
    already), so ``hidden_act="fatrelu"`` (and ``"drelu"``, for the gate) builds a
    :class:`FATReLU`. Its threshold on loading, and dReLU's up ReLU, are set by the hooks in
    :mod:`prosparse_fx.relufy`."""
    try:
        from transformers import activations as hf_activations
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    for a in ACTIVATIONS.values():
        hf_activations.ACT2CLS.setdefault(a.name, a.module_type)
        hf_activations.ACT2FN.setdefault(a.name, a.module_type)


_register_with_transformers()
