"""Approximate mode through the compile backend: ``torch.compile(model, backend="prosparse",
options={"predictors": ...})`` computes what eager ``sparsify_ffn_(model, predictors=...)``
computes, and refuses, by name, what it cannot do exactly: training, a graph whose sites are not
the predictors' (a compiled submodule), and a graph Dynamo reuses for another module's weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from prosparse_fx import relufy_, sparsify_ffn_
from prosparse_fx.predictors import build_predictors
from tests.models import VOCAB, tiny

T = 0.05


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def built(request, windows):
    model = tiny(request.param)
    sites = relufy_(model, "fatrelu", T)
    model.eval()
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    eager = copy.deepcopy(model)
    sparsify_ffn_(eager, sites=sites, predictors=predictors)
    with torch.no_grad():
        want = eager(input_ids=windows).logits
        exact = model(input_ids=windows).logits
    assert (want - exact).abs().max() > 1e-4  # rank 4 misses some neurons: not the exact model
    return model, predictors, want


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss(logits: torch.Tensor, windows: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    )


def test_compiled_model_computes_eager_approximate_mode(built, windows) -> None:
    """compiler='eager' runs the rewritten graph as is: the same ops as eager approximate mode,
    so the same logits. A mapping from site path works as a list does."""
    model, predictors, want = built
    for given in (predictors, {p.site: p for p in predictors}):
        torch._dynamo.reset()
        options = {"predictors": given, "compiler": "eager"}
        with torch.no_grad():
            got = torch.compile(model, backend="prosparse", options=options)(input_ids=windows)
        torch.testing.assert_close(got.logits, want, atol=1e-6, rtol=1e-6)


def test_sites_whose_predictor_measured_slower_stay_exact(built, windows) -> None:
    """As sparsify_ffn_: a predictor whose measured speedup is below 1 is not used, so with all
    of them slower the compiled model computes the exact model."""
    model, predictors, want = built
    slower = [dataclasses.replace(p, speedup=0.5) for p in predictors]
    options = {"predictors": slower, "compiler": "eager"}
    with torch.no_grad():
        got = torch.compile(model, backend="prosparse", options=options)(input_ids=windows)
        exact = model(input_ids=windows).logits
    torch.testing.assert_close(got.logits, exact, atol=1e-5, rtol=1e-5)
    assert (got.logits - want).abs().max() > 1e-4


def test_inductor_runs_the_predicted_ops_and_keeps_the_loss(built, windows, monkeypatch) -> None:
    """Under Inductor every site runs its predicted op (each call checked against the op's
    reference on the same inputs). Inductor fuses the layer norms, so an FFN input differs from
    eager by rounding, and a neuron whose estimate is that close to the cut may flip (as at a
    FATReLU threshold): tokens can differ from eager approximate mode by a neuron's
    contribution, so the check is on the loss, not per logit."""
    from prosparse_fx.kernels import cpu
    from prosparse_fx.predictors import (
        predicted_gated_ffn_reference,
        predicted_plain_ffn_reference,
    )

    model, predictors, want = built
    calls = []
    for name, reference in (
        ("predicted_gated_ffn", predicted_gated_ffn_reference),
        ("predicted_plain_ffn", predicted_plain_ffn_reference),
    ):
        kernel = getattr(cpu, name)

        def checked(*args, kernel=kernel, reference=reference):
            y = kernel(*args)
            calls.append(float((y - reference(*args)).abs().max()))
            return y

        monkeypatch.setattr(cpu, name, checked)
    with torch.no_grad():
        got = torch.compile(model, backend="prosparse", options={"predictors": predictors})(
            input_ids=windows
        ).logits
    assert len(calls) == len(predictors) and max(calls) < 1e-5
    assert _loss(got, windows) == pytest.approx(_loss(want, windows), rel=1e-2)


def test_a_graph_reused_for_another_layer_is_refused(windows) -> None:
    """Each decoder layer compiled on its own: Dynamo reuses the first layer's graph for the
    second (same class), passing the second's weights, with the first's predictor baked in."""
    model = tiny("llama")
    sites = relufy_(model, "fatrelu", T)
    model.eval()
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    options = {"predictors": [dataclasses.replace(predictors[0], site="mlp")]}
    first, second = (
        torch.compile(layer, backend="prosparse", options=options)
        for layer in model.model.layers[:2]
    )
    h = torch.randn(1, 4, 32)
    rotary = model.model.rotary_emb(h, torch.arange(4)[None])
    with torch.no_grad():
        first(h, position_embeddings=rotary)
        with pytest.raises(
            RuntimeError,
            match="called with other gate weights than it was compiled with: another module's",
        ):
            second(h, position_embeddings=rotary)


def test_refusals(built, windows) -> None:
    model, predictors, _ = built
    compiled = torch.compile(model, backend="prosparse", options={"predictors": predictors})
    with pytest.raises(Exception, match="approximate mode is for inference"):
        compiled(input_ids=windows)
    torch._dynamo.reset()
    for bad, words in [
        ({"predictors": predictors, "sparse_ffn": False}, "cannot go with sparse_ffn=False"),
        ({"predictors": ["model.layers.0.mlp"]}, "Predictor records"),
        ({"predictors": [predictors[0], predictors[0]]}, "two predictors for one FFN site"),
    ]:
        with pytest.raises(Exception, match=words):  # Dynamo wraps the backend's ValueError
            torch.compile(model, backend="prosparse", options=bad)(input_ids=windows)
    first = model.get_submodule(predictors[0].site.rpartition(".")[0])  # a layer, not the model
    named = r"no FFN site of this graph .*they are for \['"  # the predictors' own site paths
    with torch.no_grad(), pytest.raises(Exception, match=named):
        h = torch.randn(1, 4, 32)
        if hasattr(model, "model"):  # llama: the layer takes the rotary embedding
            rotary = model.model.rotary_emb(h, torch.arange(4)[None])
            torch.compile(first, backend="prosparse", options={"predictors": predictors})(
                h, position_embeddings=rotary
            )
        else:
            torch.compile(first, backend="prosparse", options={"predictors": predictors})(h)
    torch._dynamo.reset()
    other = tiny("llama" if hasattr(model, "model") else "gpt2", seed=1)
    other_sites = relufy_(other, "fatrelu", T)
    theirs = build_predictors(other.eval(), windows, other_sites, rank=4, recall=0.9)
    with torch.no_grad(), pytest.raises(Exception, match="built for another gate weight"):
        torch.compile(model, backend="prosparse", options={"predictors": theirs})(input_ids=windows)
    narrow = dataclasses.replace(predictors[0], a=predictors[0].a[:, :8])
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="is for d=8"):
        torch.compile(model, backend="prosparse", options={"predictors": [narrow]})(
            input_ids=windows
        )
