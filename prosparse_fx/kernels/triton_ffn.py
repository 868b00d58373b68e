"""CUDA implementation of the sparse-FFN ops in Triton (ProSparse App. D, exact acceleration).

The gate (fc1 for plain FFNs) is one dense matmul (cuBLAS: it is read whole anyway; a Triton
GEMV measured slower on an H200). Then, for 1 to 16 tokens, any widths, fp32/fp16/bf16:

(a) ``_up_kernel``, fused threshold and sparse up: a 2-D grid over (block of neurons, slice of
    d); neuron j accumulates ``dot(x, w_up[j])`` only where some token has ``g_j >= t``.
(b) ``_down_kernel``, sparse down: a 2-D grid over (block of neurons, slice of d_out); it forms
    ``x1 = g >= t ? g * u : 0`` (ProSparse App. D) and adds ``x1 @ w_down_t`` into y.

Rows of ``w_up`` and ``w_down_t`` whose neuron is inactive for every token are never read
(masked loads), blocks with no active neuron return at once, and partial sums meet by float32
atomic adds. Each program is short: with one program per neuron block walking all of d, the
dependent loads made the kernels latency-bound (measured on an H200: no faster than dense even
at 99% sparsity).

More than 16 tokens run dense (cuBLAS through torch). With ``TRITON_INTERPRET=1`` the kernels
run on CPU tensors (slowly) for tests.
"""

from __future__ import annotations

import os

import torch

from .reference import gated_ffn_reference, plain_ffn_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is the optional [gpu] extra
    triton = None
    tl = None

MAX_TOKENS = 16

# Launch parameters, chosen by benchmarks/tune_triton.py on an H200 (bf16, LLaMA-7B widths):
# block_n neurons per program; the up kernel splits d into block_k slices, the down kernel
# d_out into block_d slices.
TUNING: dict[str, dict[str, int]] = {
    "gated": {"block_n": 64, "block_k": 512, "block_d": 256, "num_warps": 4},
}


def available() -> bool:
    """True if Triton is installed (and a GPU or the interpreter can run it)."""
    return triton is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    )


if triton is not None:

    @triton.jit
    def _keep_block(g_ptr, pid_n, M, DFF, threshold, stride_gm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """Pre-activations of a block of neurons, which are kept (>= t, or NaN), and which
        neurons are active for some token."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m < M)[:, None] & (offs_n < DFF)[None, :]
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        keep = ((g >= threshold) | (g != g)) & mask
        row_active = tl.max(keep.to(tl.int32), axis=0) > 0
        return g, keep, row_active

    @triton.jit
    def _up_kernel(
        x_ptr, g_ptr, wu_ptr, u_ptr,
        M, D, DFF, threshold,
        stride_xm, stride_gm, stride_wu, stride_um,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """u[:, block] += x[:, k-slice] @ w_up[block, k-slice].T, active neurons only."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        g, keep, row_active = _keep_block(g_ptr, pid_n, M, DFF, threshold, stride_gm,
                                          BLOCK_M, BLOCK_N)  # fmt: skip
        if tl.max(row_active.to(tl.int32), axis=0) > 0:  # a block with no active neuron is done
            offs_m = tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
            m_mask = offs_m < M
            k_mask = offs_k < D
            xk = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            # rows of inactive neurons are never read
            wu = tl.load(
                wu_ptr + offs_n[:, None] * stride_wu + offs_k[None, :],
                mask=row_active[:, None] & k_mask[None, :],
                other=0.0,
            )
            if IEEE:
                part = tl.dot(xk.to(tl.float32), tl.trans(wu.to(tl.float32)),
                              input_precision="ieee")  # fmt: skip
            else:
                part = tl.dot(xk, tl.trans(wu))
            tl.atomic_add(
                u_ptr + offs_m[:, None] * stride_um + offs_n[None, :],
                part,
                mask=m_mask[:, None] & row_active[None, :],
            )

    @triton.jit
    def _down_kernel(
        g_ptr, u_ptr, wd_ptr, y_ptr,
        M, DFF, DOUT, threshold,
        stride_gm, stride_um, stride_wd, stride_ym,
        HAS_UP: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """y[:, d-slice] += x1[:, block] @ w_down_t[block, d-slice], active neurons only, with
        x1 = FATReLU_t(g) * u (gated) or FATReLU_t(g) (plain)."""
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        g, keep, row_active = _keep_block(g_ptr, pid_n, M, DFF, threshold, stride_gm,
                                          BLOCK_M, BLOCK_N)  # fmt: skip
        if tl.max(row_active.to(tl.int32), axis=0) > 0:
            offs_m = tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            m_mask = offs_m < M
            d_mask = offs_d < DOUT
            if HAS_UP:
                u = tl.load(
                    u_ptr + offs_m[:, None] * stride_um + offs_n[None, :], mask=keep, other=0.0
                )
                if ROUND:  # up_proj's output and x1 are in the input dtype in the dense model
                    u = u.to(wd_ptr.dtype.element_ty).to(tl.float32)
                x1 = tl.where(keep, g * u, 0.0)
            else:
                x1 = tl.where(keep, g, 0.0)
            if ROUND:
                x1 = x1.to(wd_ptr.dtype.element_ty).to(tl.float32)
            # rows of inactive neurons are never read
            w = tl.load(
                wd_ptr + offs_n[:, None] * stride_wd + offs_d[None, :],
                mask=row_active[:, None] & d_mask[None, :],
                other=0.0,
            )
            if IEEE:
                part = tl.dot(x1, w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x1.to(w.dtype), w)
            tl.atomic_add(
                y_ptr + offs_m[:, None] * stride_ym + offs_d[None, :],
                part,
                mask=m_mask[:, None] & d_mask[None, :],
            )


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs multiply in full fp32 (no TF32); the interpreter's half-precision dot is
    unreliable, so it multiplies upcast values too."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _launch(
    x2: torch.Tensor | None,
    g: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """``y = x1 @ w_down_t`` in float32 from pre-activations ``g`` (``[m, d_ff]``), with
    ``x1 = FATReLU_t(g) * (x2 @ w_up.T)`` when ``w_up`` is given, else ``FATReLU_t(g)``."""
    m, d_ff = g.shape
    d_out = w_down_t.shape[1]
    # one zeroed float32 buffer holds the up accumulator and y (one memset)
    buf = torch.zeros(m * (d_ff + d_out), dtype=torch.float32, device=g.device)
    u, y = buf[: m * d_ff].view(m, d_ff), buf[m * d_ff :].view(m, d_out)
    ieee = _dot_in_fp32(g.dtype)
    cfg = TUNING["gated"]
    block_n = min(cfg["block_n"], _pow2_at_least(d_ff, 16))
    if w_up is not None and x2 is not None:
        d = x2.shape[1]
        block_k = min(cfg["block_k"], _pow2_at_least(d, 16))
        _up_kernel[(triton.cdiv(d_ff, block_n), triton.cdiv(d, block_k))](
            x2, g, w_up, u, m, d, d_ff, float(threshold),
            x2.stride(0), g.stride(0), w_up.stride(0), u.stride(0),
            IEEE=ieee, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg["num_warps"],
        )  # fmt: skip
    block_d = min(cfg["block_d"], _pow2_at_least(d_out, 16))
    _down_kernel[(triton.cdiv(d_ff, block_n), triton.cdiv(d_out, block_d))](
        g, u, w_down_t, y, m, d_ff, d_out, float(threshold),
        g.stride(0), u.stride(0), w_down_t.stride(0), y.stride(0),
        HAS_UP=w_up is not None, ROUND=g.dtype != torch.float32, IEEE=ieee,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y


def gated_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Triton ``sparse_gated_ffn`` (inputs already checked by the op)."""
    d = w_gate.shape[1]
    x2 = x.reshape(-1, d)
    if x2.shape[0] > MAX_TOKENS or x2.shape[0] == 0:
        return gated_ffn_reference(x, w_gate, w_up, w_down_t, threshold)
    x2 = x2.contiguous()
    gate = x2 @ w_gate.T  # dense, cuBLAS: the gate is read whole anyway
    y = _launch(x2, gate, w_up.contiguous(), w_down_t.contiguous(), threshold).to(x.dtype)
    return y.reshape(*x.shape[:-1], w_down_t.shape[1])


def plain_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """Triton ``sparse_plain_ffn`` (inputs already checked by the op)."""
    d = w1.shape[1]
    x2 = x.reshape(-1, d)
    if x2.shape[0] > MAX_TOKENS or x2.shape[0] == 0:
        return plain_ffn_reference(x, w1, b1, w2_t, b2, threshold)
    x2 = x2.contiguous()
    h = torch.addmm(b1, x2, w1.T) if b1 is not None else x2 @ w1.T  # dense fc1, cuBLAS
    y = _launch(None, h.contiguous(), None, w2_t.contiguous(), threshold).to(x.dtype)
    if b2 is not None:
        y = y + b2
    return y.reshape(*x.shape[:-1], w2_t.shape[1])
