"""CUDA implementation of the sparse-FFN ops in Triton (ProSparse App. D, exact acceleration).

The gate is one dense matmul (cuBLAS: it is read whole anyway; a Triton GEMV measured slower on
an H200). Then, for 1 to 16 tokens, any widths, fp32/fp16/bf16, one kernel per block of neurons
(``_gated_kernel``): (a) fused threshold and sparse up, neuron j gives
``g_j >= t ? g_j * dot(x, w_up[j]) : 0`` (ProSparse App. D), and (b) sparse down, the block's x1
times its rows of ``w_down_t``, added into a float32 ``y`` by atomics. Rows of ``w_up`` and
``w_down_t`` whose neuron is inactive for every token are never read (masked loads), and a block
with no active neuron does nothing. (A separate down kernel that split neurons per output-column
block measured slower: its loop waits on x1 before each weight load.)

Plain FFNs: fc1 dense (cuBLAS), then ``_down_kernel``: FATReLU_t(h) @ w2_t, split over output
columns and neurons, reading only rows with a nonzero activation.

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

# Launch parameters, chosen by benchmarks/tune_triton.py on an H200 (bf16, LLaMA-7B widths).
# Keys: gated (block_n, block_k, block_d, num_warps), down (block_j, block_d, num_warps,
# ctas_per_sm; the plain FFN's kernel).
TUNING: dict[str, dict[str, int]] = {
    "gated": {"block_n": 32, "block_k": 128, "block_d": 256, "num_warps": 4},
    "down": {"block_j": 32, "block_d": 256, "num_warps": 4, "ctas_per_sm": 4},
}


def available() -> bool:
    """True if Triton is installed (and a GPU or the interpreter can run it)."""
    return triton is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    )


if triton is not None:

    @triton.jit
    def _gated_kernel(
        x_ptr, g_ptr, wu_ptr, wd_ptr, y_ptr,
        M, D, DFF, DOUT, threshold,
        stride_xm, stride_gm, stride_wu, stride_wd, stride_ym,
        IEEE: tl.constexpr, ROUND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < DFF
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        keep = ((g >= threshold) | (g != g)) & m_mask[:, None] & n_mask[None, :]  # NaN active
        row_active = tl.max(keep.to(tl.int32), axis=0) > 0
        if tl.max(row_active.to(tl.int32), axis=0) > 0:  # a block with no active neuron is done
            # (a) sparse up, fused with the threshold: rows of inactive neurons are never read
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < D
                xk = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                wu = tl.load(
                    wu_ptr + offs_n[:, None] * stride_wu + offs_k[None, :],
                    mask=row_active[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if IEEE:
                    acc += tl.dot(
                        xk.to(tl.float32), tl.trans(wu.to(tl.float32)), input_precision="ieee"
                    )
                else:
                    acc += tl.dot(xk, tl.trans(wu))
            if ROUND:  # up_proj's output and x1 are in the input dtype in the dense model
                acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
            x1 = tl.where(keep, g * acc, 0.0)
            if ROUND:
                x1 = x1.to(x_ptr.dtype.element_ty).to(tl.float32)
            # (b) sparse down: this block's x1 times its rows of w_down_t, into y
            for d0 in range(0, DOUT, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < DOUT
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

    @triton.jit
    def _down_kernel(
        x1_ptr, w_ptr, y_ptr,
        M, DFF, DOUT, J_PER_SPLIT, threshold,
        stride_x1m, stride_w, stride_ym,
        APPLY_THRESHOLD: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_d = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_mask = offs_m < M
        d_mask = offs_d < DOUT
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        j_begin = pid_s * J_PER_SPLIT
        j_end = tl.minimum(j_begin + J_PER_SPLIT, DFF)
        for j0 in range(j_begin, j_end, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_mask = offs_j < j_end
            a = tl.load(
                x1_ptr + offs_m[:, None] * stride_x1m + offs_j[None, :],
                mask=m_mask[:, None] & j_mask[None, :],
                other=0.0,
            )
            if APPLY_THRESHOLD:  # plain FFN: x1 = FATReLU_t(h), NaN kept
                a = tl.where((a >= threshold) | (a != a), a, 0.0)
            active = tl.max((a != 0).to(tl.int32), axis=0) > 0
            if tl.max(active.to(tl.int32), axis=0) > 0:
                # rows of w whose x1 entries are all zero are never read
                w = tl.load(
                    w_ptr + offs_j[:, None] * stride_w + offs_d[None, :],
                    mask=(active & j_mask)[:, None] & d_mask[None, :],
                    other=0.0,
                )
                if IEEE:
                    acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(a.to(w.dtype), w)
        tl.atomic_add(
            y_ptr + offs_m[:, None] * stride_ym + offs_d[None, :],
            acc,
            mask=m_mask[:, None] & d_mask[None, :],
        )


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs multiply in full fp32 (no TF32); the interpreter's half-precision dot is
    unreliable, so it multiplies upcast values too."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _launch_gated(
    x2: torch.Tensor, gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
    threshold: float,
) -> torch.Tensor:  # fmt: skip
    """``y = (FATReLU_t(gate) * (x2 @ w_up.T)) @ w_down_t`` in float32, one kernel."""
    m, d = x2.shape
    d_ff, d_out = w_down_t.shape
    y = torch.zeros((m, d_out), dtype=torch.float32, device=x2.device)
    cfg = TUNING["gated"]
    block_n = min(cfg["block_n"], _pow2_at_least(d_ff, 16))
    block_k = min(cfg["block_k"], _pow2_at_least(d, 16))
    block_d = min(cfg["block_d"], _pow2_at_least(d_out, 16))
    _gated_kernel[(triton.cdiv(d_ff, block_n),)](
        x2, gate, w_up, w_down_t, y,
        m, d, d_ff, d_out, float(threshold),
        x2.stride(0), gate.stride(0), w_up.stride(0), w_down_t.stride(0), y.stride(0),
        IEEE=_dot_in_fp32(x2.dtype), ROUND=x2.dtype != torch.float32,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y


def _launch_down(
    x1: torch.Tensor, w_t: torch.Tensor, y: torch.Tensor, threshold: float | None = None
) -> torch.Tensor:
    """``y += x1 @ w_t`` (float32 ``y``), reading only rows of w_t with a nonzero x1 entry;
    with ``threshold``, x1 is first passed through FATReLU_t."""
    m, d_ff = x1.shape
    d_out = w_t.shape[1]
    cfg = TUNING["down"]
    block_d = min(cfg["block_d"], _pow2_at_least(d_out, 16))
    block_j = min(cfg["block_j"], _pow2_at_least(d_ff, 16))
    col_blocks = triton.cdiv(d_out, block_d)
    splits = max(1, min(triton.cdiv(cfg["ctas_per_sm"] * _sm_count(x1.device), col_blocks),
                        triton.cdiv(d_ff, block_j)))  # fmt: skip
    j_per_split = triton.cdiv(triton.cdiv(d_ff, splits), block_j) * block_j
    splits = triton.cdiv(d_ff, j_per_split)
    _down_kernel[(col_blocks, splits)](
        x1, w_t, y, m, d_ff, d_out, j_per_split, float(threshold or 0.0),
        x1.stride(0), w_t.stride(0), y.stride(0),
        APPLY_THRESHOLD=threshold is not None, IEEE=_dot_in_fp32(x1.dtype),
        BLOCK_M=16, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=cfg["num_warps"],
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
    y = _launch_gated(x2, gate, w_up.contiguous(), w_down_t.contiguous(), threshold).to(x.dtype)
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
    h = torch.addmm(b1, x2, w1.T) if b1 is not None else x2 @ w1.T  # dense fc1, cuBLAS
    y = torch.zeros((x2.shape[0], w2_t.shape[1]), dtype=torch.float32, device=x.device)
    y = _launch_down(h, w2_t.contiguous(), y, threshold).to(x.dtype)
    if b2 is not None:
        y = y + b2
    return y.reshape(*x.shape[:-1], w2_t.shape[1])
