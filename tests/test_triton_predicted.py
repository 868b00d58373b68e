"""The Triton approximate-mode kernels (``predicted_gated_ffn``, its dReLU form and
``predicted_plain_ffn``) against the dense references of :mod:`prosparse_fx.predictors.reference`,
on the compact design's tuned tiles and on tiles small enough to use many programs on small
shapes; under TRITON_INTERPRET=1 when no GPU is present."""

import os

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 before triton is imported when there is no GPU
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

from prosparse_fx.kernels import gated_ffn_reference  # noqa: E402
from prosparse_fx.kernels import triton_predicted as tp  # noqa: E402
from prosparse_fx.predictors import (  # noqa: E402
    low_rank_estimate,
    predicted_active,
    predicted_gated_ffn_reference,
    predicted_plain_ffn_reference,
)
from tests.test_kernels import DEVICE, _close, _weights  # noqa: E402
from tests.test_triton import tuning  # noqa: E402

TILES = ["compact", "compact-gemv-tiles", "compact-small-tiles"]


@pytest.fixture(params=TILES)
def tiles(request):
    """The compact design's tiles in turn (the predicted kernels use them in either design)."""
    with tuning(request.param) as name:
        yield name


def _predictor(d: int, d_ff: int, x: torch.Tensor, rank: int = 4, bias: bool = False):
    """Random factors (float32) and the cut at the median estimate of ``x``: about half the
    (token, neuron) pairs predicted, and tokens predict different neurons."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(rank, d, generator=g).to(DEVICE)
    b = torch.randn(d_ff, rank, generator=g).to(DEVICE)
    pred_bias = torch.randn(d_ff, generator=g).to(DEVICE) if bias else None
    est = low_rank_estimate(x.reshape(-1, d), a, b, pred_bias)
    return a, b, pred_bias, float(est.float().median())


SHAPES = [((1,), 64, 128, 0.0), ((3,), 37, 101, 0.2), ((2, 3), 40, 90, 0.1), ((16,), 48, 80, 0.0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the tuned tiles on every dtype and shape; the GEMV and small tiles (slow in the interpreter)
# on the shapes whose token counts reach their code paths (GEMV: <= 4 tokens; tl.dot: > 4)
MATCH_CASES = [("compact", dt, *shape) for dt in DTYPES for shape in SHAPES] + [
    (tiles, dt, *SHAPES[i]) for tiles, i in (("compact-gemv-tiles", 1), ("compact-small-tiles", 2))
    for dt in DTYPES[:2]
]  # fmt: skip


@pytest.mark.parametrize(
    ("tiles", "dtype", "lead", "d", "d_ff", "threshold"), MATCH_CASES, indirect=["tiles"]
)
def test_predicted_kernels_match_reference(tiles, dtype, lead, d, d_ff, threshold) -> None:
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, dtype, DEVICE)
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    a, b, _, cut = _predictor(d, d_ff, x)
    mask = predicted_active(low_rank_estimate(x.reshape(-1, d), a, b), cut)
    assert 0 < mask.float().mean() < 1  # a partial predicted set
    if mask.shape[0] > 1:
        assert (mask != mask[:1]).any()  # tokens predict different neurons
    f = [t.float() for t in (x, w_gate, w_up, w_down_t)]
    for up_relu in (False, True):
        ref = predicted_gated_ffn_reference(f[0], a, b, cut, *f[1:], threshold, up_relu)
        out = tp.predicted_gated_ffn(x, a, b, cut, w_gate, w_up, w_down_t, threshold, up_relu)
        assert out.shape == (*lead, d) and out.dtype == dtype
        _close(out, ref, dtype)
    a, b, pred_bias, cut = _predictor(d, d_ff, x, bias=True)
    gen = torch.Generator().manual_seed(2)
    b1 = (torch.randn(d_ff, generator=gen) / 4).to(dtype).to(DEVICE)
    b2 = torch.randn(d, generator=gen).to(dtype).to(DEVICE)
    for bias1, bias2 in ((b1, b2), (None, None)):
        ref = predicted_plain_ffn_reference(
            f[0], a, b, pred_bias, cut, f[1], *(None if t is None else t.float() for t in (bias1,)),
            f[3], None if bias2 is None else bias2.float(), threshold,
        )  # fmt: skip
        out = tp.predicted_plain_ffn(x, a, b, pred_bias, cut, w_gate, bias1, w_down_t, bias2,
                                     threshold)  # fmt: skip
        assert out.shape == (*lead, d) and out.dtype == dtype
        _close(out, ref, dtype)


def test_unpredicted_rows_of_gate_up_and_down_are_never_read(tiles) -> None:
    """inf in the gate, up and down rows of neurons no token's predictor selects stays out of
    the output: those rows are not read (the exact kernels must read the whole gate)."""
    d, d_ff = 32, 64
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32, DEVICE)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    a, b, _, cut = _predictor(d, d_ff, x)
    never = ~predicted_active(low_rank_estimate(x, a, b), cut).any(0)
    assert never.any()
    poisoned = [w.clone() for w in (w_gate, w_up, w_down_t)]
    for w in poisoned:
        w[never] = float("inf")
    out = tp.predicted_gated_ffn(x, a, b, cut, *poisoned, 0.0)
    assert torch.isfinite(out).all()
    _close(out, predicted_gated_ffn_reference(x, a, b, cut, w_gate, w_up, w_down_t, 0.0),
           torch.float32)  # fmt: skip
    out = tp.predicted_plain_ffn(x, a, b, None, cut, poisoned[0], None, poisoned[2], None, 0.0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", ["none_predicted", "all_predicted", "nan", "tokens"])
def test_predicted_kernels_extremes(tiles, case) -> None:
    d, d_ff = 32, 48
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32, DEVICE)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    a, b, _, cut = _predictor(d, d_ff, x)
    if case == "none_predicted":
        out = tp.predicted_gated_ffn(x, a, b, 1e30, w_gate, w_up, w_down_t, 0.0)
        assert torch.equal(out, torch.zeros_like(out))
        b2 = torch.ones(d, device=DEVICE)
        out = tp.predicted_plain_ffn(x, a, b, None, 1e30, w_gate, None, w_down_t, b2, 0.0)
        assert torch.equal(out, b2.expand_as(out))
    elif case == "all_predicted":  # every neuron predicted: the exact FFN
        out = tp.predicted_gated_ffn(x, a, b, -1e30, w_gate, w_up, w_down_t, 0.05)
        _close(out, gated_ffn_reference(x, w_gate, w_up, w_down_t, 0.05), torch.float32)
    elif case == "nan":  # a NaN input gives a NaN estimate: predicted, and NaN out
        x[1, 5] = float("nan")
        ref = predicted_gated_ffn_reference(x, a, b, cut, w_gate, w_up, w_down_t, 0.1)
        out = tp.predicted_gated_ffn(x, a, b, cut, w_gate, w_up, w_down_t, 0.1)
        assert torch.isnan(ref[1]).all()
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        _close(out[[0, 2, 3]], ref[[0, 2, 3]], torch.float32)
    else:  # none, and more than 16 tokens, run the reference
        for n in (0, 17):
            xs = torch.randn(n, d, generator=torch.Generator().manual_seed(3)).to(DEVICE)
            out = tp.predicted_gated_ffn(xs, a, b, cut, w_gate, w_up, w_down_t, 0.0)
            ref = predicted_gated_ffn_reference(xs, a, b, cut, w_gate, w_up, w_down_t, 0.0)
            assert out.shape == (n, d)
            torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(("dtype", "t"), [(torch.bfloat16, 0.35), (torch.float16, 0.4)])
def test_predicted_threshold_compares_in_the_input_dtype(tiles, dtype, t) -> None:
    """As the exact kernels: a gate equal to t cast to the input dtype is kept."""
    t_in_dtype = torch.tensor(t, dtype=dtype).item()
    x = torch.ones(2, 16, dtype=dtype, device=DEVICE)
    w_gate = torch.zeros(32, 16, dtype=dtype, device=DEVICE)
    w_gate[::3, 0] = t_in_dtype
    w_gate[1::3, 0] = -1.0
    w_up = torch.ones(32, 16, dtype=dtype, device=DEVICE) / 16
    w_down_t = torch.ones(32, 16, dtype=dtype, device=DEVICE)
    a, b = torch.ones(1, 16, device=DEVICE), torch.ones(32, 1, device=DEVICE)  # all predicted
    ref = gated_ffn_reference(x, w_gate, w_up, w_down_t, t)
    assert ref.abs().max() > 1.0
    _close(tp.predicted_gated_ffn(x, a, b, 0.0, w_gate, w_up, w_down_t, t), ref, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full shapes need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_predicted_full_shapes_on_gpu(tiles, dtype, tokens) -> None:
    d, d_ff = 4096, 11008  # LLaMA-2-7B
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, dtype, "cuda")
    x = torch.randn(tokens, d, device="cuda").to(dtype)
    a, b, _, cut = _predictor(d, d_ff, x, rank=128)
    f = [t.float() for t in (x, w_gate, w_up, w_down_t)]
    for t in (0.0, 0.05):
        ref = predicted_gated_ffn_reference(f[0], a, b, cut, *f[1:], t)
        out = tp.predicted_gated_ffn(x, a, b, cut, w_gate, w_up, w_down_t, t)
        _close(out, ref, dtype, factor=20.0)  # a gate within rounding of t may flip
