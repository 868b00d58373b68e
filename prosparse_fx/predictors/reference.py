"""Dense pure-torch references of the predicted ("approximate mode") FFN ops: what a kernel that
reads the gate, up and down rows of the predicted neurons only must compute (Deja Vu,
arXiv 2310.17157; ProSparse Sec. 4 and its appendix on approximate acceleration).

x1 is the exact FFN's x1 on the predicted neurons and 0 elsewhere: a neuron predicted active but
truly inactive still gives 0 (the FATReLU is applied to it), a truly active neuron that is not
predicted is skipped. A NaN or infinite estimate counts as predicted
(:func:`~prosparse_fx.predictors.predicted_active`), so a NaN input gives a NaN output as in the
dense model.
"""

from __future__ import annotations

import torch

from ..kernels.reference import fatrelu_ref
from .predictor import low_rank_estimate, predicted_active


def _skip_unpredicted(x1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x1, torch.zeros((), dtype=x1.dtype, device=x1.device))


def predicted_gated_ffn_reference(
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
    """``(FATReLU_t(x @ w_gate.T) * (x @ w_up.T) * mask) @ w_down_t`` with
    ``mask = x @ a.T @ b.T > cut``; with ``up_relu`` (dReLU) ``ReLU(x @ w_up.T)``.

    Args:
        x: ``[..., d]`` (``[0, d]`` gives ``[0, d_out]``).
        a: ``[rank, d]``; b: ``[d_ff, rank]``: the predictor's factors.
        cut: a neuron is predicted active where its estimate is above ``cut``.
        w_gate, w_up: ``[d_ff, d]`` (``nn.Linear`` layout).
        w_down_t: ``[d_ff, d_out]``, the transpose of ``down_proj.weight``.
        threshold: FATReLU t >= 0 of the gate (0 is ReLU).
        up_relu: ReLU on the up projection too (dReLU, TurboSparse Sec. 3).

    Returns:
        ``[..., d_out]`` in the dtype of ``x``.
    """
    mask = predicted_active(low_rank_estimate(x, a, b), cut)
    gate = fatrelu_ref(x @ w_gate.T, threshold)
    up = x @ w_up.T
    if up_relu:
        up = fatrelu_ref(up, 0.0)
    return _skip_unpredicted(gate * up, mask) @ w_down_t


def predicted_plain_ffn_reference(
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
    """``(FATReLU_t(x @ w1.T + b1) * mask) @ w2_t + b2`` with
    ``mask = x @ a.T @ b.T + pred_bias > cut`` (biases optional).

    Args:
        x: ``[..., d]`` (``[0, d]`` gives ``[0, d_out]``).
        a: ``[rank, d]``; b: ``[d_ff, rank]``; pred_bias: ``[d_ff]`` or ``None`` (fc1's bias).
        cut: a neuron is predicted active where its estimate is above ``cut``.
        w1: ``[d_ff, d]``; b1: ``[d_ff]`` or ``None``.
        w2_t: ``[d_ff, d_out]``; b2: ``[d_out]`` or ``None``.
        threshold: FATReLU t >= 0.

    Returns:
        ``[..., d_out]`` in the dtype of ``x``.
    """
    mask = predicted_active(low_rank_estimate(x, a, b, pred_bias), cut)
    h = x @ w1.T
    if b1 is not None:
        h = h + b1
    y = _skip_unpredicted(fatrelu_ref(h, threshold), mask) @ w2_t
    return y + b2 if b2 is not None else y
