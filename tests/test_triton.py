"""The two Triton designs of the sparse FFN ("blocks" and "compact", with the tuned tiles and
with tiles small enough to exercise every code path on small shapes) against the dense
reference; under TRITON_INTERPRET=1 when no GPU is present."""

import contextlib
import os

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 before triton is imported when there is no GPU
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

from prosparse_fx.kernels import gated_ffn_reference, plain_ffn_reference, triton_ffn  # noqa: E402
from tests.test_kernels import DEVICE, _close, _weights  # noqa: E402

# Triton designs: the tuned tiles, and tiles small enough that small shapes use several listing
# programs (neurons appended out of order), split-K atomics in up and many groups in down.
TRITON_CONFIGS = {
    "blocks": {"design": "blocks"},
    "compact": {"design": "compact"},
    "compact-gemv-tiles": {  # 8 rows (below tl.dot's 16) and wide slices: the launcher adapts
        "design": "compact",
        "compact": {
            "block_c": 1024,
            "up_rows": 8,
            "up_block_k": 4096,
            "up_split_k": 2,
            "down_rows": 8,
            "down_block_d": 4096,
            "num_warps": 4,
        },
    },
    "compact-small-tiles": {
        "design": "compact",
        "compact": {
            "block_c": 16,
            "up_rows": 16,
            "up_block_k": 16,
            "up_split_k": 3,
            "down_rows": 16,
            "down_block_d": 16,
            "num_warps": 4,
        },
    },
}


@contextlib.contextmanager
def tuning(name: str):
    """The Triton table ``TRITON_CONFIGS[name]`` applied while the block runs (the module's
    table is restored afterwards); skips the test where Triton is not installed."""
    if not triton_ffn.available():
        pytest.skip("Triton is not installed")
    saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in triton_ffn.TUNING.items()}
    triton_ffn.apply_tuning(TRITON_CONFIGS[name])
    try:
        yield name
    finally:
        triton_ffn.TUNING.clear()
        triton_ffn.TUNING.update(saved)


@pytest.fixture(params=list(TRITON_CONFIGS))
def triton_config(request):
    """Each Triton design in turn."""
    with tuning(request.param) as name:
        yield name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("lead", "d", "d_ff", "threshold"),
    [((1,), 64, 128, 0.0), ((3,), 37, 101, 0.2), ((2, 3), 40, 90, 0.1), ((16,), 48, 80, 0.0)],
)
def test_triton_designs_match_reference(triton_config, dtype, lead, d, d_ff, threshold) -> None:
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, dtype, DEVICE)
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    ref = gated_ffn_reference(x.float(), w_gate.float(), w_up.float(), w_down_t.float(), threshold)
    out = triton_ffn.gated_ffn(x, w_gate, w_up, w_down_t, threshold)
    assert out.shape == (*lead, d) and out.dtype == dtype
    _close(out, ref, dtype)
    b1 = torch.randn(d_ff, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE) / 4
    ref = plain_ffn_reference(x.float(), w_gate.float(), b1.float(), w_down_t.float(), None, 0.1)
    _close(triton_ffn.plain_ffn(x, w_gate, b1, w_down_t, None, 0.1), ref, dtype)


@pytest.mark.parametrize("case", ["all_zero", "all_active", "nan"])
def test_triton_designs_extremes(triton_config, case) -> None:
    d, d_ff = 32, 48
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, torch.float32, DEVICE)
    x = torch.rand(4, d, device=DEVICE) + 0.1
    threshold = {"all_zero": 1e6, "all_active": 0.0, "nan": 0.1}[case]
    if case == "all_active":
        w_gate = w_gate.abs()  # positive x and weights: every gate > 0
    if case == "nan":
        x[1, 5] = float("nan")
    ref = gated_ffn_reference(x, w_gate, w_up, w_down_t, threshold)
    out = triton_ffn.gated_ffn(x, w_gate, w_up, w_down_t, threshold)
    if case == "all_zero":
        assert torch.equal(out, torch.zeros_like(out))
    elif case == "nan":
        assert torch.isnan(ref[1]).all()
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
    else:
        _close(out, ref, torch.float32)


@pytest.mark.parametrize(("dtype", "t"), [(torch.bfloat16, 0.35), (torch.float16, 0.4)])
def test_triton_threshold_compares_in_the_input_dtype(triton_config, dtype, t) -> None:
    """FATReLU keeps g >= t with t cast to g's dtype, as the dense model compares: in bf16
    t = 0.35 is 0.349609375 (in fp16 0.4 is 0.39990...), and a gate equal to it is kept."""
    t_in_dtype = torch.tensor(t, dtype=dtype).item()
    assert t_in_dtype < t
    x = torch.ones(2, 16, dtype=dtype, device=DEVICE)
    w_gate = torch.zeros(32, 16, dtype=dtype, device=DEVICE)
    w_gate[::3, 0] = t_in_dtype  # gates exactly at t in the input dtype: kept
    w_gate[1::3, 0] = -1.0
    w_up = torch.ones(32, 16, dtype=dtype, device=DEVICE) / 16
    w_down_t = torch.ones(32, 16, dtype=dtype, device=DEVICE)
    ref = gated_ffn_reference(x, w_gate, w_up, w_down_t, t)
    assert ref.abs().max() > 1.0  # the gates at t count in the dense model
    _close(triton_ffn.gated_ffn(x, w_gate, w_up, w_down_t, t), ref, dtype)
    ref = plain_ffn_reference(x, w_gate, None, w_down_t, None, t)
    _close(triton_ffn.plain_ffn(x, w_gate, None, w_down_t, None, t), ref, dtype)


def test_triton_unknown_design_is_named() -> None:
    if not triton_ffn.available():
        pytest.skip("Triton is not installed")
    w_gate, w_up, w_down_t = _weights(16, 32, 16, torch.float32, DEVICE)
    saved = triton_ffn.TUNING["design"]
    triton_ffn.TUNING["design"] = "dense"
    try:
        with pytest.raises(ValueError, match=r"unknown Triton design 'dense'.*blocks"):
            triton_ffn.gated_ffn(torch.randn(1, 16, device=DEVICE), w_gate, w_up, w_down_t, 0.0)
    finally:
        triton_ffn.TUNING["design"] = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full shapes need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_triton_full_shapes_on_gpu(triton_config, dtype, tokens) -> None:
    d, d_ff = 4096, 11008  # LLaMA-2-7B
    w_gate, w_up, w_down_t = _weights(d, d_ff, d, dtype, "cuda")
    x = torch.randn(tokens, d, device="cuda").to(dtype)
    for t in (0.0, 0.05):
        ref = gated_ffn_reference(x.float(), w_gate.float(), w_up.float(), w_down_t.float(), t)
        # 11008 neurons: a gate within rounding of t may flip, each flip moves y by about 1e-4
        _close(triton_ffn.gated_ffn(x, w_gate, w_up, w_down_t, t), ref, dtype, factor=20.0)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"design": "Compact"}, "unknown Triton design 'Compact'"),
        ({"gated": {"block_n": 64}}, "unknown Triton tuning entry 'gated'"),
        ({"compact": {"up_row": 8}}, "unknown compact parameter 'up_row'"),
        ({"blocks": {"block_n": 48}}, "blocks block_n must be a power of 2 of at least 16"),
        ({"blocks": {"block_k": 8}}, "blocks block_k must be a power of 2 of at least 16"),
        ({"compact": {"up_split_k": 0}}, "compact up_split_k must be a positive integer"),
        ({"compact": {"num_warps": 3}}, "compact num_warps must be 1, 2, 4, 8 or 16"),
        ({"compact": {"down_rows": True}}, "compact down_rows must be a power of 2"),
        (["compact"], "a Triton tuning table is a dict"),
    ],
)
def test_bad_tuning_is_refused_and_changes_nothing(table, match) -> None:
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in triton_ffn.TUNING.items()}
    with pytest.raises(ValueError, match=match):
        triton_ffn.apply_tuning(table)
    assert triton_ffn.TUNING == before


def test_partial_tuning_keeps_the_other_entries() -> None:
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in triton_ffn.TUNING.items()}
    try:
        triton_ffn.apply_tuning({"design": "compact", "compact": {"up_rows": 8}})
        assert triton_ffn.TUNING["design"] == "compact"
        assert triton_ffn.TUNING["compact"] == {**before["compact"], "up_rows": 8}
        assert triton_ffn.TUNING["blocks"] == before["blocks"]
    finally:
        triton_ffn.TUNING.clear()
        triton_ffn.TUNING.update(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("lead", "d", "d_ff", "threshold"), [((1,), 64, 128, 0.0), ((2, 3), 40, 90, 0.1)]
)
def test_triton_designs_drelu(triton_config, dtype, lead, d, d_ff, threshold) -> None:
    """dReLU (up_relu) in every design against the dense dReLU FFN written out; a down row of a
    neuron whose up is negative for every token is never read (an inf there stays out)."""
    from tests.test_kernels import hand_drelu

    w_gate, w_up, w_down_t = _weights(d, d_ff, d, dtype, DEVICE)
    x = torch.randn(*lead, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    ref = hand_drelu(x.float(), w_gate.float(), w_up.float(), w_down_t.float(), threshold)
    out = triton_ffn.gated_ffn(x, w_gate, w_up, w_down_t, threshold, True)
    assert out.shape == (*lead, d) and out.dtype == dtype
    _close(out, ref, dtype)
    xp = x.abs() + 0.1  # positive: the signs of the weights decide
    wg, wu = w_gate.abs(), w_up.abs()
    wu[3] = -wu[3]  # neuron 3: gate active, up < 0 for every token
    poisoned = w_down_t.clone()
    poisoned[3, 0] = float("inf")
    out = triton_ffn.gated_ffn(xp, wg, wu, poisoned, 0.0, True)
    assert torch.isfinite(out).all()
    _close(out, hand_drelu(xp.float(), wg.float(), wu.float(), w_down_t.float(), 0.0), dtype)
