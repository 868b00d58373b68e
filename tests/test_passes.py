"""Graph passes on export and Dynamo graphs: activation substitution and activation taps."""

import pytest
import torch

from prosparse_fx import ActivationRegularizer, relufy_
from prosparse_fx.capture import canonical_op, capture_dynamo, capture_export
from prosparse_fx.ffn import find_sites_in_graph
from prosparse_fx.passes import InsertActivationTapsPass, SubstituteActivationPass
from prosparse_fx.taps import activation_l1
from tests.models import FAMILIES, tiny


def _logits(out):
    if isinstance(out, tuple):
        out = out[0]
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def _capture(model, dialect, ids):
    inputs = {"input_ids": ids}
    if "use_cache" in model.forward.__code__.co_varnames or hasattr(model.config, "use_cache"):
        inputs["use_cache"] = False
    if dialect == "export":
        return capture_export(model, inputs), inputs
    return capture_dynamo(model, inputs), inputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["relu", "fatrelu"])
def test_substitute_on_export_graph_matches_eager(family, activation, ids) -> None:
    model = tiny(family)
    gm, inputs = _capture(model, "export", ids)
    result = SubstituteActivationPass(activation, 0.05)(gm)
    assert result.modified
    ops = {canonical_op(n) for n in result.graph_module.graph.nodes}
    assert not ops & {"silu", "gelu", "gelu_tanh", "erf"}  # (BERT's pooler keeps its tanh)
    relufy_(model, activation, 0.05)
    with torch.no_grad():
        want = _logits(model(**inputs))
        got = _logits(result.graph_module(**inputs))
    assert (got - want).abs().max() < 1e-5
    # idempotent: a second run changes nothing
    assert not SubstituteActivationPass(activation, 0.05)(result.graph_module).modified
    sites = find_sites_in_graph(result.graph_module)
    assert all(s.activation == activation for s in sites)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_substitute_on_dynamo_graph_inside_backend(family, ids) -> None:
    """The pass runs on the graph a torch.compile backend receives; outputs match eager ReLU."""
    model = tiny(family)
    ref = tiny(family)
    relufy_(ref)
    modified = []

    def backend(gm, example_inputs):
        modified.append(SubstituteActivationPass("relu")(gm).modified)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    kwargs = {"use_cache": False} if family != "bert" else {}
    with torch.no_grad():
        got = _logits(compiled(input_ids=ids, **kwargs))
        want = _logits(ref(input_ids=ids, **kwargs))
    torch._dynamo.reset()
    assert modified == [True]
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("dialect", ["export", "dynamo"])
def test_activation_taps_match_eager_regularizer(dialect, ids) -> None:
    model = tiny("llama")
    relufy_(model)
    reg = ActivationRegularizer(model, 1.0)
    with torch.no_grad():
        want_logits = model(input_ids=ids, use_cache=False).logits
    want = [float(reg.l1()) for _ in [0]][0]
    per_layer = reg.last_l1
    reg.remove()

    if dialect == "export":
        gm = capture_export(model, {"input_ids": ids, "use_cache": False})
        assert InsertActivationTapsPass()(gm).modified
        out, taps = gm(input_ids=ids, use_cache=False)
        assert (out.logits - want_logits).abs().max() < 1e-5
        assert gm.meta["prosparse_taps"]["sites"][0] == "model.layers.0.mlp"
        assert not InsertActivationTapsPass()(gm).modified
    else:
        captured = {}

        def backend(gm, example_inputs):
            InsertActivationTapsPass()(gm)
            n = gm.meta["prosparse_taps"]["n_outputs"]

            def run(*args):
                res = gm(*args)
                captured["taps"] = res[n:]
                return res[:n]

            return run

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, use_cache=False)
        torch._dynamo.reset()
        taps = captured["taps"]
    assert [float(t) for t in taps] == pytest.approx(per_layer, rel=1e-5)
    assert sum(float(t) for t in taps) == pytest.approx(want, rel=1e-5)


def test_activation_l1_norms() -> None:
    x1 = torch.tensor([[[1.0, -2.0, 0.0, 3.0]], [[0.0, 0.0, -1.0, 1.0]]])  # [2, 1, 4]
    assert float(activation_l1(x1, "mean")) == pytest.approx(8 / 8)
    assert float(activation_l1(x1, "token_l1")) == pytest.approx((6 + 2) / 2)
    # Hoyer, per token L1 / (sqrt(d_ff) * L2), by hand: 6 / (2 sqrt 14) and 2 / (2 sqrt 2)
    hoyer = (6 / (2 * 14**0.5) + 2 / (2 * 2**0.5)) / 2
    assert float(activation_l1(x1, "hoyer")) == pytest.approx(hoyer, rel=1e-6)
    assert float(activation_l1(5 * x1, "hoyer")) == pytest.approx(hoyer, rel=1e-6)  # scale-free
    with pytest.raises(ValueError, match="mean, token_l1, hoyer"):
        activation_l1(x1, "l2")  # type: ignore[arg-type]


def test_hoyer_of_an_all_zero_token_is_zero_with_a_finite_gradient() -> None:
    x1 = torch.zeros(2, 3, 8, requires_grad=True)
    value = activation_l1(x1, "hoyer")
    value.backward()
    assert float(value) == 0.0 and torch.isfinite(x1.grad).all()


# --- dReLU (TurboSparse Sec. 3) ----------------------------------------------------------------


def _hand_drelu_x1(model, ids, t):
    """x1 of each LLaMA layer written out: FATReLU_t(gate(h)) * ReLU(up(h)), h the MLP input."""
    x1s = []

    def hook(mlp, args):
        g, u = args[0] @ mlp.gate_proj.weight.T, args[0] @ mlp.up_proj.weight.T
        x1s.append(g * (g >= t) * (u * (u > 0)))

    handles = [layer.mlp.register_forward_pre_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return x1s


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_drelu_substitution_and_taps(family, ids) -> None:
    """SubstituteActivationPass("drelu", t) on an export graph puts FATReLU_t on the gate and a
    ReLU on up: the graph computes what relufy_(model, "drelu", t) does, its sites read as
    dReLU, it is idempotent, the taps' L1 is the mean |x1| of the hand-computed dReLU x1, and
    substituting "fatrelu" removes the up ReLU again. (Dynamo graphs: tests/test_backend.py
    and the conformance suite's compile cells.)"""
    model = tiny(family)
    gm, inputs = _capture(model, "export", ids)
    assert SubstituteActivationPass("drelu", 0.05)(gm).modified
    assert [s.activation for s in find_sites_in_graph(gm)] == ["drelu", "drelu"]
    assert not SubstituteActivationPass("drelu", 0.05)(gm).modified
    relufy_(model, "drelu", 0.05)
    with torch.no_grad():
        want = _logits(model(**inputs))
        assert (_logits(gm(**inputs)) - want).abs().max() < 1e-5
    if family == "llama":
        InsertActivationTapsPass(norm="mean")(gm)
        with torch.no_grad():
            out = gm(**inputs)
        taps = out[1]
        hand = [x.abs().mean() for x in _hand_drelu_x1(model, ids, 0.05)]
        assert torch.allclose(torch.stack(list(taps)), torch.stack(hand), atol=1e-6)
        return
    assert SubstituteActivationPass("fatrelu", 0.05)(gm).modified
    assert [s.activation for s in find_sites_in_graph(gm)] == ["fatrelu", "fatrelu"]
    relufy_(model, "fatrelu", 0.05)
    with torch.no_grad():
        assert (_logits(gm(**inputs)) - _logits(model(**inputs))).abs().max() < 1e-5


def test_drelu_substitution_refuses_plain_ffn(ids) -> None:
    gm, _ = _capture(tiny("gpt2"), "export", ids)
    before = str(gm.graph)
    with pytest.raises(ValueError, match=r"needs a gated FFN.*transformer\.h\.0\.mlp.*'relu'"):
        SubstituteActivationPass("drelu")(gm)
    assert str(gm.graph) == before
