"""CPU implementation of the sparse-FFN ops: the gate (or fc1) dense, then up_proj and
down_proj over the active neurons only (for several tokens, the union of their active sets),
each active row read once in place by a small C++ helper (:mod:`.cpu_ext`, up to
``CPP_MAX_TOKENS`` tokens), or gathered in cache-sized chunks of rows through reused buffers for
BLAS (more tokens, or no compiler). For dReLU (``up_relu``) down reads only the neurons whose x1
is nonzero for some token (active gate and up > 0). Above a crossover active fraction, measured
per token count and path, it runs dense, so it is never meaningfully slower than dense
(ProSparse App. D, exact acceleration).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
import torch.nn.functional as F

from . import cpu_ext
from .reference import fatrelu_ref

# Active fraction above which the dense path is faster, as (up to this many tokens, fraction),
# for each way of reading the active rows (measured at LLaMA-7B widths, fp32, on the project's
# 2-core machine; dense is torch's three matmuls). With the C++ helper one token is 1.01x dense
# even with every neuron active, 4 tokens 1.21x, 8 tokens 1.14x, 16 tokens break even near 90%
# active and 32 near 62%. Gathering rows for BLAS (no compiler) breaks even near 40% active for
# 1-4 tokens, 60% for 16 and 55% for 64. set_cpu_crossover() or PROSPARSE_CPU_CROSSOVER
# overrides the tables for every token count.
CROSSOVER_CPP = ((8, 1.0), (16, 0.9), (32, 0.62))
CROSSOVER_GATHER = ((4, 0.4), (16, 0.6), (None, 0.5))
# The C++ helper multiplies token by token from rows held in cache; above this many tokens,
# gathering the rows for one BLAS matmul is faster (64 tokens at 40% sparsity: 1.19x vs 1.10x).
CPP_MAX_TOKENS = 32
_CHUNK_BYTES = 256 * 1024


def _fraction(value: object, name: str, fix: str) -> float:
    """``value`` as an active fraction in [0, 1], or a ValueError naming ``name`` and ``fix``."""
    try:
        fraction = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 <= fraction <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be an active fraction in [0, 1], got {value!r}; {fix}")
    return fraction


def crossover_from_env() -> float | None:
    """``PROSPARSE_CPU_CROSSOVER`` as an active fraction, or ``None`` when it is unset or empty.

    Raises:
        ValueError: a value that is not a number in [0, 1].
    """
    value = os.environ.get("PROSPARSE_CPU_CROSSOVER", "").strip()
    if not value:
        return None
    fix = "set it to a number such as 0.7, or unset it for the measured defaults"
    return _fraction(value, "PROSPARSE_CPU_CROSSOVER", fix)


_state: dict[str, float | None] = {"crossover": None}
_local = threading.local()


def set_cpu_crossover(active_fraction: float | None) -> None:
    """Run dense when more than ``active_fraction`` (0..1) of the neurons are active, for any
    number of tokens; ``None`` restores ``PROSPARSE_CPU_CROSSOVER`` if set, else the measured
    tables (``CROSSOVER_CPP``, ``CROSSOVER_GATHER``).

    Raises:
        ValueError: ``active_fraction`` not a number in [0, 1].
    """
    if active_fraction is not None:
        active_fraction = _fraction(
            active_fraction, "crossover", "give a number such as 0.7, or None for the defaults"
        )
    _state["crossover"] = active_fraction


def get_cpu_crossover(tokens: int = 1, cpp: bool | None = None) -> float:
    """The active fraction above which the CPU implementation runs dense for ``tokens`` rows,
    when the active rows are read by the C++ helper (``cpp``; default: whether it is built and
    takes that many tokens) or gathered for BLAS: :func:`set_cpu_crossover`'s value, else
    ``PROSPARSE_CPU_CROSSOVER``'s, else the measured tables.

    Raises:
        ValueError: ``PROSPARSE_CPU_CROSSOVER`` is set to something that is not in [0, 1].
    """
    if _state["crossover"] is not None:
        return _state["crossover"]
    from_env = crossover_from_env()  # read at every call, so a change takes effect
    if from_env is not None:
        return from_env
    if cpp is None:
        cpp = tokens <= CPP_MAX_TOKENS and cpu_ext.get() is not None
    table = CROSSOVER_CPP if cpp else CROSSOVER_GATHER
    for up_to, fraction in table:
        if up_to is None or tokens <= up_to:
            return fraction
    return table[-1][1]


def _buffer(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused ``[rows, cols]`` scratch buffer (one per thread, dtype and width)."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (dtype, cols)
    buf = cache.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = cache[key] = torch.empty((rows, cols), dtype=dtype)
    return buf[:rows]


def _chunk_rows(cols: int, dtype: torch.dtype) -> int:
    return max(8, _CHUNK_BYTES // (cols * torch.finfo(dtype).bits // 8))


def _helper(tokens: int, *tensors: torch.Tensor) -> Any | None:
    """The C++ helper when it is built and takes this call (float32, contiguous, at most
    ``CPP_MAX_TOKENS`` tokens), else ``None``."""
    if tokens <= CPP_MAX_TOKENS and all(
        t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    ):
        return cpu_ext.get()
    return None


def _rows_times(x2: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x2 @ w[idx].T`` as ``[n, k]``, gathering ``w``'s rows chunk by chunk for BLAS."""
    n, k = x2.shape[0], idx.numel()
    out_t = torch.empty((k, n), dtype=x2.dtype)
    step = _chunk_rows(w.shape[1], w.dtype)
    buf = _buffer(min(step, k), w.shape[1], w.dtype)
    for start in range(0, k, step):
        chunk = idx[start : start + step]
        rows = buf[: chunk.numel()]
        torch.index_select(w, 0, chunk, out=rows)
        torch.mm(rows, x2.T, out=out_t[start : start + chunk.numel()])
    return out_t.T


def _times_rows(x1: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x1 @ w_t[idx]`` as ``[n, d_out]``; x1 is ``[n, k]``."""
    if x1.shape[0] == 1 and w_t.dtype == torch.float32:
        # a weighted sum of the active rows, read once, no copy; one bag per thread
        k, bags = idx.numel(), max(torch.get_num_threads(), 1)
        offsets = torch.arange(0, k, -(-k // bags))
        return F.embedding_bag(idx, w_t, offsets=offsets, per_sample_weights=x1[0], mode="sum").sum(
            0, keepdim=True
        )
    n, d_out = x1.shape[0], w_t.shape[1]
    y = torch.zeros((n, d_out), dtype=x1.dtype)
    step = _chunk_rows(d_out, w_t.dtype)
    buf = _buffer(min(step, idx.numel()), d_out, w_t.dtype)
    for start in range(0, idx.numel(), step):
        chunk = idx[start : start + step]
        rows = buf[: chunk.numel()]
        torch.index_select(w_t, 0, chunk, out=rows)
        y.addmm_(x1[:, start : start + chunk.numel()], rows)
    return y


def _active(h: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` ``[n, d_ff]`` (not below t; NaN counts as active) and the union's indices."""
    keep = ~(h < threshold)
    return keep, keep.any(0).nonzero().squeeze(1)


def gated_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> torch.Tensor:
    """CPU ``sparse_gated_ffn`` (inputs already checked by the op)."""
    d_ff, d = w_gate.shape
    x2 = x.reshape(-1, d).contiguous()
    n = x2.shape[0]
    ext = _helper(n, x2, w_gate, w_up, w_down_t)
    if ext is not None:  # the whole FFN in one C++ call
        y = ext.sparse_gated(
            x2, w_gate, w_up, w_down_t, threshold, get_cpu_crossover(n, cpp=True), up_relu
        )
        return y.reshape(*x.shape[:-1], w_down_t.shape[1])
    gate = x2 @ w_gate.T
    keep, idx = _active(gate, threshold)
    zeros = x2.new_zeros((n, w_down_t.shape[1]))
    if idx.numel() > get_cpu_crossover(n, cpp=False) * d_ff:
        up = x2 @ w_up.T
        up = fatrelu_ref(up, 0.0) if up_relu else up
        y = (fatrelu_ref(gate, threshold) * up) @ w_down_t
    elif idx.numel() == 0:
        y = zeros
    else:
        a = torch.where(keep[:, idx], gate[:, idx], 0)
        up = _rows_times(x2, w_up, idx)
        if up_relu:  # down only over the neurons whose x1 is nonzero (or NaN) for some token
            x1 = a * fatrelu_ref(up, 0.0)
            nonzero = (x1 != 0).any(0)
            idx, x1 = idx[nonzero], x1[:, nonzero]
            y = _times_rows(x1, w_down_t, idx) if idx.numel() else zeros
        else:
            y = _times_rows(a * up, w_down_t, idx)
    return y.reshape(*x.shape[:-1], w_down_t.shape[1])


def plain_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """CPU ``sparse_plain_ffn`` (inputs already checked by the op)."""
    d_ff, d = w1.shape
    x2 = x.reshape(-1, d).contiguous()
    n = x2.shape[0]
    ext = _helper(n, x2, w1, w2_t)
    if ext is not None:  # the whole FFN in one C++ call
        y = ext.sparse_plain(x2, w1, b1, w2_t, b2, threshold, get_cpu_crossover(n, cpp=True))
        return y.reshape(*x.shape[:-1], w2_t.shape[1])
    h = torch.addmm(b1, x2, w1.T) if b1 is not None else x2 @ w1.T
    keep, idx = _active(h, threshold)
    if idx.numel() > get_cpu_crossover(n, cpp=False) * d_ff:
        y = fatrelu_ref(h, threshold) @ w2_t
    elif idx.numel() == 0:
        y = x2.new_zeros((n, w2_t.shape[1]))
    else:
        y = _times_rows(torch.where(keep[:, idx], h[:, idx], 0), w2_t, idx)
    if b2 is not None:
        y = y + b2
    return y.reshape(*x.shape[:-1], w2_t.shape[1])


def _predicted_rows(
    x2: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    cut: float,
    d_ff: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The predicted mask ``[n, d_ff]`` and the union's indices, or ``None`` for them where the
    union is above the crossover (compute dense, then mask)."""
    from ..predictors.predictor import low_rank_estimate, predicted_active

    mask = predicted_active(low_rank_estimate(x2, a, b, bias), cut)
    idx = mask.any(0).nonzero().squeeze(1)
    dense = idx.numel() > get_cpu_crossover(x2.shape[0], cpp=False) * d_ff
    return mask, None if dense else idx


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
    """CPU ``predicted_gated_ffn`` (inputs already checked by the op): the low-rank estimate,
    then gate, up and down over the neurons predicted for some token; a token's x1 is 0 on the
    neurons not predicted for it. Dense (masked) above the crossover."""
    d_ff, d = w_gate.shape
    x2 = x.reshape(-1, d).contiguous()
    n = x2.shape[0]
    shape = (*x.shape[:-1], w_down_t.shape[1])
    ext = _helper(n, x2, a, b, w_gate, w_up, w_down_t)
    if ext is not None:  # the whole FFN in one C++ call
        crossover = get_cpu_crossover(n, cpp=True)
        y = ext.predicted_gated(
            x2, a, b, cut, w_gate, w_up, w_down_t, threshold, crossover, up_relu
        )
        return y.reshape(shape)
    mask, idx = _predicted_rows(x2, a, b, None, cut, d_ff)
    if idx is None:
        gate, up, cols = x2 @ w_gate.T, x2 @ w_up.T, mask
    elif idx.numel() == 0:
        return x2.new_zeros(shape)
    else:
        gate, up, cols = _rows_times(x2, w_gate, idx), _rows_times(x2, w_up, idx), mask[:, idx]
    up = fatrelu_ref(up, 0.0) if up_relu else up
    x1 = torch.where(cols, fatrelu_ref(gate, threshold) * up, 0)
    y = x1 @ w_down_t if idx is None else _times_rows(x1, w_down_t, idx)
    return y.reshape(shape)


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
    """CPU ``predicted_plain_ffn`` (inputs already checked by the op): the low-rank estimate,
    then fc1 and fc2 over the neurons predicted for some token. Dense (masked) above the
    crossover."""
    d_ff, d = w1.shape
    x2 = x.reshape(-1, d).contiguous()
    n = x2.shape[0]
    shape = (*x.shape[:-1], w2_t.shape[1])
    optional = [t for t in (pred_bias, b1, b2) if t is not None]
    ext = _helper(n, x2, a, b, w1, w2_t, *optional)
    if ext is not None:  # the whole FFN in one C++ call
        crossover = get_cpu_crossover(n, cpp=True)
        y = ext.predicted_plain(x2, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold, crossover)
        return y.reshape(shape)
    mask, idx = _predicted_rows(x2, a, b, pred_bias, cut, d_ff)
    if idx is None:
        h = torch.addmm(b1, x2, w1.T) if b1 is not None else x2 @ w1.T
        y = torch.where(mask, fatrelu_ref(h, threshold), 0) @ w2_t
    elif idx.numel() == 0:
        y = x2.new_zeros((n, w2_t.shape[1]))
    else:
        h = _rows_times(x2, w1, idx)
        h = h + b1[idx] if b1 is not None else h
        y = _times_rows(torch.where(mask[:, idx], fatrelu_ref(h, threshold), 0), w2_t, idx)
    y = y + b2 if b2 is not None else y
    return y.reshape(shape)
