"""The training-free predictor: a truncated SVD of the gate weight (SVDP, arXiv 2603.14110).

``W_gate ~ b @ a`` with ``a = S_r^{1/2} V_r^T`` (``[rank, d]``) and ``b = U_r S_r^{1/2}``
(``[d_ff, rank]``), so ``x @ a.T @ b.T`` approximates the gate pre-activation ``x @ W_gate.T``
with the least Frobenius error of any rank-``rank`` factorisation (Eckart-Young). The singular
values are split evenly between the factors so neither holds their whole range (bf16 weights).
"""

from __future__ import annotations

import torch


def check_rank(rank: int, d: int, d_ff: int) -> int:
    """Validate a predictor rank for a ``[d_ff, d]`` gate weight; return it.

    Raises:
        ValueError: ``rank`` is not an integer in ``[1, min(d, d_ff)]``; the message names the
            limit.
    """
    limit = min(d, d_ff)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"predictor rank must be an integer in [1, min(d, d_ff)] = [1, {limit}] for a gate "
            f"weight of d_ff={d_ff} rows and d={d} columns, got {rank!r}"
        )
    return rank


def svd_factors(w_gate: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of a gate weight from its truncated SVD (SVDP, arXiv 2603.14110).

    For a gated FFN pass ``gate_proj.weight``; for a plain FFN ``fc2(act(fc1(x) + b1))`` pass
    fc1's weight (``[d_ff, d]``) and add ``b1`` to the estimate.

    Args:
        w_gate: ``[d_ff, d]`` floating-point weight (``nn.Linear`` layout).
        rank: ``1 <= rank <= min(d, d_ff)``; ``min(d, d_ff)`` reproduces ``w_gate`` up to
            rounding.

    Returns:
        ``(a, b)``: ``a`` of shape ``[rank, d]`` and ``b`` of shape ``[d_ff, rank]``, in the
        dtype and on the device of ``w_gate`` (the SVD itself runs in float32), such that
        ``x @ a.T @ b.T`` approximates ``x @ w_gate.T``.

    Raises:
        ValueError: ``w_gate`` is not a 2-D floating-point tensor or is not finite, or ``rank``
            is out of range.
    """
    if w_gate.dim() != 2 or not w_gate.is_floating_point():
        raise ValueError(
            f"w_gate must be a 2-D floating-point [d_ff, d] weight, got {w_gate.dtype} of "
            f"shape {list(w_gate.shape)}"
        )
    d_ff, d = w_gate.shape
    check_rank(rank, d, d_ff)
    if not bool(torch.isfinite(w_gate).all()):
        raise ValueError(
            "w_gate holds NaN or infinite values, which have no SVD: the model's gate weight "
            "is damaged; reload or retrain the model"
        )
    u, s, vh = torch.linalg.svd(w_gate.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(w_gate.dtype).contiguous(), b.to(w_gate.dtype).contiguous()
