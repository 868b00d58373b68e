"""Activation predictors (approximate mode, issue 15): SVD factors, the recall-calibrated cut,
storage and the dense references of the predicted FFN ops."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prosparse_fx import find_ffn_sites, relufy_
from prosparse_fx.atomic import OutputWriteError
from prosparse_fx.kernels.reference import gated_ffn_reference, plain_ffn_reference
from prosparse_fx.predictors import (
    Predictor,
    PredictorFileError,
    TrainingConfig,
    build_predictors,
    cut_for_recall,
    estimate,
    gate_fingerprint,
    gate_weight,
    load_predictors,
    low_rank_estimate,
    measure_predictors,
    predicted_active,
    predicted_gated_ffn_reference,
    predicted_mask,
    predicted_plain_ffn_reference,
    save_predictors,
    sparsity_at_recall,
    svd_factors,
    train_factors,
)
from prosparse_fx.predictors.predictor import KINDS
from prosparse_fx.sparse_modules import NotSparseError, PredictedGatedFFN
from tests.models import VOCAB, tiny

T = 0.05  # FATReLU threshold of the test models
FULL = 32  # min(d, d_ff) of the tiny models


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llama_sites() -> list:
    """The (SiLU) sites of tiny llama; the models below are relufied along them, no capture."""
    return find_ffn_sites(tiny("llama"))


def _relufied(family: str, activation: str, sites: list, seed: int = 0):
    model = tiny(family, seed=seed)
    return model, relufy_(model, activation, T, sites=sites)


@pytest.fixture(scope="module")
def llama(llama_sites):
    return _relufied("llama", "fatrelu", llama_sites)


@pytest.fixture(scope="module")
def gpt2():
    model = tiny("gpt2")
    return model, relufy_(model, "fatrelu", T)


@pytest.fixture(scope="module")
def models(llama, gpt2, llama_sites) -> dict:
    return {"llama": llama, "gpt2": gpt2, "drelu": _relufied("llama", "drelu", llama_sites)}


def _capture(model, site, windows: torch.Tensor):
    """FFN input x ``[tokens, d]``, x1 ``[tokens, d_ff]`` and FFN output ``[tokens, d]`` of one
    site, from one forward of all windows (the batch build_predictors runs with batch_size=4)."""
    seen = {}
    ffn, down = model.get_submodule(site.path), model.get_submodule(site.down)
    h1 = ffn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    h2 = down.register_forward_pre_hook(lambda m, args: seen.update(x1=args[0]))
    try:
        with torch.no_grad():
            model(input_ids=windows)
    finally:
        h1.remove()
        h2.remove()
    return tuple(seen[k].reshape(-1, seen[k].shape[-1]) for k in ("x", "x1", "y"))


# --------------------------------------------------------------------------- SVD factors


@pytest.mark.parametrize("shape", [(64, 32), (16, 32)])
def test_svd_full_rank_reproduces_the_gate(shape) -> None:
    w = torch.randn(shape)
    a, b = svd_factors(w, min(shape))
    assert a.shape == (min(shape), shape[1]) and b.shape == (shape[0], min(shape))
    x = torch.randn(5, shape[1])
    torch.testing.assert_close(x @ a.T @ b.T, x @ w.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)


def test_svd_low_rank_is_the_best_rank_r_approximation() -> None:
    w = torch.randn(64, 32)
    a, b = svd_factors(w, 5)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    torch.testing.assert_close(b @ a, best, atol=1e-5, rtol=1e-5)
    # Eckart-Young: the Frobenius error is the norm of the dropped singular values
    err = torch.linalg.matrix_norm(w - b @ a)
    assert math.isclose(float(err), float(s[5:].square().sum().sqrt()), rel_tol=1e-4)
    # a worse rank-5 factorisation (rows 1..5 of the SVD instead of 0..4) has a larger error
    worse = u[:, 1:6] @ torch.diag(s[1:6]) @ vh[1:6]
    assert float(torch.linalg.matrix_norm(w - worse)) > float(err)


def test_svd_keeps_dtype_and_refuses_bad_ranks() -> None:
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    a, b = svd_factors(w, 8)
    assert a.dtype == b.dtype == torch.bfloat16
    for rank in (0, 33, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"\[1, min\(d, d_ff\)\] = \[1, 32\]"):
            svd_factors(w, rank)


# --------------------------------------------------------------------------- the cut


def test_cut_for_recall_is_the_quantile_on_a_hand_built_example() -> None:
    values = torch.arange(1.0, 11.0)  # 1..10
    three = float(torch.nextafter(torch.tensor(3.0), torch.tensor(-math.inf)))
    assert cut_for_recall(values, 0.8) == three  # keep 8 of 10: 3..10
    assert cut_for_recall(values, 0.75) == three  # ceil(7.5) = 8: at least the target
    assert 2.0 < three < 3.0 and int((values > three).sum()) == 8
    one = cut_for_recall(values, 1.0)
    assert one < 1.0 and int((values > one).sum()) == 10
    assert 9.0 < cut_for_recall(values, 0.05) < 10.0  # keep 1: the largest
    ties = torch.tensor([5.0, 2.0, 2.0, 1.0, 2.0])
    cut = cut_for_recall(ties, 0.4)  # keep 2: the lowest kept is a 2, so all three 2s stay
    assert 1.0 < cut < 2.0 and int((ties > cut).sum()) == 4
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            cut_for_recall(values, bad)
    with pytest.raises(ValueError, match="finite"):
        cut_for_recall(torch.tensor([1.0, math.nan]), 0.5)
    with pytest.raises(ValueError, match="at least one"):
        cut_for_recall(torch.empty(0), 0.5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_build_predictors_reaches_the_recall_and_measures_it(family, models, windows) -> None:
    model, sites = models[family]
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    assert [p.site for p in predictors] == [s.path for s in sites]
    for p, s in zip(predictors, sites):
        w, bias = gate_weight(model, s)
        a, b = svd_factors(w, 4)
        assert p.kind == "svd" and p.rank == 4 and torch.equal(p.a, a) and torch.equal(p.b, b)
        assert (p.bias is None) == (family == "llama")
        x, x1, _ = _capture(model, s, windows)
        active = x1 != 0
        est = estimate(p, x).float()
        assert p.cut == cut_for_recall(est[active], 0.9)
        mask = predicted_mask(p, x)
        both = int((mask & active).sum())
        assert p.recall == both / int(active.sum()) >= 0.9
        assert p.precision == both / int(mask.sum())
        assert p.true_sparsity == 1 - int(active.sum()) / active.numel()
        assert p.predicted_sparsity == 1 - int(mask.sum()) / mask.numel()
        assert 0.3 < p.true_sparsity < 0.95 and p.predicted_sparsity < p.true_sparsity


def test_the_cut_from_a_subsample_is_seeded(llama, windows, monkeypatch) -> None:
    from prosparse_fx.predictors import calibrate

    model, sites = llama
    full = build_predictors(model, windows, sites, rank=4, recall=0.9)
    monkeypatch.setattr(calibrate, "SAMPLES_PER_LAYER", 200)  # of ~1400 active pairs a layer
    first = build_predictors(model, windows, sites, rank=4, recall=0.9, seed=0)
    again = build_predictors(model, windows, sites, rank=4, recall=0.9, seed=0)
    other = build_predictors(model, windows, sites, rank=4, recall=0.9, seed=1)
    assert [p.cut for p in first] == [p.cut for p in again]
    assert [p.cut for p in first] != [p.cut for p in other]
    for p, q in zip(first, full):  # a 200-value sample: the recall is near the target
        assert abs(p.recall - 0.9) < 0.05 and p.cut != q.cut


def _dense_and_predicted(model, site, p, x):
    """The exact FFN and the predicted one (the references) on ``x``."""
    if site.kind == "gated":
        w_gate = model.get_submodule(site.gate).weight
        w_up = model.get_submodule(site.up).weight
        w_down_t = model.get_submodule(site.down).weight.T
        args = (w_gate, w_up, w_down_t, site.threshold, site.up_relu)
        return (
            gated_ffn_reference(x, *args),
            predicted_gated_ffn_reference(x, p.a, p.b, p.cut, *args),
        )
    fc1, fc2 = model.get_submodule(site.up), model.get_submodule(site.down)  # Conv1D: [in, out]
    args = (fc1.weight.T, fc1.bias, fc2.weight, fc2.bias, site.threshold)
    return (
        plain_ffn_reference(x, *args),
        predicted_plain_ffn_reference(x, p.a, p.b, p.bias, p.cut, *args),
    )


@pytest.mark.parametrize("family", ["llama", "drelu", "gpt2"])
def test_full_rank_recall_one_gives_the_exact_ffn(family, models, windows) -> None:
    model, sites = models[family]
    predictors = build_predictors(model, windows, sites, rank=FULL, recall=1.0)
    for p, s in zip(predictors, sites):
        assert p.recall == 1.0
        x, _, y = _capture(model, s, windows)
        dense, predicted = _dense_and_predicted(model, s, p, x)
        assert torch.equal(predicted, dense)
        torch.testing.assert_close(predicted, y, atol=1e-5, rtol=1e-5)
        # at full rank the estimate is the gate: the cut sits at the threshold
        assert T - 1e-5 < p.cut < T + 0.01
        if family != "drelu":  # dReLU also zeroes where up <= 0, which the gate cannot see
            assert p.precision > 0.99
            assert abs(p.predicted_sparsity - p.true_sparsity) < 0.01


# --------------------------------------------------------------------------- the references


def _hand_built():
    """d = 2, d_ff = 3, t = 0.7: x = [1, 0.5] gives gate [1, 0.5, 1.5] -> FATReLU [1, 0, 1.5],
    up [2, 1, 1], so x1 = [2, 0, 1.5]; neuron 1 is inactive."""
    x = torch.tensor([[1.0, 0.5]])
    w_gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w_up = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    w_down_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    return x, w_gate, w_up, w_down_t, 0.7


def test_predicted_inactive_gives_zero_and_a_miss_is_the_only_difference() -> None:
    x, w_gate, w_up, w_down_t, t = _hand_built()
    dense = gated_ffn_reference(x, w_gate, w_up, w_down_t, t)
    assert dense.tolist() == [[3.5, 1.5]]
    a = torch.eye(2)

    def run(b: torch.Tensor) -> torch.Tensor:
        return predicted_gated_ffn_reference(x, a, b, 0.0, w_gate, w_up, w_down_t, t)

    # estimate x @ b.T = [1, 0.5, 1.5] > 0: all predicted, inactive neuron 1 included
    assert torch.equal(run(w_gate), dense)
    # estimate [1, 0.5, -1]: neuron 1 predicted (inactive, adds 0), active neuron 2 missed
    missed = run(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    assert missed.tolist() == [[2.0, 0.0]]
    x1_2 = 1.5  # FATReLU(1.5) * up 1
    assert torch.equal(dense - missed, x1_2 * w_down_t[2:])
    # estimate [1, -0.5, -1]: neuron 1 not predicted either: the same output
    assert torch.equal(run(torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])), missed)


def test_plain_hand_built_miss() -> None:
    x, w1, _, w2_t, t = _hand_built()
    b1 = torch.tensor([0.0, 0.0, -0.5])  # h = [1, 0.5, 1.0] -> FATReLU [1, 0, 1]
    b2 = torch.tensor([0.25, 0.25])
    dense = plain_ffn_reference(x, w1, b1, w2_t, b2, t)
    assert dense.tolist() == [[2.25, 1.25]]
    a = torch.eye(2)
    exact = predicted_plain_ffn_reference(x, a, w1, b1, 0.0, w1, b1, w2_t, b2, t)
    assert torch.equal(exact, dense)
    # the predictor's own bias lowers neuron 2's estimate below the cut: it is missed
    miss = predicted_plain_ffn_reference(
        x, a, w1, torch.tensor([0.0, 0.0, -2.0]), 0.0, w1, b1, w2_t, b2, t
    )
    assert torch.equal(dense - miss, 1.0 * w2_t[2:])


def test_nan_in_gives_nan_out_even_when_nothing_is_predicted() -> None:
    d, d_ff = 32, 64
    a, b = torch.randn(4, d), torch.randn(d_ff, 4)
    w_gate, w_up, w_down_t = torch.randn(d_ff, d), torch.randn(d_ff, d), torch.randn(d_ff, d)
    x = torch.randn(3, d)
    x[1, 5] = math.nan
    cut = 1e9  # no finite estimate is above it
    out = predicted_gated_ffn_reference(x, a, b, cut, w_gate, w_up, w_down_t, T)
    assert out[1].isnan().all()
    assert torch.equal(out[[0, 2]], torch.zeros(2, d))
    plain = predicted_plain_ffn_reference(
        x, a, b, torch.zeros(d_ff), cut, w_gate, torch.zeros(d_ff), w_down_t, torch.ones(d), T
    )
    assert plain[1].isnan().all() and torch.equal(plain[[0, 2]], torch.ones(2, d))
    p = Predictor("ffn", "svd", 4, a, b, cut)
    assert predicted_mask(p, x)[1].all() and not predicted_mask(p, x)[[0, 2]].any()
    est = torch.tensor([math.nan, math.inf, -math.inf, 0.5, -0.5])
    assert predicted_active(est, 0.0).tolist() == [True, True, True, True, False]


def test_zero_length_input() -> None:
    d, d_ff, d_out = 32, 64, 24
    a, b = torch.randn(4, d), torch.randn(d_ff, 4)
    w, w_down_t = torch.randn(d_ff, d), torch.randn(d_ff, d_out)
    x = torch.empty(0, d)
    gated = predicted_gated_ffn_reference(x, a, b, 0.0, w, w, w_down_t, T, up_relu=True)
    assert gated.shape == (0, d_out)
    plain = predicted_plain_ffn_reference(x, a, b, None, 0.0, w, None, w_down_t, None, T)
    assert plain.shape == (0, d_out)
    assert low_rank_estimate(x, a, b).shape == (0, d_ff)
    mask = predicted_mask(Predictor("ffn", "svd", 4, a, b, 0.0), x)
    assert mask.shape == (0, d_ff) and mask.dtype == torch.bool


# --------------------------------------------------------------------------- build refusals


def test_build_refusals(llama, llama_sites, windows) -> None:
    model, sites = llama
    for recall in (0.0, -0.1, 1.5, math.nan, "high"):
        with pytest.raises(ValueError, match=r"recall must be in \(0, 1\]"):
            build_predictors(model, windows, sites, rank=4, recall=recall)
    for rank in (0, 33):
        with pytest.raises(ValueError, match=r"\[1, 32\]"):
            build_predictors(model, windows, sites, rank=rank)
    with pytest.raises(ValueError, match="kind must be one of svd, trained"):
        build_predictors(model, windows, sites, kind="deja-vu", rank=4)
    with pytest.raises(ValueError, match="token ids"):
        build_predictors(model, windows.float(), sites, rank=4)
    with pytest.raises(ValueError, match="no FFN sites"):
        build_predictors(model, windows, [], rank=4)
    for bad_id in (-1, VOCAB):
        with pytest.raises(ValueError, match=rf"outside \[0, {VOCAB}\)"):
            build_predictors(model, windows.clone().fill_(bad_id), sites, rank=4)
    expert = [dataclasses.replace(sites[0], expert=0)] + sites[1:]
    with pytest.raises(ValueError, match="mixture-of-experts .* not supported yet"):
        build_predictors(model, windows, expert, rank=4)
    silu = tiny("llama")  # SiLU: no exact zeros
    with pytest.raises(NotSparseError, match="relufy_"):
        build_predictors(silu, windows, llama_sites, rank=4)
    dead = tiny("llama")
    dead_sites = relufy_(dead, "fatrelu", 1e6, sites=llama_sites)
    for kind in KINDS:
        with pytest.raises(ValueError, match="model.layers.0.mlp: no neuron was active"):
            build_predictors(dead, windows, dead_sites, kind=kind, rank=4)


# --------------------------------------------------------------------------- the trained kind


def _planted(n: int, seed: int):
    """Tokens whose active neurons are set by a planted rank-3 map ``m`` (not the gate): x
    ``[n, 16]``, active = x @ m.T > 0.5 (``[n, 24]``), and a random 'gate' whose SVD
    predicts them poorly."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g)
    gate = torch.randn(24, 16, generator=g)
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed + 1))
    return x, x @ m.T > 0.5, m, gate


def test_sparsity_at_recall_hand_built() -> None:
    est = torch.tensor([[3.0, 1.0, -1.0, 0.0], [2.0, -2.0, 0.5, -3.0]])
    active = torch.tensor([[True, False, False, False], [True, False, True, False]])
    # recall 1: the cut sits just below 0.5, the lowest active estimate: 4 of 8 above it
    assert sparsity_at_recall(est, active, 1.0) == 0.5
    # recall 2/3 keeps the two largest actives (3 and 2): only they are above the cut
    assert sparsity_at_recall(est, active, 2 / 3) == 0.75
    assert sparsity_at_recall(est, torch.zeros_like(active), 0.9) == 0.0


def test_training_learns_a_planted_mask_the_gate_does_not_predict() -> None:
    x, active, m, gate = _planted(4000, 0)
    a, b = svd_factors(gate, 3)
    config = TrainingConfig(epochs=30, lr=1e-2, batch_tokens=128)
    ta, tb, tbias = train_factors(x, active, a, b, recall=0.99, config=config)
    assert tbias is None and ta.shape == a.shape and tb.shape == b.shape
    xf = torch.randn(2000, 16, generator=torch.Generator().manual_seed(99))
    af = xf @ m.T > 0.5
    true_sparsity = 1 - float(af.float().mean())
    start = sparsity_at_recall(low_rank_estimate(xf, a, b), af, 0.99)
    trained = sparsity_at_recall(low_rank_estimate(xf, ta, tb), af, 0.99)
    # the planted map is rank 3: the trained factors nearly recover it on unseen tokens
    assert start < true_sparsity - 0.25
    assert trained > true_sparsity - 0.08, (start, trained, true_sparsity)


def test_training_keeps_the_start_when_no_epoch_beats_it() -> None:
    x, active, m, _ = _planted(500, 1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    a, b = (s[:3, None] * vh[:3]), u[:, :3]  # the planted map itself, up to the 0.5 offset
    bias = torch.full((24,), -0.5)
    ta, tb, tbias = train_factors(
        x, active, a, b, bias, recall=1.0, config=TrainingConfig(epochs=1, lr=0.5)
    )
    # the start is perfect on every token (sparsity at recall 1 = true sparsity), and a huge
    # step only worsens it: the start is returned, untouched
    assert torch.equal(ta, a) and torch.equal(tb, b) and torch.equal(tbias, bias)


def test_training_config_and_train_factors_refusals() -> None:
    for bad in (
        {"epochs": 0},
        {"epochs": 1.5},
        {"batch_tokens": 0},
        {"lr": 0.0},
        {"lr": math.nan},
        {"pos_weight": -1.0},
        {"pos_weight": math.inf},
        {"holdout": 0.0},
        {"holdout": 1.0},
    ):
        with pytest.raises(ValueError, match=f"TrainingConfig.{next(iter(bad))}"):
            TrainingConfig(**bad)
    x, active, _, gate = _planted(50, 2)
    a, b = svd_factors(gate, 3)
    with pytest.raises(ValueError, match="do not fit together"):
        train_factors(x[:, :8], active, a, b, recall=0.9)
    with pytest.raises(ValueError, match="do not fit together"):
        train_factors(x, active, a, b, torch.zeros(5), recall=0.9)
    with pytest.raises(ValueError, match="one active"):
        train_factors(x, torch.zeros_like(active), a, b, recall=0.9)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_build_trained_predictors(family, models) -> None:
    model, sites = models[family]
    # 512 tokens: on the 64 of `windows` no epoch beats the start on the held-back tenth
    windows = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(3))
    config = TrainingConfig(epochs=20, lr=1e-2, batch_tokens=16)
    svd = build_predictors(model, windows, sites, rank=4, recall=0.9)
    trained = build_predictors(
        model, windows, sites, kind="trained", rank=4, recall=0.9, training=config
    )
    again = build_predictors(
        model, windows, sites, kind="trained", rank=4, recall=0.9, training=config
    )
    changed = 0
    for p, q, r, s in zip(trained, again, svd, sites):
        assert p.kind == "trained" and p.rank == 4 and p.site == s.path
        assert torch.equal(p.a, q.a) and p.cut == q.cut  # seeded
        assert (p.bias is None) == (family == "llama")
        changed += not torch.equal(p.a, r.a)
        # the cut, recall and sparsities are measured as for the SVD kind
        x, x1, _ = _capture(model, s, windows)
        active = x1 != 0
        assert p.cut == cut_for_recall(estimate(p, x).float()[active], 0.9)
        mask = predicted_mask(p, x)
        assert p.recall == int((mask & active).sum()) / int(active.sum()) >= 0.9
        assert p.predicted_sparsity == 1 - int(mask.sum()) / mask.numel()
        if family == "gpt2":  # the bias is trained too, and is not fc1's bias tensor
            assert p.bias.data_ptr() != gate_weight(model, s)[1].data_ptr()
    assert changed >= 1  # training moved the factors of at least one site


# --------------------------------------------------------------------------- storage


@pytest.fixture(scope="module")
def built(models, windows) -> dict:
    return {
        f: build_predictors(models[f][0], windows, models[f][1], rank=4, recall=0.9)
        for f in ("llama", "gpt2")
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip(family, models, built, tmp_path) -> None:
    model, sites = models[family]
    saved = [dataclasses.replace(p, speedup=1.5 + i) for i, p in enumerate(built[family])]
    assert save_predictors(tmp_path, saved, model, sites) == tmp_path
    record = json.loads((tmp_path / "predictors.json").read_text())
    assert record["version"] == 1 and len(record["sites"]) == len(sites)
    assert record["sites"][0]["d"] == 32 and record["sites"][0]["d_ff"] == 64
    loaded = load_predictors(tmp_path, model, sites)
    for p, q in zip(saved, loaded):
        for f in dataclasses.fields(Predictor):
            u, v = getattr(p, f.name), getattr(q, f.name)
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, f.name
    assert not [e for e in tmp_path.iterdir() if e.name.startswith(".prosparse-tmp-")]


def test_save_refuses_to_overwrite_and_bad_predictors(llama, built, tmp_path) -> None:
    model, sites = llama
    save_predictors(tmp_path, built["llama"], model, sites)
    before = (tmp_path / "predictors.json").read_bytes()
    with pytest.raises(OutputWriteError, match="overwrite=True"):
        save_predictors(tmp_path, built["llama"], model, sites)
    assert (tmp_path / "predictors.json").read_bytes() == before
    changed = [dataclasses.replace(p, cut=p.cut + 1) for p in built["llama"]]
    save_predictors(tmp_path, changed, model, sites, overwrite=True)
    assert load_predictors(tmp_path, model, sites)[0].cut == changed[0].cut
    unmeasured = [dataclasses.replace(p, recall=math.nan) for p in built["llama"]]
    save_predictors(tmp_path / "unmeasured", unmeasured, model, sites)  # recall: null
    assert math.isnan(load_predictors(tmp_path / "unmeasured", model, sites)[0].recall)
    nan = [dataclasses.replace(built["llama"][0], a=built["llama"][0].a.clone())]
    nan[0].a[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_predictors(tmp_path / "other", nan + built["llama"][1:], model, sites)
    with pytest.raises(ValueError, match="not"):
        save_predictors(tmp_path / "other", built["llama"][:1], model, sites)


def _edit_json(folder, edit) -> None:
    path = folder / "predictors.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _edit_tensors(folder, edit) -> None:
    """Change the tensors and record their new sha256, as a deliberate editor would."""
    path = folder / "predictors.safetensors"
    tensors = safetensors.torch.load(path.read_bytes())
    edit(tensors)
    data = safetensors.torch.save(tensors)
    path.write_bytes(data)
    _edit_json(folder, lambda r: r.update(tensors_sha256=hashlib.sha256(data).hexdigest()))


def test_load_refusals(models, built, llama_sites, tmp_path) -> None:
    model, sites = models["llama"]

    def saved(name: str):
        folder = tmp_path / name
        save_predictors(folder, built["llama"], model, sites)
        return folder

    def refused(folder, match: str, on_model=model, on_sites=sites) -> None:
        with pytest.raises(PredictorFileError, match=match):
            load_predictors(folder, on_model, on_sites)

    folder = saved("missing")
    (folder / "predictors.safetensors").unlink()
    refused(folder, "predictors.safetensors is missing")
    # another model: a different seed's tiny llama
    other, other_sites = _relufied("llama", "fatrelu", llama_sites, seed=1)
    refused(saved("other"), "gate weight differs.*another model", other, other_sites)
    # another width
    torch.manual_seed(0)
    narrow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
    ).eval()
    narrow_sites = relufy_(narrow, "fatrelu", T)
    refused(saved("narrow"), "d=32, d_ff=64; the model's is d=32, d_ff=48", narrow, narrow_sites)
    # other sites
    refused(saved("fewer"), "2 FFN site.*but 1 sites", model, sites[:1])
    gpt2, gpt2_sites = models["gpt2"]
    refused(saved("paths"), "'model.layers.0.mlp' where the model has 'transformer.h.0.mlp'",
            gpt2, gpt2_sites)  # fmt: skip
    # tampered JSON
    folder = saved("text")
    (folder / "predictors.json").write_text("{not json")
    refused(folder, "not readable JSON")
    for name, edit, match in [
        ("width", lambda r: r["sites"][1].update(d_ff=48), "d_ff=48; the model's is"),
        ("cut", lambda r: r["sites"][0].update(cut="x"), "field 'cut'"),
        ("rank", lambda r: r["sites"][0].update(rank=5), r"tensor a has shape \[4, 32\]"),
        ("bigrank", lambda r: r["sites"][0].update(rank=40), r"\[1, 32\]"),
        ("kind", lambda r: r["sites"][0].update(kind="magic"), "unknown predictor kind"),
        ("recall", lambda r: r["sites"][0].update(recall=2.0), "not a fraction"),
        ("speedup", lambda r: r["sites"][0].update(speedup=-1.0), "not a positive number"),
        ("speedup0", lambda r: r["sites"][0].update(speedup="fast"), "field 'speedup'"),
        ("format", lambda r: r.update(format="other"), "not a predictors file"),
        ("newer", lambda r: r.update(version=2), "format version 2, newer"),
        ("bias", lambda r: r["sites"][0].update(bias=True), "no tensor model.layers.0.mlp.bias"),
    ]:
        folder = saved(name)
        _edit_json(folder, edit)
        refused(folder, match)
    folder = saved("untimed")  # a file without speedups (written before they were measured)
    _edit_json(folder, lambda r: [e.pop("speedup") for e in r["sites"]])
    assert all(math.isnan(p.speedup) for p in load_predictors(folder, model, sites))
    # tensors changed behind the JSON's back (or a torn save)
    folder = saved("torn")
    (folder / "predictors.safetensors").write_bytes(b"x" + b"\0" * 16)
    refused(folder, "not the tensors file that predictors.json was saved with")
    # NaN, integer and misshapen tensors, with a consistent sha256
    for name, edit, match in [
        ("nan", lambda t: t["model.layers.1.mlp.b"].__setitem__((0, 0), math.nan), "NaN"),
        ("int", lambda t: t.update({"model.layers.0.mlp.a": torch.ones(4, 32, dtype=torch.int32)}),
         "is torch.int32, not floating point"),
        ("shape", lambda t: t.update({"model.layers.0.mlp.b": torch.ones(64, 3)}),
         r"tensor b has shape \[64, 3\], not \[64, 4\]"),
    ]:  # fmt: skip
        folder = saved(name)
        _edit_tensors(folder, edit)
        refused(folder, match)


def test_a_gated_ffn_with_biases_is_refused() -> None:
    """The predicted references take no gated biases, so predictors for such FFNs would not
    match the model (found by review): refused by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prosparse_fx import find_ffn_sites, relufy_
    from prosparse_fx.predictors import build_predictors

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, mlp_bias=True)
    ).eval()  # fmt: skip
    sites = relufy_(model, "fatrelu", 0.05, sites=find_ffn_sites(model))
    with pytest.raises(ValueError, match="gated FFN site.*biases"):
        build_predictors(model, torch.randint(0, 64, (2, 8)), sites, rank=4)


# --------------------------------------------------------------------------- sparsify_ffn_


def _logits_with_reference_ffns(model, sites, predictors, windows, up_relu: bool):
    """Logits of ``model`` with each FFN's output replaced by the predicted reference."""
    hooks = []
    for s, p in zip(sites, predictors):
        if s.kind == "gated":
            gate, up, down = (model.get_submodule(q) for q in (s.gate, s.up, s.down))

            def replace(module, args, out, p=p, gate=gate, up=up, down=down, t=s.threshold):
                w = (gate.weight, up.weight, down.weight.T)
                return predicted_gated_ffn_reference(args[0], p.a, p.b, p.cut, *w, t, up_relu)
        else:  # GPT-2's Conv1D stores [in, out]
            fc1, fc2 = model.get_submodule(s.up), model.get_submodule(s.down)

            def replace(module, args, out, p=p, fc1=fc1, fc2=fc2, t=s.threshold):
                w = (fc1.weight.T, fc1.bias, fc2.weight, fc2.bias)
                return predicted_plain_ffn_reference(args[0], p.a, p.b, p.bias, p.cut, *w, t)

        hooks.append(model.get_submodule(s.path).register_forward_hook(replace))
    try:
        with torch.no_grad():
            return model(input_ids=windows).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(
    ("family", "kind"), [("llama", "svd"), ("drelu", "svd"), ("gpt2", "svd"), ("gpt2", "trained")]
)
def test_sparsify_with_predictors_runs_approximate_mode(family, kind, models, windows) -> None:
    """sparsify_ffn_(predictors=...) swaps in PredictedGatedFFN / PredictedPlainFFN modules whose
    model computes the predicted reference FFN by FFN, and differs from the exact model (rank 4
    misses some)."""
    import copy

    from prosparse_fx import sparsify_ffn_
    from prosparse_fx.sparse_modules import PredictedGatedFFN, PredictedPlainFFN

    model, sites = models[family]
    training = TrainingConfig(epochs=2, batch_tokens=16)
    predictors = build_predictors(
        model, windows, sites, kind=kind, rank=4, recall=0.9, training=training
    )
    want = _logits_with_reference_ffns(model, sites, predictors, windows, family == "drelu")
    fast = copy.deepcopy(model).eval()
    sparsify_ffn_(fast, sites=sites, predictors=predictors)
    for s in sites:
        path = s.path if s.kind == "gated" else s.down
        kind_of = PredictedGatedFFN if s.kind == "gated" else PredictedPlainFFN
        assert isinstance(fast.get_submodule(path), kind_of)
    with torch.no_grad():
        got = fast(input_ids=windows).logits
        exact = model(input_ids=windows).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - exact).abs().max() > 1e-4


def test_sparsify_with_predictors_refusals_change_nothing(models, windows, gpt2) -> None:
    import copy

    from prosparse_fx import sparsify_ffn_

    model, sites = models["llama"]
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    target = copy.deepcopy(model)
    before = [type(m) for m in target.modules()]
    renamed = [dataclasses.replace(predictors[0], site="model.layers.9.mlp")]
    with pytest.raises(ValueError, match=r"not FFN sites of this model"):
        sparsify_ffn_(target, sites=sites, predictors=renamed)
    narrow = dataclasses.replace(predictors[0], a=predictors[0].a[:, :8])
    with pytest.raises(ValueError, match=r"predictor of model\.layers\.0\.mlp is for d=8"):
        sparsify_ffn_(target, sites=sites, predictors=[narrow])
    assert [type(m) for m in target.modules()] == before
    plain_model, plain_sites = gpt2
    plain = build_predictors(plain_model, windows, plain_sites, rank=4, recall=0.9)
    with pytest.raises(ValueError, match="has a bias, which the gated predicted op"):
        biased = dataclasses.replace(predictors[0], bias=plain[0].bias[:64].clone())
        sparsify_ffn_(target, sites=sites, predictors=[biased])
    assert [type(m) for m in target.modules()] == before


def test_predictors_of_another_model_of_the_same_widths_are_refused(
    models, windows, llama_sites, tmp_path
) -> None:
    """Built and loaded predictors carry their gate's fingerprint, and sparsify_ffn_ and
    save_predictors check it: another model of the same widths and site paths (another seed) is
    refused by name before anything changes; a predictor made by hand (no fingerprint) is used
    unchecked, as documented; a bfloat16 model's predictors fit its float32 upcast."""
    import copy

    from prosparse_fx import sparsify_ffn_

    model, sites = models["llama"]
    other, other_sites = _relufied("llama", "fatrelu", llama_sites, seed=1)
    theirs = build_predictors(other, windows, other_sites, rank=4, recall=0.9)
    for p, s in zip(theirs, other_sites):
        assert p.gate_sha256 == gate_fingerprint(*gate_weight(other, s))
        assert p.gate_sha256 != gate_fingerprint(*gate_weight(model, s))
    target = copy.deepcopy(model)
    before = [type(m) for m in target.modules()]
    named = r"predictor of model\.layers\.0\.mlp was built for another gate weight"
    with pytest.raises(ValueError, match=named):
        sparsify_ffn_(target, sites=sites, predictors=theirs)
    with pytest.raises(ValueError, match=named):
        sparsify_ffn_(target, sites=sites, predictors={p.site: p for p in theirs[:1]})
    assert [type(m) for m in target.modules()] == before
    with pytest.raises(ValueError, match=named):
        save_predictors(tmp_path / "p", theirs, model, sites)
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match=named):  # measuring or timing them would mislead too
        measure_predictors(model, theirs, windows, sites)
    from prosparse_fx.predictors import time_predictors

    with pytest.raises(ValueError, match=named):
        time_predictors(model, theirs, windows, sites)
    sparsify_ffn_(other, sites=other_sites, predictors=theirs)  # their own model takes them
    by_hand = [dataclasses.replace(p, gate_sha256=None) for p in theirs]
    sparsify_ffn_(target, sites=sites, predictors=by_hand)
    assert isinstance(target.get_submodule(sites[0].path), PredictedGatedFFN)
    half = copy.deepcopy(model).to(torch.bfloat16)
    built_half = build_predictors(half, windows, sites, rank=4, recall=0.9)
    sparsify_ffn_(half.float(), sites=sites, predictors=built_half)


def test_time_predictors_and_sites_measured_slower_stay_exact(models, windows) -> None:
    """time_predictors measures every site; predictors_that_pay keeps the ones not slower (and
    untimed ones); sparsify_ffn_ keeps a slower site exact unless only_faster=False, and that
    site then computes the exact FFN."""
    import copy

    from prosparse_fx import sparsify_ffn_
    from prosparse_fx.predictors import predictors_that_pay, time_predictors
    from prosparse_fx.sparse_modules import SparseGatedFFN

    model, sites = models["llama"]
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    assert all(math.isnan(p.speedup) for p in predictors)  # build does not time
    timed = time_predictors(model, predictors, windows, sites, tokens=4, repeats=2)
    assert all(0 < p.speedup < math.inf for p in timed)
    assert [p.cut for p in timed] == [p.cut for p in predictors]
    for bad, words in [
        ({"tokens": 0}, "tokens must be an integer >= 1"),
        ({"tokens": 2.5}, "tokens must be an integer >= 1"),
        ({"repeats": True}, "repeats must be an integer >= 1"),
        ({"windows": windows[:0]}, "windows must be a non-empty"),
        ({"windows": windows.float()}, "windows must be a non-empty"),
        ({"windows": windows[0]}, "windows must be a non-empty"),
        ({"windows": windows + 10_000}, "outside"),
        ({"predictors": {p.site: p for p in predictors}}, "in a list in the order"),
    ]:
        args = {"predictors": predictors, "windows": windows, **bad}
        with pytest.raises(ValueError, match=words):
            time_predictors(model, args.pop("predictors"), args.pop("windows"), sites, **args)
    slow, fast = (dataclasses.replace(p, speedup=v) for p, v in zip(predictors, (0.5, 1.2)))
    untimed = dataclasses.replace(predictors[0], site="x")
    assert predictors_that_pay([slow, fast, untimed]) == [fast, untimed]
    mixed = copy.deepcopy(model)
    sparsify_ffn_(mixed, sites=sites, predictors=[slow, fast])
    first, second = (mixed.get_submodule(s.path) for s in sites)
    assert type(first) is SparseGatedFFN and isinstance(second, PredictedGatedFFN)
    forced = copy.deepcopy(model)
    sparsify_ffn_(forced, sites=sites, predictors=[slow, fast], only_faster=False)
    assert isinstance(forced.get_submodule(sites[0].path), PredictedGatedFFN)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = model.get_submodule(sites[0].path)(x)
        torch.testing.assert_close(first(x), want, atol=1e-5, rtol=1e-5)


def test_damaged_gate_and_a_file_as_folder_are_refused_by_name(llama, windows, tmp_path) -> None:
    w = torch.randn(8, 4)
    w[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        svd_factors(w, 2)
    model, sites = llama
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(OutputWriteError, match="is a file"):
        save_predictors(target, predictors, model, sites)
    assert target.read_text() == "keep me"


def test_sparsify_refuses_malformed_predictors_before_changing_anything(models, windows) -> None:
    import copy

    from prosparse_fx import sparsify_ffn_

    model, sites = models["llama"]
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    p0, p1 = predictors
    target = copy.deepcopy(model)
    before = [type(m) for m in target.modules()]
    bad = [
        ([p0, p0], ValueError, "two predictors for one FFN site"),
        ({p1.site: p0}, ValueError, "is the predictor of"),
        ([dataclasses.replace(p0, cut=math.nan)], ValueError, "NaN or infinite"),
        ([dataclasses.replace(p0, a=p0.a.clone().fill_(math.nan))], ValueError, "NaN or inf"),
        ([dataclasses.replace(p0, b=p0.b[:, :3])], ValueError, "malformed"),
        ([dataclasses.replace(p0, b=p0.b.half())], ValueError, "malformed"),
        ([p0, dataclasses.replace(p1, a=p1.a.to("meta"))], ValueError, "malformed"),
        (["model.layers.0.mlp"], TypeError, "Predictor records"),
    ]
    for given, error, words in bad:
        with pytest.raises(error, match=words):
            sparsify_ffn_(target, sites=sites, predictors=given)
        assert [type(m) for m in target.modules()] == before


def test_bad_speedups_and_fingerprints_are_refused_before_anything_is_written(
    llama, built, tmp_path
) -> None:
    model, sites = llama
    for field, value, words in [
        ("speedup", math.inf, "speedup inf is not a positive finite number"),
        ("speedup", 0.0, "speedup 0.0 is not"),
        ("speedup", -1.0, "speedup -1.0 is not"),
        ("speedup", None, "speedup None is not"),
        ("speedup", "fast", "speedup 'fast' is not"),
        ("gate_sha256", 123, "gate_sha256 123 is not a sha256 hex digest"),
        ("gate_sha256", "abc", "gate_sha256 'abc' is not"),
    ]:
        bad = [dataclasses.replace(built["llama"][0], **{field: value}), *built["llama"][1:]]
        with pytest.raises(ValueError, match=words):
            save_predictors(tmp_path / "p", bad, model, sites)
        assert not (tmp_path / "p").exists()


def test_check_predictor_is_the_one_check_of_every_entry_point() -> None:
    """check_predictor backs save, load, sparsify_ffn_ and PredictedGatedFFN alike."""
    from prosparse_fx.predictors import check_predictor

    a, b = torch.randn(3, 8), torch.randn(16, 3)
    good = Predictor("mlp", "trained", 3, a, b, 0.5, bias=torch.zeros(16))
    check_predictor(good)
    check_predictor(good, 8, 16)
    for bad, words in [
        (dataclasses.replace(good, bias=torch.zeros(15)), r"bias has shape \[15\], not \[16\]"),
        (dataclasses.replace(good, bias=torch.zeros(16).double()), "use one dtype"),
        (dataclasses.replace(good, rank=4), r"a has shape \[3, 8\], not \[4, 8\]"),
        (dataclasses.replace(good, a=a[None]), "must be 2-D"),
        (dataclasses.replace(good, cut=math.inf), "NaN or infinite cut"),
        (dataclasses.replace(good, bias=torch.full((16,), math.nan)), "infinite values in bias"),
    ]:
        with pytest.raises(ValueError, match=words):
            check_predictor(bad)
    with pytest.raises(PredictorFileError, match="is for d=8, d_ff=16, but the FFN has d=8"):
        check_predictor(good, 8, 32, PredictorFileError)
