"""CUDA implementation of the sparse-FFN ops in Triton (ProSparse App. D, exact acceleration).

The gate (fc1 for plain FFNs) is one dense matmul (cuBLAS: it is read whole anyway; a Triton
GEMV measured slower on an H200). Then, for 1 to 16 tokens, any widths, fp32/fp16/bf16, one of
two designs (``TUNING["design"]``, chosen by ``benchmarks/tune_triton.py``):

``"blocks"``: a 2-D grid over (block of neurons, slice of d or d_out).
  (a) ``_up_kernel``, fused threshold and sparse up: neuron j accumulates ``dot(x, w_up[j])``
      only where some token has ``g_j >= t``;
  (b) ``_down_kernel``, sparse down: it forms ``x1 = g >= t ? g * u : 0`` and adds
      ``x1 @ w_down_t`` into y.
  Rows of inactive neurons are never read (masked loads) and blocks with no active neuron
  return at once, but with scattered activity every block holds a few active neurons, so the
  number of programs doing work does not fall with sparsity.

``"compact"``: the active neurons are first listed (``_compact_kernel``: the union over tokens,
  ``g >= t`` or NaN, appended through an atomic counter), then
  (a) ``_up_compact_kernel`` reads only listed rows of ``w_up``, in groups of ``up_rows``
      neurons and ``up_split_k`` slices of d, and adds ``FATReLU_t(g) * partial`` into a
      compact x1;
  (b) ``_down_compact_kernel`` adds ``x1[:, group] @ w_down_t[group]`` into y per slice of
      d_out.
  Programs past the active count return at once, so the work and the number of working
  programs both fall with sparsity; no host synchronisation is needed (CUDA graphs work).
  For up to 4 tokens products are summed on CUDA cores (a GEMV); above, tokens are padded to
  16 and go through ``tl.dot``.

dReLU (TurboSparse Sec. 3, ``up_relu``): x1 = FATReLU_t(g) * ReLU(u). Up is computed as above;
the down kernels then apply the ReLU and read the ``w_down_t`` rows only of the neurons whose x1
is nonzero for some token (active gate and up > 0): in ``"blocks"`` from the finished u, in
``"compact"`` from the compact x1 = FATReLU_t(g) * u, as ReLU(FATReLU_t(g) * u) equals
FATReLU_t(g) * ReLU(u) for a gate that is >= t >= 0 (or NaN).

Partial sums meet by float32 atomic adds with relaxed ordering (atomicity is all they need;
Triton's default acquire/release ordering adds a fence around each one), so the summation order,
and the last bits of the result, may differ between runs. More than 16 tokens run dense (cuBLAS
through torch). With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly) for tests.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .reference import gated_ffn_reference, plain_ffn_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is the optional [gpu] extra
    triton = None
    tl = None

MAX_TOKENS = 16

# Launch parameters. "blocks" was chosen by benchmarks/tune_triton.py on an H200 (bf16, LLaMA-7B
# widths): block_n neurons per program, the up kernel splitting d into block_k slices and the down
# kernel d_out into block_d slices. "compact": block_c neurons per listing program, up_rows
# listed neurons per up program over up_split_k slices of d read up_block_k at a time, down_rows
# per down program over down_block_d slices of d_out. The default design is the one measured
# fastest so far; tune_triton.py sweeps both.
TUNING: dict[str, Any] = {
    "design": "blocks",
    "blocks": {"block_n": 64, "block_k": 512, "block_d": 256, "num_warps": 4},
    "compact": {
        "block_c": 1024,
        "up_rows": 16,
        "up_block_k": 256,
        "up_split_k": 4,
        "down_rows": 32,
        "down_block_d": 256,
        "num_warps": 4,
    },
}
DESIGNS = ("blocks", "compact")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# design -> block sizes: powers of 2, at least this (tl.dot needs 16; a compact group with fewer
# rows is widened to 16 when tokens go through tl.dot)
_SIZES = {
    "blocks": {"block_n": 16, "block_k": 16, "block_d": 16},
    "compact": {
        "block_c": 16,
        "up_rows": 1,
        "up_block_k": 16,
        "down_rows": 1,
        "down_block_d": 16,
    },
}


def apply_tuning(table: dict[str, Any]) -> None:
    """Check a (partial) launch-parameter table, e.g. ``tune_triton.py``'s ``"best"``, and merge
    it into :data:`TUNING`; a design's entries not given keep their values.

    Raises:
        ValueError: an unknown design or parameter, or a value that is not a power of 2 (block
            sizes; at least 16 where ``tl.dot`` or a slice needs it), a positive integer
            (``up_split_k``) or 1, 2, 4, 8 or 16 (``num_warps``); nothing is changed then.
    """
    if not isinstance(table, dict):
        raise ValueError(f"a Triton tuning table is a dict, got {type(table).__name__}")
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TUNING.items()}
    for key, value in table.items():
        if key == "design":
            if value not in DESIGNS:
                raise ValueError(f"unknown Triton design {value!r}; choose one of {DESIGNS}")
            merged["design"] = value
            continue
        if key not in DESIGNS or not isinstance(value, dict):
            raise ValueError(
                f"unknown Triton tuning entry {key!r}; expected 'design' or a dict for one of "
                f"{DESIGNS}"
            )
        for name, v in value.items():
            if name not in merged[key]:
                raise ValueError(f"unknown {key} parameter {name!r}; known: {sorted(merged[key])}")
            ok = isinstance(v, int) and not isinstance(v, bool)
            if name in _SIZES[key]:
                ok = ok and v >= _SIZES[key][name] and v & (v - 1) == 0
                need = f"a power of 2 of at least {_SIZES[key][name]}"
            elif name == "num_warps":
                ok = ok and v in (1, 2, 4, 8, 16)
                need = "1, 2, 4, 8 or 16"
            else:
                ok = ok and v >= 1
                need = "a positive integer"
            if not ok:
                raise ValueError(f"{key} {name} must be {need}, got {v!r}")
            merged[key][name] = v
    TUNING.clear()
    TUNING.update(merged)


_GEMV_TILE = 16384  # elements of a GEMV program's product tile (128 float32 per thread, 4 warps)


def available() -> bool:
    """True if Triton is installed (and a GPU or the interpreter can run it)."""
    return triton is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    )


if triton is not None:

    @triton.jit
    def _kept(g, threshold, mask):
        """Where FATReLU_t keeps g (g >= t, or NaN, which propagates as in the dense model)."""
        return ((g >= threshold) | (g != g)) & mask

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` accumulated in float32: fp32 inputs multiply in full fp32 (``IEEE``), the
        others in ``b``'s dtype on the tensor cores."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _listed_group(idx_ptr, g_ptr, pid_r, n_active, M, threshold, stride_gm,
                      BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      WITH_GATE: tl.constexpr):  # fmt: skip
        """Group ``pid_r`` of the active list: its positions, their mask, the neurons (rows),
        the token offsets and mask, and (``WITH_GATE``; else zeros, nothing read) the gate
        values and FATReLU keep mask of those neurons."""
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < n_active
        rows = tl.load(idx_ptr + offs_r, mask=r_mask, other=0)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        mr_mask = m_mask[:, None] & r_mask[None, :]
        if WITH_GATE:
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + rows[None, :], mask=mr_mask,
                        other=0.0).to(tl.float32)  # fmt: skip
        else:
            g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        return offs_r, r_mask, rows, offs_m, m_mask, g, _kept(g, threshold, mr_mask)

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
        keep = _kept(g, threshold, mask)
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
            part = _dot(xk, tl.trans(wu), IEEE)
            tl.atomic_add(
                u_ptr + offs_m[:, None] * stride_um + offs_n[None, :],
                part,
                mask=m_mask[:, None] & row_active[None, :],
                sem="relaxed",
            )

    @triton.jit
    def _down_kernel(
        g_ptr, u_ptr, wd_ptr, y_ptr,
        M, DFF, DOUT, threshold,
        stride_gm, stride_um, stride_wd, stride_ym,
        HAS_UP: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr, UP_RELU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """y[:, d-slice] += x1[:, block] @ w_down_t[block, d-slice], active neurons only, with
        x1 = FATReLU_t(g) * u (gated), FATReLU_t(g) * ReLU(u) (``UP_RELU``, dReLU: then only
        the neurons whose x1 is nonzero for some token are read) or FATReLU_t(g) (plain)."""
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
                if UP_RELU:
                    u = tl.where(u < 0.0, 0.0, u)  # NaN stays, as in the dense model
                x1 = tl.where(keep, g * u, 0.0)
            else:
                x1 = tl.where(keep, g, 0.0)
            if ROUND:
                x1 = x1.to(wd_ptr.dtype.element_ty).to(tl.float32)
            if UP_RELU:  # neurons whose up is <= 0 for every token kept by the gate: not read
                row_active = tl.max((x1 != 0.0).to(tl.int32), axis=0) > 0
            # rows of inactive neurons are never read
            w = tl.load(
                wd_ptr + offs_n[:, None] * stride_wd + offs_d[None, :],
                mask=row_active[:, None] & d_mask[None, :],
                other=0.0,
            )
            part = _dot(x1, w, IEEE)
            tl.atomic_add(
                y_ptr + offs_m[:, None] * stride_ym + offs_d[None, :],
                part,
                mask=m_mask[:, None] & d_mask[None, :],
                sem="relaxed",
            )

    @triton.jit
    def _compact_kernel(
        g_ptr, idx_ptr, count_ptr,
        M, DFF, threshold, stride_gm,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Append the neurons of one block that are active for some token (``g >= t`` or NaN)
        to the list ``idx``, reserving their places through the counter."""
        offs_n = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        n_mask = offs_n < DFF
        active = tl.zeros([BLOCK_C], dtype=tl.int32)
        for m in range(0, M):
            g = tl.load(g_ptr + m * stride_gm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            active = active | _kept(g, threshold, n_mask).to(tl.int32)
        count = tl.sum(active, axis=0)
        if count > 0:
            base = tl.atomic_add(count_ptr, count, sem="relaxed")
            pos = base + tl.cumsum(active, axis=0) - active
            tl.store(idx_ptr + pos, offs_n, mask=active > 0)

    @triton.jit
    def _up_compact_kernel(
        x_ptr, g_ptr, wu_ptr, idx_ptr, count_ptr, x1_ptr,
        M, D, threshold, k_per_split,
        stride_xm, stride_gm, stride_wu, stride_x1m,
        IEEE: tl.constexpr, USE_DOT: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """x1[:, group] += FATReLU_t(g[:, rows]) * (x[:, k-slice] @ w_up[rows, k-slice].T) for
        one group of listed neurons (``rows``) and one slice of d."""
        pid_r = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_active = tl.load(count_ptr)
        if pid_r * BLOCK_R < n_active:  # programs past the list return at once
            offs_r, r_mask, rows, offs_m, m_mask, g, keep = _listed_group(
                idx_ptr, g_ptr, pid_r, n_active, M, threshold, stride_gm, BLOCK_M, BLOCK_R, True
            )
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            k_start = pid_k * k_per_split
            for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < D
                xk = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                w = tl.load(
                    wu_ptr + rows[:, None] * stride_wu + offs_k[None, :],
                    mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if USE_DOT:
                    acc += _dot(xk, tl.trans(w), IEEE)
                else:  # few tokens: a GEMV on CUDA cores
                    prod = xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
                    acc += tl.sum(prod, axis=2)
            part = tl.where(keep, g * acc, 0.0)
            x1_ptrs = x1_ptr + offs_m[:, None] * stride_x1m + offs_r[None, :]
            mr_mask = m_mask[:, None] & r_mask[None, :]
            if ATOMIC:
                tl.atomic_add(x1_ptrs, part, mask=mr_mask, sem="relaxed")
            else:
                tl.store(x1_ptrs, part, mask=mr_mask)

    @triton.jit
    def _down_compact_kernel(
        g_ptr, x1_ptr, idx_ptr, count_ptr, wd_ptr, y_ptr,
        M, DOUT, threshold,
        stride_gm, stride_x1m, stride_wd, stride_ym,
        HAS_UP: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr, USE_DOT: tl.constexpr,
        UP_RELU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """y[:, d-slice] += x1[:, group] @ w_down_t[rows, d-slice] for one group of listed
        neurons, with x1 the compact up result (gated; ``UP_RELU``, dReLU: its ReLU, and only
        the neurons whose x1 is nonzero for some token are read) or FATReLU_t(g[:, rows])
        (plain)."""
        pid_r = tl.program_id(0)
        pid_d = tl.program_id(1)
        n_active = tl.load(count_ptr)
        if pid_r * BLOCK_R < n_active:
            offs_r, r_mask, rows, offs_m, m_mask, g, keep = _listed_group(
                idx_ptr,
                g_ptr,
                pid_r,
                n_active,
                M,
                threshold,
                stride_gm,
                BLOCK_M,
                BLOCK_R,
                not HAS_UP,  # the gated x1 is already in the compact buffer
            )
            if HAS_UP:
                x1 = tl.load(x1_ptr + offs_m[:, None] * stride_x1m + offs_r[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
            else:
                x1 = tl.where(keep, g, 0.0)
            if UP_RELU:  # FATReLU_t(g) >= 0: ReLU(FATReLU_t(g) * u) = FATReLU_t(g) * ReLU(u)
                x1 = tl.where(x1 < 0.0, 0.0, x1)
            if ROUND:  # x1 is in the input dtype in the dense model
                x1 = x1.to(wd_ptr.dtype.element_ty).to(tl.float32)
            if UP_RELU:  # neurons whose up is <= 0 for every token: not read
                r_mask = r_mask & (tl.max((x1 != 0.0).to(tl.int32), axis=0) > 0)
            offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = offs_d < DOUT
            w = tl.load(
                wd_ptr + rows[:, None] * stride_wd + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if USE_DOT:
                part = _dot(x1, w, IEEE)
            else:
                part = tl.sum(x1[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
            tl.atomic_add(
                y_ptr + offs_m[:, None] * stride_ym + offs_d[None, :],
                part,
                mask=m_mask[:, None] & d_mask[None, :],
                sem="relaxed",
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
    up_relu: bool = False,
) -> torch.Tensor:
    """``y = x1 @ w_down_t`` in float32 from pre-activations ``g`` (``[m, d_ff]``), with
    ``x1 = FATReLU_t(g) * (x2 @ w_up.T)`` when ``w_up`` is given (``FATReLU_t(g) *
    ReLU(x2 @ w_up.T)`` with ``up_relu``), else ``FATReLU_t(g)``, by the design
    ``TUNING["design"]`` names.

    Raises:
        ValueError: an unknown design in ``TUNING``.
    """
    # the dense model compares g with t cast to g's dtype (PyTorch's scalar promotion): in bf16
    # t = 0.35 is 0.349609375, and a gate equal to that is kept
    threshold = float(torch.tensor(threshold, dtype=g.dtype))
    design = TUNING["design"]
    if design == "blocks":
        return _launch_blocks(x2, g, w_up, w_down_t, threshold, up_relu)
    if design == "compact":
        return _launch_compact(x2, g, w_up, w_down_t, threshold, up_relu)
    raise ValueError(f"unknown Triton design {design!r} in TUNING; choose one of {DESIGNS}")


def _launch_blocks(
    x2: torch.Tensor | None,
    g: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> torch.Tensor:
    m, d_ff = g.shape
    d_out = w_down_t.shape[1]
    # one zeroed float32 buffer holds the up accumulator and y (one memset)
    buf = torch.zeros(m * (d_ff + d_out), dtype=torch.float32, device=g.device)
    u, y = buf[: m * d_ff].view(m, d_ff), buf[m * d_ff :].view(m, d_out)
    ieee = _dot_in_fp32(g.dtype)
    cfg = TUNING["blocks"]
    block_n = max(16, min(cfg["block_n"], _pow2_at_least(d_ff, 16)))  # tl.dot: 16 at least
    if w_up is not None and x2 is not None:
        d = x2.shape[1]
        block_k = max(16, min(cfg["block_k"], _pow2_at_least(d, 16)))
        _up_kernel[(triton.cdiv(d_ff, block_n), triton.cdiv(d, block_k))](
            x2, g, w_up, u, m, d, d_ff, float(threshold),
            x2.stride(0), g.stride(0), w_up.stride(0), u.stride(0),
            IEEE=ieee, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg["num_warps"],
        )  # fmt: skip
    block_d = max(16, min(cfg["block_d"], _pow2_at_least(d_out, 16)))
    _down_kernel[(triton.cdiv(d_ff, block_n), triton.cdiv(d_out, block_d))](
        g, u, w_down_t, y, m, d_ff, d_out, float(threshold),
        g.stride(0), u.stride(0), w_down_t.stride(0), y.stride(0),
        HAS_UP=w_up is not None, ROUND=g.dtype != torch.float32, IEEE=ieee,
        UP_RELU=up_relu and w_up is not None,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _launch_compact(
    x2: torch.Tensor | None,
    g: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> torch.Tensor:
    m, d_ff = g.shape
    d_out = w_down_t.shape[1]
    # one zeroed float32 buffer (one memset) holds the active count, the compact x1 and y, each
    # starting on a 128-byte boundary; the list itself needs no zeroing
    x1_at = 32
    y_at = x1_at + _round_up(m * d_ff, 32)
    buf = torch.zeros(y_at + m * d_out, dtype=torch.float32, device=g.device)
    count = buf[:1].view(torch.int32)
    x1 = buf[x1_at : x1_at + m * d_ff].view(m, d_ff)
    y = buf[y_at:].view(m, d_out)
    idx = torch.empty(d_ff, dtype=torch.int32, device=g.device)
    cfg = TUNING["compact"]
    warps = cfg["num_warps"]
    threshold = float(threshold)
    ieee = _dot_in_fp32(g.dtype)
    block_m = _pow2_at_least(m, 1) if m <= 4 else 16  # few tokens: GEMV, else tl.dot
    use_dot = block_m >= 16
    # a GEMV forms the [tokens, rows, cols] products in registers: keep them within _GEMV_TILE
    # elements; tl.dot needs 16 rows at least
    min_rows = 16 if use_dot else 1
    block_c = min(cfg["block_c"], _pow2_at_least(d_ff, 16))
    _compact_kernel[(triton.cdiv(d_ff, block_c),)](
        g, idx, count, m, d_ff, threshold, g.stride(0), BLOCK_C=block_c, num_warps=warps
    )
    if w_up is not None and x2 is not None:
        d = x2.shape[1]
        rows = max(min(cfg["up_rows"], _pow2_at_least(d_ff, 16)), min_rows)
        block_k = min(cfg["up_block_k"], _pow2_at_least(d, 16))
        if not use_dot:
            block_k = max(16, min(block_k, _GEMV_TILE // (block_m * rows)))
        split = max(1, min(cfg["up_split_k"], triton.cdiv(d, block_k)))
        k_per_split = _round_up(triton.cdiv(d, split), block_k)
        _up_compact_kernel[(triton.cdiv(d_ff, rows), split)](
            x2, g, w_up, idx, count, x1, m, d, threshold, k_per_split,
            x2.stride(0), g.stride(0), w_up.stride(0), x1.stride(0),
            IEEE=ieee, USE_DOT=use_dot, ATOMIC=split > 1,
            BLOCK_M=block_m, BLOCK_R=rows, BLOCK_K=block_k, num_warps=warps,
        )  # fmt: skip
    rows = max(min(cfg["down_rows"], _pow2_at_least(d_ff, 16)), min_rows)
    block_d = min(cfg["down_block_d"], _pow2_at_least(d_out, 16))
    if not use_dot:
        block_d = max(16, min(block_d, _GEMV_TILE // (block_m * rows)))
    _down_compact_kernel[(triton.cdiv(d_ff, rows), triton.cdiv(d_out, block_d))](
        g, x1, idx, count, w_down_t, y, m, d_out, threshold,
        g.stride(0), x1.stride(0), w_down_t.stride(0), y.stride(0),
        HAS_UP=w_up is not None, ROUND=g.dtype != torch.float32, IEEE=ieee, USE_DOT=use_dot,
        UP_RELU=up_relu and w_up is not None,
        BLOCK_M=block_m, BLOCK_R=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return y


def gated_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> torch.Tensor:
    """Triton ``sparse_gated_ffn`` (inputs already checked by the op); ``up_relu``: dReLU."""
    d = w_gate.shape[1]
    x2 = x.reshape(-1, d)
    if x2.shape[0] > MAX_TOKENS or x2.shape[0] == 0:
        return gated_ffn_reference(x, w_gate, w_up, w_down_t, threshold, up_relu)
    x2 = x2.contiguous()
    gate = x2 @ w_gate.T  # dense, cuBLAS: the gate is read whole anyway
    w_up, w_down_t = w_up.contiguous(), w_down_t.contiguous()
    y = _launch(x2, gate, w_up, w_down_t, threshold, up_relu).to(x.dtype)
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
