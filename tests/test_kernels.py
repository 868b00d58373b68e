"""Sparse-FFN ops: every implementation against the dense reference over a dtype/tolerance
table; the Triton kernels run under TRITON_INTERPRET=1 when no GPU is present."""

import os

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 before triton is imported when there is no GPU
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

from prosparse_fx.kernels import cpu as cpu_impl  # noqa: E402
from prosparse_fx.kernels import (  # noqa: E402
    gated_ffn_reference,
    plain_ffn_reference,
    set_cpu_crossover,
    sparse_gated_ffn,
    sparse_plain_ffn,
    triton_ffn,  # noqa: E402
)

# every test runs with the C++ helper and with the pure-torch fallback (conftest.py's cpu_path)
pytestmark = pytest.mark.usefixtures("cpu_path")


# dtype -> (atol, rtol), relative to the output's scale (max |reference|)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(d, d_ff, d_out, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    return mk(d_ff, d, scale=d**-0.5), mk(d_ff, d, scale=d**-0.5), mk(d_ff, d_out, scale=d_ff**-0.5)


def _close(got, want, dtype, factor=1.0):
    atol, rtol = (factor * v for v in TOL[dtype])
    scale = want.float().abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= atol + rtol, f"max error {float(err):.3g} of scale {float(scale):.3g}"


def _impls(device):
    impls = {"op": lambda *a: sparse_gated_ffn(*a)}
    if triton_ffn.available():
        impls["triton"] = triton_ffn.gated_ffn
    return impls


SHAPES = [  # (leading dims, d, d_ff)
    ((1,), 64, 128),
    ((4,), 64, 128),
    ((16,), 64, 128),
    ((2, 3), 64, 128),
    ((3,), 37, 101),  # odd widths
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("lead", "d", "d_ff"), SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("crossover", [0.0, 1.0])
def test_gated_matches_reference(dtype, lead, d, d_ff, threshold, crossover) -> None:
    if dtype == torch.float16 and DEVICE == "cpu" and not triton_ffn.available():
        pytest.skip("fp16 matmul on CPU is covered by the Triton interpreter run")
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, dtype, DEVICE)
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    ref = gated_ffn_reference(x.float(), w_gate.float(), w_up.float(), w_down_t.float(), threshold)
    set_cpu_crossover(crossover)  # 0: always sparse, 1: sparse unless all neurons are active
    try:
        for name, fn in _impls(DEVICE).items():
            out = fn(x, w_gate, w_up, w_down_t, threshold)
            assert out.shape == (*lead, d) and out.dtype == dtype, name
            _close(out, ref, dtype)
    finally:
        set_cpu_crossover(None)


@pytest.mark.parametrize("case", ["all_zero", "all_active"])
def test_gated_extremes(case) -> None:
    d, d_ff = 32, 48
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32, DEVICE)
    x = torch.rand(4, d, device=DEVICE) + 0.1
    if case == "all_active":
        w_gate = w_gate.abs()  # positive x and weights: every gate > 0
        threshold = 0.0
    else:
        threshold = 1e6
    ref = gated_ffn_reference(x, w_gate, w_up, w_down_t, threshold)
    set_cpu_crossover(0.0 if case == "all_zero" else 1.0)
    try:
        for fn in _impls(DEVICE).values():
            out = fn(x, w_gate, w_up, w_down_t, threshold)
            if case == "all_zero":
                assert torch.equal(out, torch.zeros_like(out))
            _close(out, ref, torch.float32)
    finally:
        set_cpu_crossover(None)


def test_nan_propagates_like_dense() -> None:
    d, d_ff = 32, 48
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32, DEVICE)
    x = torch.randn(3, d, device=DEVICE)
    x[1, 5] = float("nan")
    ref = gated_ffn_reference(x, w_gate, w_up, w_down_t, 0.1)
    assert torch.isnan(ref[1]).all() and not torch.isnan(ref[0]).any()
    set_cpu_crossover(0.0)
    try:
        for fn in _impls(DEVICE).values():
            out = fn(x, w_gate, w_up, w_down_t, 0.1)
            assert torch.equal(torch.isnan(out), torch.isnan(ref))
    finally:
        set_cpu_crossover(None)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_plain_matches_reference(bias, lead) -> None:
    d, d_ff, d_out = 40, 72, 24
    g = torch.Generator().manual_seed(3)
    w1 = (torch.randn(d_ff, d, generator=g) / 6).to(DEVICE)
    w2_t = (torch.randn(d_ff, d_out, generator=g) / 8).to(DEVICE)
    b1 = (torch.randn(d_ff, generator=g) / 4).to(DEVICE) if bias else None
    b2 = torch.randn(d_out, generator=g).to(DEVICE) if bias else None
    x = torch.randn(*lead, d, generator=g).to(DEVICE)
    ref = plain_ffn_reference(x, w1, b1, w2_t, b2, 0.1)
    set_cpu_crossover(0.0)
    try:
        _close(sparse_plain_ffn(x, w1, b1, w2_t, b2, 0.1), ref, torch.float32)
        if triton_ffn.available():
            _close(triton_ffn.plain_ffn(x, w1, b1, w2_t, b2, 0.1), ref, torch.float32)
    finally:
        set_cpu_crossover(None)


def test_opcheck_and_export_keep_one_node() -> None:
    w_gate, w_up, w_down_t = _weights(16, 32, 16, torch.float32)
    x = torch.randn(2, 16)
    torch.library.opcheck(
        torch.ops.prosparse.sparse_gated_ffn.default, (x, w_gate, w_up, w_down_t, 0.1)
    )
    torch.library.opcheck(
        torch.ops.prosparse.sparse_plain_ffn.default,
        (x, w_gate, None, w_down_t, torch.zeros(16), 0.0),
    )

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.prosparse.sparse_gated_ffn(x, w_gate, w_up, w_down_t, 0.1)

    gm = torch.export.export(M(), (x,)).module()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.prosparse.sparse_gated_ffn.default) == 1
    assert torch.allclose(gm(x), gated_ffn_reference(x, w_gate, w_up, w_down_t, 0.1), atol=1e-6)


_INT_SHAPES = {"x": (2, 16), "w_gate": (32, 16), "w_up": (32, 16), "w_down_t": (32, 16)}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"x": torch.randn(2, 15)}, ValueError, r"x must have shape \[\.\.\., 16\]"),
        ({"w_up": torch.randn(31, 16)}, ValueError, r"w_up must have shape \[32, 16\]"),
        ({"w_down_t": torch.randn(16, 32)}, ValueError, r"w_down_t must have shape \[32, d_out\]"),
        ({"w_up": torch.randn(32, 16, dtype=torch.float64)}, TypeError, "w_up has dtype"),
        ({"w_gate": torch.randn(32, 16, device="meta")}, ValueError, "w_gate is on meta"),
        ({"threshold": -0.1}, ValueError, "threshold must be a finite number >= 0"),
        (
            {k: torch.ones(*s, dtype=torch.int64) for k, s in _INT_SHAPES.items()},
            TypeError,
            "x has dtype torch.int64; the sparse FFN needs floating-point",
        ),
    ],
)
def test_bad_input(change, error, match) -> None:
    w_gate, w_up, w_down_t = _weights(16, 32, 16, torch.float32)
    args = {
        "x": torch.randn(2, 16),
        "w_gate": w_gate,
        "w_up": w_up,
        "w_down_t": w_down_t,
        "threshold": 0.0,
    }
    args.update(change)
    with pytest.raises(error, match=match):
        sparse_gated_ffn(**args)


def test_cpu_crossover_follows_token_count_and_path(cpu_path) -> None:
    """The measured defaults: with the C++ helper one token stays sparse even with 95% of the
    neurons active while 32 tokens go dense; gathering rows for BLAS, one token goes dense at
    65% active and stays sparse at 30%. An explicit setting applies to every token count.

    Which path ran is seen in the output: an inf in the up row of a neuron that no token
    activates reaches the dense product (0 * inf = NaN) but is never read by the sparse path."""
    d, d_ff = 32, 200
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32)
    x = torch.rand(32, d) + 0.1
    w_gate = w_gate.abs()  # positive x and weights: every neuron active for every token

    def runs_sparse(rows, fraction):
        w = w_gate.clone()
        w[round(fraction * d_ff) :] *= -1  # neurons from here on inactive for every token
        up = w_up.clone()
        up[-1, 0] = float("inf")
        out = cpu_impl.gated_ffn(x[:rows], w, up, w_down_t, 0.0)
        if torch.isnan(out).all():
            return False  # dense
        _close(out, gated_ffn_reference(x[:rows], w, w_up, w_down_t, 0.0), torch.float32)
        return True

    set_cpu_crossover(None)
    if cpu_path == "cpp":
        assert runs_sparse(1, 0.95) and not runs_sparse(32, 0.95)
    else:
        assert not runs_sparse(1, 0.65) and runs_sparse(1, 0.3)
    set_cpu_crossover(0.99)
    try:
        assert runs_sparse(1, 0.95) and runs_sparse(32, 0.95)
    finally:
        set_cpu_crossover(None)


def test_cpu_crossover_env_is_checked(monkeypatch) -> None:
    """PROSPARSE_CPU_CROSSOVER: a bad value is named with the fix; a good one is read at every
    call (so a change takes effect) and set_cpu_crossover() wins over it."""
    for bad in ("70%", "abc", "1.5", "-0.1", "nan"):
        monkeypatch.setenv("PROSPARSE_CPU_CROSSOVER", bad)
        with pytest.raises(ValueError, match=r"PROSPARSE_CPU_CROSSOVER must be .*\[0, 1\]"):
            cpu_impl.get_cpu_crossover(1)
    monkeypatch.setenv("PROSPARSE_CPU_CROSSOVER", "0.5")
    assert cpu_impl.get_cpu_crossover(1) == cpu_impl.get_cpu_crossover(64) == 0.5
    set_cpu_crossover(0.25)
    try:
        assert cpu_impl.get_cpu_crossover(1) == 0.25
    finally:
        set_cpu_crossover(None)
    assert cpu_impl.get_cpu_crossover(1) == 0.5


@pytest.mark.parametrize("bad", [True, "abc", float("nan"), 1.5, 2j])
def test_cpu_crossover_setting_needs_a_fraction(bad) -> None:
    with pytest.raises(ValueError, match=r"crossover must be an active fraction in \[0, 1\]"):
        set_cpu_crossover(bad)


def test_empty_model_width_is_refused() -> None:
    with pytest.raises(ValueError, match="d >= 1, got d = 0"):
        sparse_gated_ffn(
            torch.randn(3, 0), torch.randn(5, 0), torch.randn(5, 0), torch.randn(5, 2), 0.0
        )


# --- dReLU (TurboSparse Sec. 3): ReLU on gate (FATReLU t) and on up ----------------------------


def hand_drelu(x, w_gate, w_up, w_down_t, t):
    """The dense dReLU FFN written out: (FATReLU_t(x W_g^T) * ReLU(x W_u^T)) W_d^T."""
    g, u = x @ w_gate.T, x @ w_up.T
    return (g * (g >= t) * (u * (u > 0))) @ w_down_t


DRELU_SHAPES = [*SHAPES, ((0,), 64, 128), ((2, 0), 64, 128)]  # zero-length inputs too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "d", "d_ff"), DRELU_SHAPES)
@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("crossover", [0.0, 1.0])
def test_drelu_matches_hand_reference(dtype, lead, d, d_ff, threshold, crossover) -> None:
    """``sparse_gated_ffn(..., up_relu=True)`` (CPU C++ and torch paths, dense and sparse
    sides of the crossover) against the dense dReLU FFN written out, in float32 and bf16; it
    differs from the ReLU-gated FFN, so the up ReLU is really applied."""
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, dtype, DEVICE)
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    ref = hand_drelu(x.float(), w_gate.float(), w_up.float(), w_down_t.float(), threshold)
    set_cpu_crossover(crossover)
    try:
        out = sparse_gated_ffn(x, w_gate, w_up, w_down_t, threshold, True)
        assert out.shape == (*lead, d) and out.dtype == dtype
        if x.numel():
            _close(out, ref, dtype)
            gated = gated_ffn_reference(x.float(), w_gate.float(), w_up.float(),
                                        w_down_t.float(), threshold)  # fmt: skip
            assert (gated - ref).abs().max() > 0.1 * ref.abs().max()
        if triton_ffn.available():
            got = triton_ffn.gated_ffn(x, w_gate, w_up, w_down_t, threshold, True)
            assert got.shape == out.shape
            if x.numel():
                _close(got, ref, dtype)
    finally:
        set_cpu_crossover(None)


def test_drelu_skips_rows_whose_up_is_not_positive(cpu_path) -> None:
    """The active set of dReLU is gate kept AND up > 0: a neuron whose gate is active for every
    token but whose up is negative for every token has its down row never read (an inf there
    reaches the dense product as 0 * inf = NaN, not the sparse one), while the result still
    equals the dense dReLU FFN."""
    d, d_ff = 32, 48
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32)
    x = torch.rand(3, d) + 0.1
    w_gate = w_gate.abs()  # positive x and weights: every gate active
    w_up = w_up.abs()
    w_up[5] *= -1  # neuron 5: up < 0 for every token
    poisoned = w_down_t.clone()
    poisoned[5, 0] = float("inf")
    assert torch.isnan(hand_drelu(x, w_gate, w_up, poisoned, 0.0)).any()
    set_cpu_crossover(1.0)  # sparse unless every neuron is active (they are, for the gate)
    try:
        out = sparse_gated_ffn(x, w_gate, w_up, poisoned, 0.0, True)
    finally:
        set_cpu_crossover(None)
    assert torch.isfinite(out).all()
    _close(out, hand_drelu(x, w_gate, w_up, w_down_t, 0.0), torch.float32)


def test_drelu_nan_and_extremes_like_dense(cpu_path) -> None:
    """NaN in one token's input gives NaN in that token's output only; no active neuron gives
    exact zeros; opcheck passes with up_relu."""
    d, d_ff = 32, 48
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32)
    x = torch.randn(3, d)
    x[1, 5] = float("nan")
    set_cpu_crossover(1.0)
    try:
        out = sparse_gated_ffn(x, w_gate, w_up, w_down_t, 0.1, True)
        assert torch.equal(
            torch.isnan(out), torch.isnan(hand_drelu(x, w_gate, w_up, w_down_t, 0.1))
        )
        assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
        positive = x[[0]].abs() + 0.1  # with -|w_up|, every up < 0: no neuron is active
        zero = sparse_gated_ffn(positive, w_gate, -w_up.abs(), w_down_t, 0.0, True)
        assert float(zero.abs().max()) == 0.0
    finally:
        set_cpu_crossover(None)
    torch.library.opcheck(
        torch.ops.prosparse.sparse_gated_ffn.default, (x[[0, 2]], w_gate, w_up, w_down_t, 0.1, True)
    )
