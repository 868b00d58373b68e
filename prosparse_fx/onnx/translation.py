"""ONNX translations of the sparse-FFN ops in standard operators only (ProSparse App. D).

``torch.onnx.export(dynamo=True)`` calls these for ``prosparse::sparse_gated_ffn`` and
``prosparse::sparse_plain_ffn``. Each FFN becomes: the gate (first linear) dense, FATReLU, the
active set (a neuron is active when any token keeps it), then an ``If`` on the active fraction:
at or below the crossover, ``NonZero`` → ``Gather`` of the active rows of up/down → two small
matmuls; above it, the dense up and down. So ONNX Runtime never runs the slower of the two.
A dReLU FFN (``sparse_gated_ffn(..., up_relu=True)``, TurboSparse Sec. 3) takes ReLU of the
gathered up too (``Less``/``Where``), and gathers the down rows only of the neurons whose x1 is
nonzero for some token (a second ``NonZero``), so down skips the neurons whose up is <= 0; its
active rows are gathered in one piece (not in chunks).

Dtypes: whatever the runtime's Gemm/MatMul/Gather accept (float32 on ONNX Runtime's CPU
provider); the function is typed for float32, float16, bfloat16 and float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, Union

import onnxscript
import torch
from onnx import TensorProto
from onnxscript import opset18 as op
from onnxscript.onnx_types import BFLOAT16, BOOL, DOUBLE, FLOAT, FLOAT16, INT64

OPSET = 18

# Active fraction at or below which the sparse branch runs. Measured with ONNX Runtime 1.32 on
# 2 CPU cores (benchmarks/bench_onnx.py, LLaMA-2-7B widths): the always-sparse graph breaks even
# with the dense one near 40% active for one token but only below about 30% for four, so 0.25.
DEFAULT_CROSSOVER = 0.25

T = TypeVar("T", bound=Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE])  # noqa: UP007 (onnxscript)


# The If of each FFN. The active set is computed once, outside (:func:`_active_set`); a branch
# reads outer values directly. (A function called inside a branch would not be inlined by the
# exporter, so the chunked branch is written out.)


@onnxscript.script(default_opset=op)
def _gated_branches(x2: T, g: T, idx: INT64, sparse: BOOL, w_up: T, w_down_t: T) -> T:
    if sparse:
        up = op.Gemm(x2, op.Gather(w_up, idx, axis=0), transB=1)
        y = op.MatMul(op.Mul(op.Gather(g, idx, axis=1), up), op.Gather(w_down_t, idx, axis=0))
    else:
        y = op.MatMul(op.Mul(g, op.Gemm(x2, w_up, transB=1)), w_down_t)
    return y


@onnxscript.script(default_opset=op)
def _gated_branches_chunked(x2: T, g: T, idx: INT64, sparse: BOOL, w_up: T, w_down_t: T) -> T:
    # the active rows in 4 chunks, so that each chunk's gathered copy is still in cache when its
    # matmul reads it (large FFNs)
    if sparse:
        k = op.Shape(idx)
        step = op.Div(op.Add(k, op.Constant(value_ints=[3])), op.Constant(value_ints=[4]))
        b1 = step
        b2 = op.Add(b1, step)
        b3 = op.Add(b2, step)
        i0 = op.Slice(idx, op.Constant(value_ints=[0]), b1)
        u0 = op.Gemm(x2, op.Gather(w_up, i0, axis=0), transB=1)
        y0 = op.MatMul(op.Mul(op.Gather(g, i0, axis=1), u0), op.Gather(w_down_t, i0, axis=0))
        i1 = op.Slice(idx, b1, b2)
        u1 = op.Gemm(x2, op.Gather(w_up, i1, axis=0), transB=1)
        y1 = op.MatMul(op.Mul(op.Gather(g, i1, axis=1), u1), op.Gather(w_down_t, i1, axis=0))
        i2 = op.Slice(idx, b2, b3)
        u2 = op.Gemm(x2, op.Gather(w_up, i2, axis=0), transB=1)
        y2 = op.MatMul(op.Mul(op.Gather(g, i2, axis=1), u2), op.Gather(w_down_t, i2, axis=0))
        i3 = op.Slice(idx, b3, k)
        u3 = op.Gemm(x2, op.Gather(w_up, i3, axis=0), transB=1)
        y3 = op.MatMul(op.Mul(op.Gather(g, i3, axis=1), u3), op.Gather(w_down_t, i3, axis=0))
        y = op.Sum(y0, y1, y2, y3)
    else:
        y = op.MatMul(op.Mul(g, op.Gemm(x2, w_up, transB=1)), w_down_t)
    return y


@onnxscript.script(default_opset=op)
def _drelu_branches(x2: T, g: T, idx: INT64, sparse: BOOL, w_up: T, w_down_t: T) -> T:
    # dReLU: x1 = FATReLU_t(g) * ReLU(up), ReLU as "zero where < 0" so NaN propagates
    zero = op.CastLike(op.Constant(value_float=0.0), x2)
    if sparse:
        up = op.Gemm(x2, op.Gather(w_up, idx, axis=0), transB=1)
        x1 = op.Mul(op.Gather(g, idx, axis=1), op.Where(op.Less(up, zero), zero, up))
        # the neurons whose x1 is nonzero (or NaN) for some token; the others add nothing
        nonzero = op.Cast(op.Not(op.Equal(x1, zero)), to=1)  # 1: FLOAT
        count = op.ReduceSum(nonzero, op.Constant(value_ints=[0]), keepdims=0)
        cols = op.Squeeze(
            op.NonZero(op.Greater(count, op.Constant(value_float=0.0))),
            op.Constant(value_ints=[0]),
        )
        rows = op.Gather(idx, cols, axis=0)
        y = op.MatMul(op.Gather(x1, cols, axis=1), op.Gather(w_down_t, rows, axis=0))
    else:
        up = op.Gemm(x2, w_up, transB=1)
        y = op.MatMul(op.Mul(g, op.Where(op.Less(up, zero), zero, up)), w_down_t)
    return y


@onnxscript.script(default_opset=op)
def _plain_branches(h: T, idx: INT64, sparse: BOOL, w2_t: T, b2: T) -> T:
    if sparse:
        y = op.Add(op.MatMul(op.Gather(h, idx, axis=1), op.Gather(w2_t, idx, axis=0)), b2)
    else:
        y = op.Add(op.MatMul(h, w2_t), b2)
    return y


# Approximate mode (Deja Vu; ProSparse Sec. 4): the predicted set is computed once, outside
# (:func:`_predicted_set`); the gate is read only on the predicted rows in the sparse branch, and
# FATReLU_t still applies there (t arrives as a scalar tensor of x's dtype).


@onnxscript.script(default_opset=op)
def _predicted_gated_branches(
    x2: T, predicted: BOOL, idx: INT64, sparse: BOOL, w_gate: T, w_up: T, w_down_t: T, t: T,
    relu_up: BOOL,
) -> T:  # fmt: skip
    zero = op.CastLike(op.Constant(value_float=0.0), x2)
    if sparse:
        g = op.Gemm(x2, op.Gather(w_gate, idx, axis=0), transB=1)
        u = op.Gemm(x2, op.Gather(w_up, idx, axis=0), transB=1)
        u = op.Where(op.And(relu_up, op.Less(u, zero)), zero, u)
        x1 = op.Mul(op.Where(op.Less(g, t), zero, g), u)
        x1 = op.Where(op.Gather(predicted, idx, axis=1), x1, zero)
        y = op.MatMul(x1, op.Gather(w_down_t, idx, axis=0))
    else:
        g = op.Gemm(x2, w_gate, transB=1)
        u = op.Gemm(x2, w_up, transB=1)
        u = op.Where(op.And(relu_up, op.Less(u, zero)), zero, u)
        x1 = op.Where(predicted, op.Mul(op.Where(op.Less(g, t), zero, g), u), zero)
        y = op.MatMul(x1, w_down_t)
    return y


@onnxscript.script(default_opset=op)
def _predicted_plain_branches(
    x2: T, predicted: BOOL, idx: INT64, sparse: BOOL, w1: T, b1: T, w2_t: T, b2: T, t: T
) -> T:
    zero = op.CastLike(op.Constant(value_float=0.0), x2)
    if sparse:
        h = op.Gemm(x2, op.Gather(w1, idx, axis=0), op.Gather(b1, idx, axis=0), transB=1)
        x1 = op.Where(op.Gather(predicted, idx, axis=1), op.Where(op.Less(h, t), zero, h), zero)
        y = op.Add(op.MatMul(x1, op.Gather(w2_t, idx, axis=0)), b2)
    else:
        h = op.Gemm(x2, w1, b1, transB=1)
        x1 = op.Where(predicted, op.Where(op.Less(h, t), zero, h), zero)
        y = op.Add(op.MatMul(x1, w2_t), b2)
    return y


def _predicted_set(
    x2: Any, a: Any, b: Any, bias: Any | None, cut: float, crossover: float
) -> tuple[Any, Any, Any]:
    """The predicted mask ``[n, d_ff]`` (the estimate ``x2 @ a.T @ b.T (+ bias)`` above ``cut``
    in float32, or not finite, as :func:`prosparse_fx.predictors.predicted_active`), the
    indices ``[k]`` of the neurons predicted for some token, and whether their fraction is at
    most ``crossover`` (take the sparse branch)."""
    est = op.Gemm(op.Gemm(op.CastLike(x2, a), a, transB=1), b, transB=1)
    if bias is not None:
        est = op.Add(est, bias)
    est = op.Cast(est, to=TensorProto.FLOAT)
    finite = op.Not(op.Or(op.IsNaN(est), op.IsInf(est)))
    predicted = op.Not(op.And(op.LessOrEqual(est, op.Constant(value_float=cut)), finite))
    # per neuron, 1 if some token predicts it (-inf for no token: then nothing is predicted)
    some = op.ReduceMax(
        op.Cast(predicted, to=TensorProto.FLOAT), op.Constant(value_ints=[0]), keepdims=0
    )
    any_token = op.Greater(some, op.Constant(value_float=0.5))
    fraction = op.ReduceMean(op.Cast(any_token, to=TensorProto.FLOAT), keepdims=0)
    sparse = op.LessOrEqual(fraction, op.Constant(value_float=crossover))
    idx = op.Squeeze(op.NonZero(any_token), op.Constant(value_ints=[0]))
    return predicted, idx, sparse


def _fatrelu(x: Any, threshold: float) -> tuple[Any, Any]:
    """FATReLU_t (ProSparse Eq. 3) as "zero where x < t", so NaN propagates; returns the
    result and the mask ``x < t``."""
    low = op.Less(x, op.CastLike(op.Constant(value_float=threshold), x))
    return op.Where(low, op.CastLike(op.Constant(value_float=0.0), x), x), low


def _active_set(z: Any, threshold: float, crossover: float) -> tuple[Any, Any, Any]:
    """FATReLU of the first linear's output ``z [n, d_ff]``, the active neurons' indices
    ``[k]`` (active: kept by any token; NaN is never below t, so it stays active) and whether
    the active fraction is at most ``crossover`` (take the sparse branch)."""
    kept, low = _fatrelu(z, threshold)
    inactive = op.ReduceMin(
        op.Cast(low, to=TensorProto.FLOAT), op.Constant(value_ints=[0]), keepdims=0
    )
    active_fraction = op.Sub(op.Constant(value_float=1.0), op.ReduceMean(inactive, keepdims=0))
    sparse = op.LessOrEqual(active_fraction, op.Constant(value_float=crossover))
    idx = op.Squeeze(
        op.NonZero(op.Not(op.Cast(inactive, to=TensorProto.BOOL))), op.Constant(value_ints=[0])
    )
    return kept, idx, sparse


def _rows(x: Any) -> Any:
    """``[..., d]`` → ``[n, d]`` (Gemm takes 2-D inputs); ``n = 0`` for an empty batch or
    sequence (``-1`` is inferred as 0 then, since ``d > 0``)."""
    return op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))


def _unrows(y: Any, x: Any, w_out_t: Any) -> Any:
    """``[n, d_out]`` → ``[..., d_out]`` with the leading dims of ``x``.

    ``allowzero=1``: a 0 in the target shape is a real empty dim (a zero-length sequence or
    batch), not Reshape's default "copy this dim from the input", which would turn ``[0, d]``
    into ``[2, d, d]`` for ``x [2, 0, d]`` (an error) or ``[0, d, d]`` for ``x [0, 0, d]``.
    """
    shape = op.Concat(op.Shape(x, end=-1), op.Shape(w_out_t, start=1), axis=0)
    return op.Reshape(y, shape, allowzero=1)


# weight matrices above this size (bytes) gather their active rows in chunks; below it (SmolLM2:
# 3.5 MB) the extra nodes would cost more than the cache misses they save
CHUNKED_ABOVE = 32 * 2**20


def _is_large(w: Any) -> bool:
    """Whether ``w`` is known (static shape) to exceed :data:`CHUNKED_ABOVE` in float32."""
    shape = getattr(w, "shape", None)
    dims = [] if shape is None else list(shape)
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    return dims[0] * dims[1] * 4 > CHUNKED_ABOVE


def _zeros_like_rows(w: Any, like: Any, axis: int) -> Any:
    """A zero vector of length ``w.shape[axis]`` in the dtype of ``like`` (a missing bias)."""
    zero = op.CastLike(op.Constant(value_float=0.0), like)
    return op.Expand(zero, op.Shape(w, start=axis, end=axis + 1))


def translation_table(crossover: float = DEFAULT_CROSSOVER) -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: both sparse-FFN ops, and
    ``prosparse::fatrelu`` (the activation of a dense export).

    Args:
        crossover: active fraction in [0, 1] at or below which the exported graph takes the
            sparse branch (0 never, 1 always).

    Raises:
        ValueError: ``crossover`` outside [0, 1].
    """
    if not 0.0 <= crossover <= 1.0:
        raise ValueError(f"crossover must be an active fraction in [0, 1], got {crossover}")

    def gated(x: T, w_gate: T, w_up: T, w_down_t: T, threshold: float, up_relu: bool = False) -> T:
        x2 = _rows(x)
        g, idx, sparse = _active_set(op.Gemm(x2, w_gate, transB=1), threshold, crossover)
        if up_relu:
            branches = _drelu_branches
        else:
            branches = _gated_branches_chunked if _is_large(w_up) else _gated_branches
        return _unrows(branches(x2, g, idx, sparse, w_up, w_down_t), x, w_down_t)

    def plain(x: T, w1: T, b1: T | None, w2_t: T, b2: T | None, threshold: float) -> T:
        x2 = _rows(x)
        z = op.Gemm(x2, w1, transB=1) if b1 is None else op.Gemm(x2, w1, b1, transB=1)
        h, idx, sparse = _active_set(z, threshold, crossover)
        b2 = _zeros_like_rows(w2_t, x, 1) if b2 is None else b2
        return _unrows(_plain_branches(h, idx, sparse, w2_t, b2), x, w2_t)

    def fatrelu(x: T, threshold: float) -> T:
        return _fatrelu(x, threshold)[0]

    def predicted_gated(
        x: T, a: T, b: T, cut: float, w_gate: T, w_up: T, w_down_t: T, threshold: float,
        up_relu: bool = False,
    ) -> T:  # fmt: skip
        x2 = _rows(x)
        predicted, idx, sparse = _predicted_set(x2, a, b, None, cut, crossover)
        t = op.CastLike(op.Constant(value_float=threshold), x2)
        relu_up = op.Constant(value=onnx_bool(up_relu))
        y = _predicted_gated_branches(
            x2, predicted, idx, sparse, w_gate, w_up, w_down_t, t, relu_up
        )
        return _unrows(y, x, w_down_t)

    def predicted_plain(
        x: T, a: T, b: T, pred_bias: T | None, cut: float, w1: T, b1: T | None, w2_t: T,
        b2: T | None, threshold: float,
    ) -> T:  # fmt: skip
        x2 = _rows(x)
        predicted, idx, sparse = _predicted_set(x2, a, b, pred_bias, cut, crossover)
        t = op.CastLike(op.Constant(value_float=threshold), x2)
        b1 = _zeros_like_rows(w1, x, 0) if b1 is None else b1
        b2 = _zeros_like_rows(w2_t, x, 1) if b2 is None else b2
        y = _predicted_plain_branches(x2, predicted, idx, sparse, w1, b1, w2_t, b2, t)
        return _unrows(y, x, w2_t)

    return {
        torch.ops.prosparse.fatrelu.default: fatrelu,  # in dense exports
        torch.ops.prosparse.sparse_gated_ffn.default: gated,
        torch.ops.prosparse.sparse_plain_ffn.default: plain,
        torch.ops.prosparse.predicted_gated_ffn.default: predicted_gated,
        torch.ops.prosparse.predicted_plain_ffn.default: predicted_plain,
    }


def onnx_bool(value: bool) -> Any:
    """A scalar BOOL tensor proto."""
    from onnx import helper

    return helper.make_tensor("value", TensorProto.BOOL, [], [bool(value)])
