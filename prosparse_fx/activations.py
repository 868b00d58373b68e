"""ReLU-family activations: the ``prosparse::fatrelu`` op, the :class:`FATReLU` module, and the
``hidden_act="fatrelu"`` entry of transformers' ``ACT2FN`` so saved models reload.

FATReLU (ProSparse, Song et al. 2024, Sec. 3.3, Eq. 3): ``FATReLU_t(x) = x if x >= t else 0``.
``t = 0`` equals ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

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


def _register_with_transformers() -> None:
    """Make ``hidden_act="fatrelu"`` resolve in transformers' ``ACT2FN``."""
    try:
        from transformers import activations as hf_activations
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_activations.ACT2CLS.setdefault("fatrelu", FATReLU)
    hf_activations.ACT2FN.setdefault("fatrelu", FATReLU)


_register_with_transformers()
