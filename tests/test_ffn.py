"""FFN-site discovery on six model families, in both graph dialects."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prosparse_fx import FFNNotFoundError, find_ffn_sites, relufy_
from prosparse_fx.capture import capture_dynamo, capture_export, normalize_module_path
from prosparse_fx.ffn import find_sites_in_graph
from tests.models import EXPECTED_ACT, FAMILIES, FFN, GATED, HIDDEN, LAYERS, tiny


@pytest.mark.parametrize("dialect", ["export", "dynamo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sites_found_in_both_dialects(family: str, dialect: str) -> None:
    model = tiny(family)
    gm = capture_export(model) if dialect == "export" else capture_dynamo(model)
    sites = find_sites_in_graph(gm)
    assert len(sites) == LAYERS
    for site in sites:
        assert site.kind == ("gated" if family in GATED else "plain")
        assert site.activation == EXPECTED_ACT[family]
        assert (site.hidden_size, site.intermediate_size) == (HIDDEN, FFN)
        # module paths point at real modules with the right weight shapes
        up = model.get_submodule(site.up)
        down = model.get_submodule(site.down)
        assert FFN in tuple(up.weight.shape) and FFN in tuple(down.weight.shape)
        if site.gate is not None:
            assert tuple(model.get_submodule(site.gate).weight.shape) == (FFN, HIDDEN)
        assert site.activation_module is not None
        model.get_submodule(site.activation_module)
    # the two layers are distinct sites
    assert len({s.down for s in sites}) == LAYERS


def test_dynamo_and_export_records_agree() -> None:
    model = tiny("llama")
    assert find_sites_in_graph(capture_export(model)) == find_sites_in_graph(capture_dynamo(model))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("L['self'].model.layers[0].mlp", "model.layers.0.mlp"),
        ("L['args'][0].model.layers[12].mlp.act_fn", "model.layers.12.mlp.act_fn"),
        ("L['self']._modules['encoder'].layer[3]", "encoder.layer.3"),
        ("model.layers.0.mlp", "model.layers.0.mlp"),
    ],
)
def test_module_path_normalisation(raw: str, expected: str) -> None:
    assert normalize_module_path(raw) == expected


class NoFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)


def test_no_ffn_error_lists_what_was_found() -> None:
    with pytest.raises(FFNNotFoundError) as err:
        find_ffn_sites(NoFFN(), (torch.randn(2, 8),))
    msg = str(err.value)
    assert "2 linear layer(s)" in msg and "q" in msg and "k" in msg


def test_no_ffn_error_names_linear_subclasses_with_their_own_forward() -> None:
    """Falcon's FalconLinear computes x @ weight.T in its own forward, which the analysis does
    not read as a linear: the error names the class and its modules (a tiny Falcon)."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(FFNNotFoundError) as err:
        find_ffn_sites(FalconForCausalLM(config).eval())
    msg = str(err.value)
    assert "FalconLinear module(s) (transformer.h.0.self_attention.query_key_value" in msg
    assert "forward of their own" in msg and "not supported" in msg
    with pytest.raises(FFNNotFoundError) as plain:
        find_ffn_sites(NoFFN(), (torch.randn(2, 8),))
    assert "forward of their own" not in str(plain.value)  # nn.Linear itself is read


class QuickGELUMLP(nn.Module):
    """x * sigmoid(1.702 x): an activation we do not know how to replace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class FunctionalSiLUMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(8, 16, bias=False)
        self.up_proj = nn.Linear(8, 16, bias=False)
        self.down_proj = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_unknown_activation_is_reported_and_not_replaced() -> None:
    model = QuickGELUMLP()
    sites = find_ffn_sites(model, (torch.randn(2, 8),))
    assert len(sites) == 1 and sites[0].activation.startswith("unknown(")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="cannot be replaced.*Sites found: .*unknown"):
        relufy_(model, sites=sites)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_functional_activation_cannot_be_swapped_eagerly() -> None:
    model = FunctionalSiLUMLP()
    sites = find_ffn_sites(model, (torch.randn(2, 8),))
    assert sites[0].activation == "silu" and sites[0].activation_module is None
    with pytest.raises(ValueError, match="function call.*SubstituteActivationPass"):
        relufy_(model, sites=sites)


def test_hf_example_inputs_need_a_config() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        find_ffn_sites(NoFFN())
