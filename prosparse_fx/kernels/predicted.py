"""The approximate-mode FFN op: ``torch.ops.prosparse.predicted_gated_ffn``.

A predictor's low-rank estimate ``x @ a.T @ b.T`` guesses each token's active neurons before
the gate is computed. Gate, up and down are then read only on the predicted rows (Deja Vu, Liu
et al. 2023, arXiv 2310.17157; ProSparse Sec. 4 and its appendix on approximate acceleration).
FATReLU still applies on those rows, so a neuron predicted active but truly inactive contributes
exactly 0. A truly active neuron the predictor misses is the only approximation. The dense
reference is :func:`prosparse_fx.predictors.predicted_gated_ffn_reference`.

Implementations: CPU (:func:`prosparse_fx.kernels.cpu.predicted_gated_ffn`, one C++ call for
up to ``CPP_MAX_TOKENS`` float32 tokens), the reference elsewhere (no Triton kernel yet), and a
fake one for torch.export and torch.compile.
"""

from __future__ import annotations

import math

import torch

from ..predictors.reference import predicted_gated_ffn_reference
from . import cpu
from .ops import check_gated


def check_predicted_gated(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cut: float,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> None:
    """Raise a ValueError/TypeError naming the first argument whose shape, dtype, device or
    value is off (the FFN's as :func:`~prosparse_fx.kernels.check_gated`)."""
    check_gated(x, w_gate, w_up, w_down_t, threshold, up_relu)
    d_ff, d = w_gate.shape
    for name, t in (("a", a), ("b", b)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"predictor factor {name} has dtype {t.dtype}; it must be floating")
        if t.device != x.device:
            raise ValueError(f"predictor factor {name} is on {t.device} but x is on {x.device}")
    if a.dim() != 2 or a.shape[1] != d or a.shape[0] < 1:
        raise ValueError(f"a must have shape [rank, {d}] (rank >= 1), got {list(a.shape)}")
    if tuple(b.shape) != (d_ff, a.shape[0]):
        raise ValueError(
            f"b must have shape [{d_ff}, {a.shape[0]}] (d_ff, rank), got {list(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"predictor factors a ({a.dtype}) and b ({b.dtype}) differ in dtype")
    if isinstance(cut, bool) or not isinstance(cut, (int, float)) or math.isnan(cut):
        raise ValueError(f"cut must be a number (the estimate's threshold), got {cut!r}")


@torch.library.custom_op("prosparse::predicted_gated_ffn", mutates_args=())
def predicted_gated_ffn(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cut: float,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> torch.Tensor:
    """Gated FFN on the neurons a low-rank predictor guesses active (approximate mode).

    Computes ``(FATReLU_t(x @ w_gate.T) * (x @ w_up.T) * m) @ w_down_t``. Here
    ``m = x @ a.T @ b.T > cut`` is computed in the factors' dtype and compared in float32; a
    non-finite estimate counts as predicted, so a NaN input gives a NaN output as in the dense
    model. With ``up_relu`` (dReLU, TurboSparse Sec. 3) it is ``ReLU(x @ w_up.T)``.

    Args:
        x: ``[..., d]`` float32, float16 or bfloat16 (any number of leading dims, also 0).
        a: ``[rank, d]``; b: ``[d_ff, rank]``: the predictor's factors (floating, one dtype, on
            x's device; :class:`~prosparse_fx.predictors.Predictor`).
        cut: a neuron is predicted active where its estimate is above ``cut`` (gate
            pre-activation units).
        w_gate, w_up: ``[d_ff, d]`` (``nn.Linear`` layout), same dtype and device as ``x``.
        w_down_t: ``[d_ff, d_out]``, the transpose of ``down_proj.weight``.
        threshold: FATReLU t >= 0 of the gate (0 is ReLU).
        up_relu: ReLU on the up projection too (dReLU). Default ``False``.

    Returns:
        ``[..., d_out]``, dtype of ``x``.

    Raises:
        ValueError: a shape, device or value mismatch (naming the argument and what it must
            be), ``d == 0``, ``threshold < 0`` or a NaN ``cut``.
        TypeError: a dtype mismatch, or a dtype that is not floating point.
    """
    check_predicted_gated(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)
    return predicted_gated_ffn_reference(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)


@predicted_gated_ffn.register_fake
def _fake(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu=False):  # noqa: ANN001, ANN202
    check_predicted_gated(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]))


@predicted_gated_ffn.register_kernel("cpu")
def _cpu(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu=False):  # noqa: ANN001, ANN202
    check_predicted_gated(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)
    return cpu.predicted_gated_ffn(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)


__all__ = ["check_predicted_gated", "predicted_gated_ffn"]
