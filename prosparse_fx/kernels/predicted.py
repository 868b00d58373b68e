"""The approximate-mode FFN ops: ``torch.ops.prosparse.predicted_gated_ffn`` and its plain-FFN
twin ``predicted_plain_ffn``.

A predictor's low-rank estimate ``x @ a.T @ b.T`` guesses each token's active neurons before
the gate is computed. Gate, up and down are then read only on the predicted rows (Deja Vu, Liu
et al. 2023, arXiv 2310.17157; ProSparse Sec. 4 and its appendix on approximate acceleration).
FATReLU still applies on those rows, so a neuron predicted active but truly inactive contributes
exactly 0. A truly active neuron the predictor misses is the only approximation. The dense
reference is :func:`prosparse_fx.predictors.predicted_gated_ffn_reference`.

Implementations: CPU (:func:`prosparse_fx.kernels.cpu.predicted_gated_ffn`, one C++ call for
up to ``CPP_MAX_TOKENS`` float32 tokens), CUDA through Triton (:mod:`.triton_predicted`: gate,
up and down read only on the predicted rows, for up to 16 tokens in fp32/fp16/bf16), the
reference elsewhere, and a fake one for torch.export and torch.compile.
"""

from __future__ import annotations

import math

import torch

from ..predictors.reference import predicted_gated_ffn_reference, predicted_plain_ffn_reference
from . import cpu
from .ops import check_gated, check_plain


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
    _check_predictor_inputs(x, a, b, None, cut, *w_gate.shape)


def check_predicted_plain(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    pred_bias: torch.Tensor | None,
    cut: float,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float,
) -> None:
    """Raise a ValueError/TypeError naming the first argument whose shape, dtype, device or
    value is off (the FFN's as :func:`~prosparse_fx.kernels.check_plain`)."""
    check_plain(x, w1, b1, w2_t, b2, threshold)
    _check_predictor_inputs(x, a, b, pred_bias, cut, *w1.shape)


def _check_predictor_inputs(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    pred_bias: torch.Tensor | None,
    cut: float,
    d_ff: int,
    d: int,
) -> None:
    """The predictor's arguments of the predicted ops, for an FFN of widths d, d_ff."""
    named = {"a": a, "b": b} if pred_bias is None else {"a": a, "b": b, "pred_bias": pred_bias}
    for name, t in named.items():
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
    if pred_bias is not None and (tuple(pred_bias.shape) != (d_ff,) or pred_bias.dtype != a.dtype):
        raise ValueError(
            f"pred_bias must have shape [{d_ff}] and the factors' dtype {a.dtype}, got "
            f"{list(pred_bias.shape)} {pred_bias.dtype}"
        )
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


@predicted_gated_ffn.register_kernel("cuda")
def _cuda(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu=False):  # noqa: ANN001, ANN202
    check_predicted_gated(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)
    from . import triton_ffn, triton_predicted

    if not triton_ffn.available() or x.dtype not in triton_ffn.DTYPES:
        return predicted_gated_ffn_reference(
            x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu
        )
    return triton_predicted.predicted_gated_ffn(
        x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu
    )


@torch.library.custom_op("prosparse::predicted_plain_ffn", mutates_args=())
def predicted_plain_ffn(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    pred_bias: torch.Tensor | None,
    cut: float,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """Plain FFN on the neurons a low-rank predictor guesses active (approximate mode), the twin
    of :func:`predicted_gated_ffn` for ``fc2(FATReLU_t(fc1(x)))`` (GPT-2, OPT, GPT-NeoX).

    Computes ``(FATReLU_t(x @ w1.T + b1) * m) @ w2_t + b2`` with
    ``m = x @ a.T @ b.T + pred_bias > cut`` (in the factors' dtype, compared in float32; a
    non-finite estimate counts as predicted).

    Args:
        x: ``[..., d]`` float32, float16 or bfloat16.
        a: ``[rank, d]``; b: ``[d_ff, rank]``; pred_bias: ``[d_ff]`` or ``None`` (the
            predictor's bias, in the factors' dtype).
        cut: a neuron is predicted active where its estimate is above ``cut``.
        w1: ``[d_ff, d]``; b1: ``[d_ff]`` or ``None``; w2_t: ``[d_ff, d_out]``; b2: ``[d_out]``
            or ``None``; same dtype and device as ``x``.
        threshold: FATReLU t >= 0 (0 is ReLU).

    Returns:
        ``[..., d_out]``, dtype of ``x``.

    Raises:
        ValueError: a shape, device or value mismatch (naming the argument), ``d == 0``,
            ``threshold < 0`` or a NaN ``cut``.
        TypeError: a dtype mismatch, or a dtype that is not floating point.
    """
    check_predicted_plain(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)
    return predicted_plain_ffn_reference(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)


@predicted_plain_ffn.register_fake
def _fake_plain(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold):  # noqa: ANN001, ANN202
    check_predicted_plain(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)
    return x.new_empty((*x.shape[:-1], w2_t.shape[1]))


@predicted_plain_ffn.register_kernel("cpu")
def _cpu_plain(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold):  # noqa: ANN001, ANN202
    check_predicted_plain(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)
    return cpu.predicted_plain_ffn(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)


@predicted_plain_ffn.register_kernel("cuda")
def _cuda_plain(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold):  # noqa: ANN001, ANN202
    check_predicted_plain(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)
    from . import triton_ffn, triton_predicted

    if not triton_ffn.available() or x.dtype not in triton_ffn.DTYPES:
        return predicted_plain_ffn_reference(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)
    return triton_predicted.predicted_plain_ffn(
        x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold
    )


__all__ = [
    "check_predicted_gated",
    "check_predicted_plain",
    "predicted_gated_ffn",
    "predicted_plain_ffn",
]
