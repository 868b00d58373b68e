"""``torch.ops.prosparse.predicted_gated_ffn`` and its plain-FFN twin ``predicted_plain_ffn``
(approximate mode) against their dense references over a dtype/shape table, against the exact
FFN where the predictor is exact, and on bad input. Every test runs with the C++ helper and with
the pure-torch fallback."""

from __future__ import annotations

import math

import pytest
import torch

from prosparse_fx.kernels import (
    gated_ffn_reference,
    plain_ffn_reference,
    predicted_gated_ffn,
    predicted_plain_ffn,
    set_cpu_crossover,
)
from prosparse_fx.predictors import (
    low_rank_estimate,
    predicted_gated_ffn_reference,
    predicted_plain_ffn_reference,
)

pytestmark = pytest.mark.usefixtures("cpu_path")

TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def _ffn(d: int, d_ff: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_gate = torch.randn(d_ff, d, generator=g) * d**-0.5
    w_up = torch.randn(d_ff, d, generator=g) * d**-0.5
    w_down_t = torch.randn(d_ff, d, generator=g) * d_ff**-0.5
    return [w.to(dtype) for w in (w_gate, w_up, w_down_t)]


def _predictor(w_gate: torch.Tensor, rank: int):
    """The SVD predictor of the gate (rank r), in float32."""
    u, s, vh = torch.linalg.svd(w_gate.float(), full_matrices=False)
    return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel() == 0:
        return
    scale = want.float().abs().max().clamp_min(1e-6)
    err = float((got.float() - want.float()).abs().max() / scale)
    assert err <= 2 * TOL[dtype], f"max error {err:.3g} of scale {float(scale):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (4,), (2, 3), (0,)])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("up_relu", [False, True])
@pytest.mark.parametrize("crossover", [0.0, 1.0])
def test_matches_reference(dtype, lead, threshold, up_relu, crossover) -> None:
    d, d_ff = 48, 112
    w_gate, w_up, w_down_t = _ffn(d, d_ff, dtype)
    a, b = _predictor(w_gate, 12)
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    est = low_rank_estimate(x, a, b)
    cut = float(est.float().quantile(0.7)) if est.numel() else 0.0
    args = (x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)
    set_cpu_crossover(crossover)
    try:
        got = predicted_gated_ffn(*args)
    finally:
        set_cpu_crossover(None)
    _close(got, predicted_gated_ffn_reference(*args), dtype)


@pytest.mark.parametrize("lead", [(1,), (5,)])
def test_exact_predictor_gives_the_exact_sparse_ffn(lead) -> None:
    """With a = I and b = w_gate the estimate is the gate pre-activation itself, and with
    cut = t the predicted set is the active set: the op is then the exact FFN (hand-built,
    independent of the predicted reference)."""
    d, d_ff, t = 32, 80, 0.1
    w_gate, w_up, w_down_t = _ffn(d, d_ff, torch.float32)
    x = torch.randn(*lead, d)
    got = predicted_gated_ffn(x, torch.eye(d), w_gate, t, w_gate, w_up, w_down_t, t)
    _close(got, gated_ffn_reference(x, w_gate, w_up, w_down_t, t), torch.float32)


def test_cut_extremes() -> None:
    """cut = +inf predicts nothing (exactly 0); cut = -inf predicts every neuron (the exact
    dense FFN)."""
    d, d_ff = 32, 80
    w_gate, w_up, w_down_t = _ffn(d, d_ff, torch.float32)
    a, b = _predictor(w_gate, 4)
    x = torch.randn(3, d)
    none = predicted_gated_ffn(x, a, b, math.inf, w_gate, w_up, w_down_t, 0.0)
    assert torch.equal(none, torch.zeros(3, d))
    every = predicted_gated_ffn(x, a, b, -math.inf, w_gate, w_up, w_down_t, 0.0)
    _close(every, gated_ffn_reference(x, w_gate, w_up, w_down_t, 0.0), torch.float32)


def test_nan_input_gives_nan_output_like_dense() -> None:
    d, d_ff = 32, 80
    w_gate, w_up, w_down_t = _ffn(d, d_ff, torch.float32)
    a, b = _predictor(w_gate, 4)
    x = torch.randn(3, d)
    x[1, 5] = float("nan")
    y = predicted_gated_ffn(x, a, b, 0.5, w_gate, w_up, w_down_t, 0.0)
    assert y[1].isnan().all()
    assert not y[[0, 2]].isnan().any()


def test_opcheck_export_and_compile_keep_one_node() -> None:
    d, d_ff = 16, 32
    w_gate, w_up, w_down_t = _ffn(d, d_ff, torch.float32)
    a, b = _predictor(w_gate, 4)
    x = torch.randn(2, d)
    args = (x, a, b, 0.1, w_gate, w_up, w_down_t, 0.0)
    torch.library.opcheck(torch.ops.prosparse.predicted_gated_ffn.default, args)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.prosparse.predicted_gated_ffn(x, *args[1:])

    gm = torch.export.export(M(), (x,)).module()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.prosparse.predicted_gated_ffn.default) == 1
    want = predicted_gated_ffn_reference(*args)
    _close(gm(x), want, torch.float32)
    torch._dynamo.reset()
    _close(torch.compile(M(), backend="eager", fullgraph=True)(x), want, torch.float32)


_BAD = [
    ({"a": torch.randn(4, 15)}, ValueError, r"a must have shape \[rank, 16\]"),
    ({"a": torch.randn(0, 16)}, ValueError, r"a must have shape \[rank, 16\] \(rank >= 1\)"),
    ({"b": torch.randn(31, 4)}, ValueError, r"b must have shape \[32, 4\] \(d_ff, rank\)"),
    ({"b": torch.randn(32, 4, dtype=torch.float64)}, TypeError, "differ in dtype"),
    ({"a": torch.ones(4, 16, dtype=torch.int64)}, TypeError, "factor a has dtype torch.int64"),
    ({"a": torch.randn(4, 16, device="meta")}, ValueError, "factor a is on meta"),
    ({"cut": float("nan")}, ValueError, "cut must be a number"),
    ({"threshold": -0.1}, ValueError, "threshold must be a finite number >= 0"),
    ({"w_up": torch.randn(31, 16)}, ValueError, r"w_up must have shape \[32, 16\]"),
]


@pytest.mark.parametrize(("change", "error", "match"), _BAD)
def test_bad_input_is_refused_by_name(change, error, match) -> None:
    w_gate, w_up, w_down_t = _ffn(16, 32, torch.float32)
    a, b = _predictor(w_gate, 4)
    args = {
        "x": torch.randn(2, 16),
        "a": a,
        "b": b,
        "cut": 0.0,
        "w_gate": w_gate,
        "w_up": w_up,
        "w_down_t": w_down_t,
        "threshold": 0.0,
    }
    args.update(change)
    with pytest.raises(error, match=match):
        predicted_gated_ffn(**args)


# --------------------------------------------------------------------------- the plain twin


def _plain(d: int, d_ff: int, dtype: torch.dtype, biases: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d_ff, d, generator=g) * d**-0.5
    w2_t = torch.randn(d_ff, d, generator=g) * d_ff**-0.5
    b1 = torch.randn(d_ff, generator=g) * 0.1 if biases else None
    b2 = torch.randn(d, generator=g) * 0.1 if biases else None
    return [None if t is None else t.to(dtype) for t in (w1, b1, w2_t, b2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (4,), (2, 3), (0,)])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("crossover", [0.0, 1.0])
def test_plain_matches_reference(dtype, lead, threshold, biases, crossover) -> None:
    d, d_ff = 48, 112
    w1, b1, w2_t, b2 = _plain(d, d_ff, dtype, biases)
    a, b = _predictor(w1, 12)
    pred_bias = None if b1 is None else b1.float()
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    est = low_rank_estimate(x, a, b, pred_bias)
    cut = float(est.float().quantile(0.7)) if est.numel() else 0.0
    args = (x, a, b, pred_bias, cut, w1, b1, w2_t, b2, threshold)
    set_cpu_crossover(crossover)
    try:
        got = predicted_plain_ffn(*args)
    finally:
        set_cpu_crossover(None)
    _close(got, predicted_plain_ffn_reference(*args), dtype)


@pytest.mark.parametrize("lead", [(1,), (5,)])
def test_plain_exact_predictor_gives_the_exact_sparse_ffn(lead) -> None:
    """a = I, b = w1, pred_bias = b1 and cut = t: the predicted set is the active set, and the
    op is the exact plain FFN (hand-built, independent of the predicted reference)."""
    d, d_ff, t = 32, 80, 0.1
    w1, b1, w2_t, b2 = _plain(d, d_ff, torch.float32, True)
    x = torch.randn(*lead, d)
    got = predicted_plain_ffn(x, torch.eye(d), w1, b1, t, w1, b1, w2_t, b2, t)
    _close(got, plain_ffn_reference(x, w1, b1, w2_t, b2, t), torch.float32)
    none = predicted_plain_ffn(x, torch.eye(d), w1, b1, math.inf, w1, b1, w2_t, b2, t)
    assert torch.equal(none, b2.expand_as(none))  # nothing predicted: fc2's bias alone


def test_plain_nan_input_gives_nan_output_and_export_keeps_one_node() -> None:
    d, d_ff = 16, 32
    w1, b1, w2_t, b2 = _plain(d, d_ff, torch.float32, True)
    a, b = _predictor(w1, 4)
    x = torch.randn(3, d)
    x[1, 5] = float("nan")
    y = predicted_plain_ffn(x, a, b, None, 0.5, w1, b1, w2_t, b2, 0.0)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    args = (x[[0, 2]], a, b, b1, 0.1, w1, b1, w2_t, b2, 0.0)
    torch.library.opcheck(torch.ops.prosparse.predicted_plain_ffn.default, args)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.prosparse.predicted_plain_ffn(x, *args[1:])

    gm = torch.export.export(M(), (args[0],)).module()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.prosparse.predicted_plain_ffn.default) == 1
    _close(gm(args[0]), predicted_plain_ffn_reference(*args), torch.float32)


_BAD_PLAIN = [
    ({"a": torch.randn(4, 15)}, ValueError, r"a must have shape \[rank, 16\]"),
    ({"pred_bias": torch.randn(31)}, ValueError, r"pred_bias must have shape \[32\]"),
    ({"pred_bias": torch.randn(32).double()}, ValueError, "the factors' dtype"),
    ({"cut": float("nan")}, ValueError, "cut must be a number"),
    ({"b1": torch.randn(31)}, ValueError, "b1"),
    ({"w2_t": torch.randn(31, 16)}, ValueError, "w2_t must have shape"),
]


@pytest.mark.parametrize(("change", "error", "match"), _BAD_PLAIN)
def test_plain_bad_input_is_refused_by_name(change, error, match) -> None:
    w1, b1, w2_t, b2 = _plain(16, 32, torch.float32, True)
    a, b = _predictor(w1, 4)
    args = {"x": torch.randn(2, 16), "a": a, "b": b, "pred_bias": None, "cut": 0.0, "w1": w1}
    args.update({"b1": b1, "w2_t": w2_t, "b2": b2, "threshold": 0.0})
    args.update(change)
    with pytest.raises(error, match=match):
        predicted_plain_ffn(**args)
