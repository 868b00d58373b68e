"""Sparsity and perplexity measurement, and threshold shifting."""

import math

import pytest
import torch

from prosparse_fx import (
    calibrate_thresholds,
    evaluate,
    find_ffn_sites,
    measure_sparsity,
    perplexity,
    relufy_,
    threshold_sweep,
)
from tests.models import tiny


@pytest.fixture
def windows() -> torch.Tensor:
    return torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(2))


def test_sparsity_by_hand(windows) -> None:
    model = tiny("llama")
    relufy_(model)
    sites = find_ffn_sites(model)
    x1s = {i: [] for i in range(len(sites))}
    handles = [
        model.get_submodule(s.down).register_forward_pre_hook(lambda m, a, i=i: x1s[i].append(a[0]))
        for i, s in enumerate(sites)
    ]
    report = measure_sparsity(model, windows, sites=sites, batch_size=4)
    for h in handles:
        h.remove()
    expected = [
        float(torch.cat([(x == 0).float().mean(-1).flatten() for x in x1s[i]]).mean())
        for i in range(len(sites))
    ]
    assert report.per_layer == pytest.approx(expected)
    assert report.sparsity == pytest.approx(sum(expected) / len(expected))
    assert report.tokens == windows.numel()
    assert 0.2 < report.sparsity < 0.8  # ReLU on random weights: about half


def test_zero_gate_gives_full_sparsity_and_silu_none(windows) -> None:
    model = tiny("llama")
    assert measure_sparsity(model, windows).sparsity == 0.0  # SiLU: no exact zeros
    relufy_(model)
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.mlp.gate_proj.weight)
    assert measure_sparsity(model, windows).per_layer == [1.0, 1.0]


def test_perplexity_is_exp_of_token_mean_loss(windows) -> None:
    model = tiny("llama")
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert perplexity(model, windows, batch_size=4) == pytest.approx(
        math.exp(sum(losses) / len(losses)), rel=1e-5
    )
    ev = evaluate(model, windows)
    assert ev.perplexity == pytest.approx(perplexity(model, windows), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        perplexity(model, windows[:, :1])


def test_calibrated_thresholds_reach_target(windows) -> None:
    model = tiny("llama")
    sites = relufy_(model)
    ts = calibrate_thresholds(model, windows, 0.8, sites)
    assert all(t > 0 for t in ts) and len(ts) == 2
    sites = relufy_(model, "fatrelu", ts, sites=sites)
    per_layer = measure_sparsity(model, windows, sites=sites).per_layer
    assert per_layer == pytest.approx([0.8, 0.8], abs=0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        calibrate_thresholds(model, windows, 1.0, sites)


def test_threshold_sweep_is_monotone_and_restores(windows) -> None:
    model = tiny("llama")
    sites = relufy_(model, "fatrelu", 0.0)
    before = model(input_ids=windows).logits
    rows = threshold_sweep(model, windows, [0.0, 0.02, 0.05, 0.1], sites)
    sparsities = [r["sparsity"] for r in rows]
    assert sparsities == sorted(sparsities) and sparsities[-1] > sparsities[0]
    assert rows[0]["sparsity"] == pytest.approx(measure_sparsity(model, windows).sparsity)
    assert torch.equal(before, model(input_ids=windows).logits)


def test_drelu_sparsity_by_hand(windows) -> None:
    """dReLU's x1 is zero where the gate is below t or up is <= 0: measure_sparsity equals the
    zero fraction of x1 written out from the gate and up projections (and exceeds the ReLU-gate
    model's); shift_thresholds_ on dReLU sites keeps the up ReLU."""
    from prosparse_fx import shift_thresholds_

    model = tiny("llama")
    sites = relufy_(model, "drelu", 0.01)
    per_layer = [[] for _ in model.model.layers]

    def hook(i):
        def fn(mlp, args):
            g, u = args[0] @ mlp.gate_proj.weight.T, args[0] @ mlp.up_proj.weight.T
            x1 = g * (g >= 0.01) * (u * (u > 0))
            per_layer[i].append((x1 == 0).float().mean(-1).flatten())

        return fn

    handles = [
        layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)
    ]
    report = measure_sparsity(model, windows, sites=sites)
    for h in handles:
        h.remove()
    want = [float(torch.cat(v).mean()) for v in per_layer]
    assert report.per_layer == pytest.approx(want, abs=1e-6)
    relu = tiny("llama")
    relufy_(relu, "fatrelu", 0.01)
    assert report.sparsity > measure_sparsity(relu, windows).sparsity + 0.1
    shifted = shift_thresholds_(model, 0.05, sites)
    assert {(s.activation, s.threshold) for s in shifted} == {("drelu", 0.05)}
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "ReLULinear"
