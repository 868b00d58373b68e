"""Dense pure-torch references of the sparse-FFN ops: what every implementation must compute.

FATReLU_t(z) = z where z >= t, else 0 (ProSparse Eq. 3); written as "zero where z < t" so NaN
propagates as in the dense model. dReLU (TurboSparse, Song et al. 2024, Sec. 3) also puts a ReLU
on the up projection: ``x1 = FATReLU_t(gate) * ReLU(up)`` (``up_relu=True``).
"""

from __future__ import annotations

import torch


def fatrelu_ref(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """``z`` where ``z >= threshold`` (and where ``z`` is NaN), else 0."""
    return torch.where(z < threshold, torch.zeros((), dtype=z.dtype, device=z.device), z)


def gated_ffn_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> torch.Tensor:
    """``(FATReLU_t(x @ w_gate.T) * (x @ w_up.T)) @ w_down_t``; with ``up_relu`` (dReLU)
    ``(FATReLU_t(x @ w_gate.T) * ReLU(x @ w_up.T)) @ w_down_t``.

    Args:
        x: ``[..., d]``.
        w_gate, w_up: ``[d_ff, d]`` (``nn.Linear`` layout).
        w_down_t: ``[d_ff, d_out]``, the transpose of ``down_proj.weight``.
        threshold: t >= 0 (0 is ReLU).
        up_relu: ReLU on the up projection too (dReLU, TurboSparse Sec. 3).

    Returns:
        ``[..., d_out]`` in the dtype of ``x``.
    """
    gate = fatrelu_ref(x @ w_gate.T, threshold)
    up = x @ w_up.T
    if up_relu:
        up = fatrelu_ref(up, 0.0)
    return (gate * up) @ w_down_t


def plain_ffn_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """``FATReLU_t(x @ w1.T + b1) @ w2_t + b2`` (biases optional).

    Args:
        x: ``[..., d]``.
        w1: ``[d_ff, d]``; b1: ``[d_ff]`` or ``None``.
        w2_t: ``[d_ff, d_out]``; b2: ``[d_out]`` or ``None``.
        threshold: t >= 0.
    """
    h = x @ w1.T
    if b1 is not None:
        h = h + b1
    y = fatrelu_ref(h, threshold) @ w2_t
    return y + b2 if b2 is not None else y
