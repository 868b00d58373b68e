"""Eager activation substitution against transformers' own ReLU models, and save/reload."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from prosparse_fx import FATReLU, find_ffn_sites, relufy_
from tests.models import FAMILIES, HandFATReLU, tiny

ACT_KEY = {
    "llama": "hidden_act",
    "qwen2": "hidden_act",
    "mistral": "hidden_act",
    "gemma3": "hidden_activation",
    "gpt2": "activation_function",
    "bert": "hidden_act",
}


def _reference_relu_model(family: str, model: nn.Module) -> nn.Module:
    """The same weights in a model that transformers builds with ReLU (hand-made ReLU copy)."""
    config = copy.deepcopy(model.config)
    setattr(config, ACT_KEY[family], "relu")
    ref = type(model)(config).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_relufy_matches_handmade_relu_model(family: str, ids: torch.Tensor) -> None:
    model = tiny(family)
    ref = _reference_relu_model(family, model)
    dense = _out(model, ids)
    sites = relufy_(model)
    assert all(s.activation == "relu" for s in sites)
    with torch.no_grad():
        got, want = _out(model, ids), _out(ref, ids)
    assert (got - want).abs().max() < 1e-5
    assert (got - dense).abs().max() > 1e-4  # the function really changed
    assert getattr(model.config, ACT_KEY[family]) == "relu"


@pytest.mark.parametrize("family", FAMILIES)
def test_fatrelu_matches_handmade(family: str, ids: torch.Tensor) -> None:
    model = tiny(family)
    ref = copy.deepcopy(model)
    sites = find_ffn_sites(model)
    for s in sites:
        parent, _, name = s.activation_module.rpartition(".")
        setattr(ref.get_submodule(parent), name, HandFATReLU(0.05))
    relufy_(model, "fatrelu", 0.05, sites=sites)
    with torch.no_grad():
        assert (_out(model, ids) - _out(ref, ids)).abs().max() < 1e-5


def test_relufy_is_idempotent_and_rejects_bad_threshold(ids: torch.Tensor) -> None:
    model = tiny("llama")
    relufy_(model, "fatrelu", 0.1)
    first = _out(model, ids)
    relufy_(model, "fatrelu", 0.1)
    assert torch.equal(first, _out(model, ids))
    with pytest.raises(ValueError, match=">= 0"):
        relufy_(model, "fatrelu", -0.1)
    with pytest.raises(ValueError, match="2 FFN sites"):
        relufy_(model, "fatrelu", [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="'relu', 'fatrelu' or 'drelu'"):
        relufy_(model, "gelu")  # type: ignore[arg-type]


def test_relu_save_and_reload(tmp_path, ids: torch.Tensor) -> None:
    model = tiny("llama")
    relufy_(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.hidden_act == "relu"
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_fatrelu_save_and_reload_keeps_per_layer_thresholds(tmp_path, ids: torch.Tensor) -> None:
    model = tiny("qwen2")
    relufy_(model, "fatrelu", [0.02, 0.07])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.hidden_act == "fatrelu"
    assert loaded.config.hidden_act_param == pytest.approx(0.07)
    assert loaded.config.prosparse_thresholds == {
        f"layers.{i}.mlp.act_fn": t for i, t in enumerate([0.02, 0.07])
    }
    # every reader of hidden_act is an FFN: the config stays in the published format
    assert not hasattr(loaded.config, "prosparse_kept_activations")
    acts = [m for m in loaded.modules() if isinstance(m, FATReLU)]
    assert [a.t for a in acts] == pytest.approx([0.02, 0.07])
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_fatrelu_op_gradient_and_edge() -> None:
    x = torch.tensor([-1.0, 0.0, 0.1, 0.2, 0.3], requires_grad=True)
    y = torch.ops.prosparse.fatrelu(x, 0.2)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.2, 0.3])  # keeps x == t (x >= t)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    torch.library.opcheck(torch.ops.prosparse.fatrelu.default, (torch.randn(3, 5), 0.1))
    nan = torch.ops.prosparse.fatrelu(torch.tensor([float("nan")]), 0.0)
    assert torch.isnan(nan).all()  # NaN propagates like torch.relu, never a silent zero
