"""CUDA implementation of the approximate-mode FFN ops in Triton (``predicted_gated_ffn`` and
``predicted_plain_ffn``; Deja Vu, arXiv 2310.17157; ProSparse Sec. 4 and its appendix on
approximate acceleration).

The predictor's low-rank estimate ``x @ a.T @ b.T`` is two small dense matmuls (cuBLAS, through
the same :func:`~prosparse_fx.predictors.predicted_active` as the reference, so the predicted
set is the reference's). Then, for 1 to 16 tokens, any widths, fp32/fp16/bf16, on the tiles of
the exact kernels' ``"compact"`` design (:data:`prosparse_fx.kernels.triton_ffn.TUNING`):

(a) ``_compact_kernel`` (the exact path's) lists the neurons predicted for some token;
(b) ``_gate_up_predicted_kernel`` reads, for one group of listed neurons, their rows of the
    gate and of up (fc1 and its bias for a plain FFN) over all of d. It applies the FATReLU
    (and dReLU's ReLU on up) and the token's predicted mask, and writes a compact x1. A
    neuron predicted but inactive gives 0; one not predicted for a token gives 0 for it;
(c) ``_down_compact_kernel`` (the exact path's) adds ``x1[:, group] @ w_down_t[rows]`` into y.

So no row of the gate, up or down is read for a neuron that no token's predictor selects, and
programs past the listed count return at once. Unlike the exact path there is no split of d
for the gate: FATReLU needs the whole pre-activation before x1 can be formed. More than 16
tokens, or none, run the dense reference. Partial sums of y meet by float32 atomic adds, as in
:mod:`.triton_ffn`. With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors for tests.
"""

from __future__ import annotations

import torch

from ..predictors.predictor import low_rank_estimate, predicted_active
from ..predictors.reference import predicted_gated_ffn_reference, predicted_plain_ffn_reference
from . import triton_ffn
from .triton_ffn import MAX_TOKENS, tl, triton

if triton is not None:
    from .triton_ffn import _compact_kernel, _dot, _down_compact_kernel, _kept, _listed_group

    @triton.jit
    def _gate_up_predicted_kernel(
        x_ptr, wg_ptr, wu_ptr, b1_ptr, pm_ptr, idx_ptr, count_ptr, x1_ptr,
        M, D, threshold,
        stride_xm, stride_wg, stride_wu, stride_pm, stride_x1m,
        HAS_UP: tl.constexpr, HAS_B1: tl.constexpr, UP_RELU: tl.constexpr,
        ROUND: tl.constexpr, IEEE: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """x1[:, group] = FATReLU_t(g) * u * predicted for one group of listed neurons
        (``rows``), with g = x @ w_gate[rows].T (+ b1[rows]) and u = x @ w_up[rows].T
        (``HAS_UP``; ReLU'd with ``UP_RELU``; a plain FFN has x1 = FATReLU_t(g) * predicted).
        ``pm`` is the predicted mask as float32 (1 predicted, 0 not)."""
        pid_r = tl.program_id(0)
        n_active = tl.load(count_ptr)
        if pid_r * BLOCK_R < n_active:  # programs past the list return at once
            offs_r, r_mask, rows, offs_m, m_mask, pm, predicted = _listed_group(
                idx_ptr, pm_ptr, pid_r, n_active, M, 0.5, stride_pm, BLOCK_M, BLOCK_R, True
            )
            acc_g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < D
                xk = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                rk_mask = r_mask[:, None] & k_mask[None, :]
                wg = tl.load(wg_ptr + rows[:, None] * stride_wg + offs_k[None, :], mask=rk_mask,
                             other=0.0)  # fmt: skip
                if USE_DOT:
                    acc_g += _dot(xk, tl.trans(wg), IEEE)
                else:  # few tokens: a GEMV on CUDA cores
                    acc_g += tl.sum(xk.to(tl.float32)[:, None, :] * wg.to(tl.float32)[None, :, :],
                                    axis=2)  # fmt: skip
                if HAS_UP:
                    wu = tl.load(wu_ptr + rows[:, None] * stride_wu + offs_k[None, :],
                                 mask=rk_mask, other=0.0)  # fmt: skip
                    if USE_DOT:
                        acc_u += _dot(xk, tl.trans(wu), IEEE)
                    else:
                        acc_u += tl.sum(
                            xk.to(tl.float32)[:, None, :] * wu.to(tl.float32)[None, :, :], axis=2
                        )
            if HAS_B1:
                acc_g += tl.load(b1_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)[None, :]
            if ROUND:  # the gate's (fc1's) output is in the input dtype in the dense model
                acc_g = acc_g.to(x_ptr.dtype.element_ty).to(tl.float32)
            keep = _kept(acc_g, threshold, predicted)
            if HAS_UP:
                if ROUND:
                    acc_u = acc_u.to(x_ptr.dtype.element_ty).to(tl.float32)
                if UP_RELU:
                    acc_u = tl.where(acc_u < 0.0, 0.0, acc_u)  # NaN stays, as in the dense model
                x1 = tl.where(keep, acc_g * acc_u, 0.0)
            else:
                x1 = tl.where(keep, acc_g, 0.0)
            tl.store(x1_ptr + offs_m[:, None] * stride_x1m + offs_r[None, :], x1,
                     mask=m_mask[:, None] & r_mask[None, :])  # fmt: skip


def _launch_predicted(
    x2: torch.Tensor,
    predicted: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    b1: torch.Tensor | None,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool,
) -> torch.Tensor:
    """``y = x1 @ w_down_t`` in float32 over the predicted neurons: ``x2`` ``[m, d]``,
    ``predicted`` bool ``[m, d_ff]``, ``w_gate`` the gate (fc1 when ``w_up`` is ``None``)."""
    m, d = x2.shape
    d_ff, d_out = w_gate.shape[0], w_down_t.shape[1]
    # the dense model compares g with t cast to g's dtype (see triton_ffn._launch)
    threshold = float(torch.tensor(threshold, dtype=x2.dtype))
    # one zeroed float32 buffer: the listed count, then y (the compact x1 is written whole)
    y_at = 32
    buf = torch.zeros(y_at + m * d_out, dtype=torch.float32, device=x2.device)
    count = buf[:1].view(torch.int32)
    y = buf[y_at:].view(m, d_out)
    x1 = torch.empty(m, d_ff, dtype=torch.float32, device=x2.device)
    idx = torch.empty(d_ff, dtype=torch.int32, device=x2.device)
    pm = predicted.to(torch.float32)
    cfg = triton_ffn.TUNING["compact"]
    warps = cfg["num_warps"]
    ieee = triton_ffn._dot_in_fp32(x2.dtype)
    pow2 = triton_ffn._pow2_at_least
    block_m = pow2(m, 1) if m <= 4 else 16  # few tokens: GEMV, else tl.dot
    use_dot = block_m >= 16
    min_rows = 16 if use_dot else 1
    block_c = min(cfg["block_c"], pow2(d_ff, 16))
    _compact_kernel[(triton.cdiv(d_ff, block_c),)](
        pm, idx, count, m, d_ff, 0.5, pm.stride(0), BLOCK_C=block_c, num_warps=warps
    )
    rows = max(min(cfg["up_rows"], pow2(d_ff, 16)), min_rows)
    block_k = min(cfg["up_block_k"], pow2(d, 16))
    if not use_dot:  # two [tokens, rows, cols] product tiles (gate and up) in registers
        block_k = max(16, min(block_k, triton_ffn._GEMV_TILE // (2 * block_m * rows)))
    has_up = w_up is not None
    _gate_up_predicted_kernel[(triton.cdiv(d_ff, rows),)](
        x2, w_gate, w_up if has_up else w_gate, b1 if b1 is not None else w_gate, pm, idx,
        count, x1, m, d, threshold,
        x2.stride(0), w_gate.stride(0), (w_up if has_up else w_gate).stride(0), pm.stride(0),
        x1.stride(0),
        HAS_UP=has_up, HAS_B1=b1 is not None, UP_RELU=up_relu, ROUND=x2.dtype != torch.float32,
        IEEE=ieee, USE_DOT=use_dot, BLOCK_M=block_m, BLOCK_R=rows, BLOCK_K=block_k,
        num_warps=warps,
    )  # fmt: skip
    rows = max(min(cfg["down_rows"], pow2(d_ff, 16)), min_rows)
    block_d = min(cfg["down_block_d"], pow2(d_out, 16))
    if not use_dot:
        block_d = max(16, min(block_d, triton_ffn._GEMV_TILE // (block_m * rows)))
    _down_compact_kernel[(triton.cdiv(d_ff, rows), triton.cdiv(d_out, block_d))](
        pm, x1, idx, count, w_down_t, y, m, d_out, threshold,
        pm.stride(0), x1.stride(0), w_down_t.stride(0), y.stride(0),
        HAS_UP=True, ROUND=x2.dtype != torch.float32, IEEE=ieee, USE_DOT=use_dot,
        UP_RELU=up_relu, BLOCK_M=block_m, BLOCK_R=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return y


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
    """Triton ``predicted_gated_ffn`` (inputs already checked by the op,
    :func:`~prosparse_fx.kernels.predicted.check_predicted_gated`).

    Args:
        x: ``[..., d]`` float32, float16 or bfloat16 (on CUDA, or CPU under the interpreter).
        a: ``[rank, d]``; b: ``[d_ff, rank]``: the predictor's factors (any floating dtype).
        cut: a neuron is predicted active where its estimate is above ``cut``.
        w_gate, w_up: ``[d_ff, d]``; w_down_t: ``[d_ff, d_out]``; in ``x``'s dtype.
        threshold: FATReLU t >= 0; up_relu: dReLU (ReLU on up; as in the exact dReLU kernels,
            a down row whose x1 is 0 for every token is not read).

    Returns:
        ``[..., d_out]`` in ``x``'s dtype; more than 16 tokens, or none, run the reference.
    """
    d = w_gate.shape[1]
    x2 = x.reshape(-1, d)
    if x2.shape[0] > MAX_TOKENS or x2.shape[0] == 0:
        return predicted_gated_ffn_reference(
            x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu
        )
    x2 = x2.contiguous()
    predicted = predicted_active(low_rank_estimate(x2, a, b), cut)
    w_gate, w_up, w_down_t = w_gate.contiguous(), w_up.contiguous(), w_down_t.contiguous()
    y = _launch_predicted(x2, predicted, w_gate, w_up, None, w_down_t, threshold, up_relu)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_down_t.shape[1])


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
    """Triton ``predicted_plain_ffn`` (inputs already checked by the op,
    :func:`~prosparse_fx.kernels.predicted.check_predicted_plain`).

    Args:
        x: ``[..., d]`` float32, float16 or bfloat16.
        a: ``[rank, d]``; b: ``[d_ff, rank]``; pred_bias: ``[d_ff]`` or ``None``: the
            predictor's factors and bias (one floating dtype).
        cut: a neuron is predicted active where its estimate is above ``cut``.
        w1: ``[d_ff, d]``; b1: ``[d_ff]`` or ``None``; w2_t: ``[d_ff, d_out]``; b2: ``[d_out]``
            or ``None``; in ``x``'s dtype.
        threshold: FATReLU t >= 0.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype; more than 16 tokens, or none, run the reference.
    """
    d = w1.shape[1]
    x2 = x.reshape(-1, d)
    if x2.shape[0] > MAX_TOKENS or x2.shape[0] == 0:
        return predicted_plain_ffn_reference(x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)
    x2 = x2.contiguous()
    predicted = predicted_active(low_rank_estimate(x2, a, b, pred_bias), cut)
    b1 = None if b1 is None else b1.contiguous()
    y = _launch_predicted(
        x2, predicted, w1.contiguous(), None, b1, w2_t.contiguous(), threshold, False
    ).to(x.dtype)
    if b2 is not None:
        y = y + b2
    return y.reshape(*x.shape[:-1], w2_t.shape[1])
