"""The activation table, and loading checkpoints exactly: the published ProSparse format (config
``hidden_act="fatrelu"`` + ``hidden_act_param``, no threshold in the weights) and a relufied BERT
whose masked-LM head reads the same ``hidden_act`` key."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.activations import ACT2FN, GELUActivation

from prosparse_fx import FATReLU, find_ffn_sites, relufy_
from prosparse_fx.activations import ACTIVATIONS, get_activation
from prosparse_fx.capture import capture_export
from prosparse_fx.passes import SubstituteActivationPass
from tests.models import HandFATReLU, tiny


def _hand_model(model: nn.Module, acts: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with the modules at the given paths replaced."""
    ref = copy.deepcopy(model)
    for path, act in acts.items():
        parent, _, name = path.rpartition(".")
        setattr(ref.get_submodule(parent), name, act)
    return ref.eval()


def _thresholds(model: nn.Module) -> list[float]:
    return [m.t for m in model.modules() if isinstance(m, FATReLU)]


def _rewrite_checkpoint(folder: Path, **config: object) -> None:
    """Update config.json (keys set to ``None`` are removed) and drop every threshold buffer from
    the safetensors file."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(config)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    weights = folder / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "threshold" not in k}, weights, {"format": "pt"})
    assert all("threshold" not in k for k in load_file(weights))


# --- the table --------------------------------------------------------------------------------


def test_table_records() -> None:
    assert list(ACTIVATIONS) == ["relu", "fatrelu", "drelu"]
    relu, fat = get_activation("relu"), get_activation("fatrelu")
    x = torch.tensor([-1.0, 0.0, 0.05, 0.1, 0.3])
    assert type(relu.make_module(0.7)) is nn.ReLU  # ReLU ignores the threshold
    assert relu.make_module()(x).tolist() == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.3])
    module = fat.make_module(0.1)
    assert isinstance(module, FATReLU) and module.t == 0.1
    assert module(x).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.3])
    assert relu.graph_target("aten") is torch.ops.aten.relu.default
    assert relu.graph_target("torch") is torch.relu
    assert (
        fat.graph_target("aten") is fat.graph_target("torch") is torch.ops.prosparse.fatrelu.default
    )
    assert relu.graph_args("x", 0.5) == ("x",) and fat.graph_args("x", 0.5) == ("x", 0.5)
    assert relu.exact_zeros and fat.exact_zeros
    assert (relu.hf_param, fat.hf_param) == (None, "hidden_act_param")
    for a in ACTIVATIONS.values():  # transformers builds the same class for the name
        assert type(ACT2FN[a.name]) is a.module_type
    drelu = get_activation("drelu")  # TurboSparse: the gate's module, plus ReLU on up
    assert drelu.module_type is FATReLU and drelu.takes_threshold and drelu.up_relu
    assert not relu.up_relu and not fat.up_relu
    assert drelu.exact_zeros and drelu.hf_param == "hidden_act_param"
    with pytest.raises(ValueError, match="'relu', 'fatrelu' or 'drelu', got 'gelu'"):
        get_activation("gelu")
    with pytest.raises(ValueError, match=">= 0"):
        fat.make_module(-0.1)
    with pytest.raises(ValueError, match="'relu', 'fatrelu' or 'drelu'"):
        SubstituteActivationPass("dying_relu")  # type: ignore[arg-type]


def test_pass_inserts_the_table_target(ids: torch.Tensor) -> None:
    model = tiny("llama")
    ref = _hand_model(
        model, {s.activation_module: HandFATReLU(0.05) for s in find_ffn_sites(model)}
    )
    inputs = {"input_ids": ids, "use_cache": False}
    gm = capture_export(model, inputs)
    assert SubstituteActivationPass("fatrelu", 0.05)(gm).modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.prosparse.fatrelu.default) == 2
    with torch.no_grad():
        got = gm(**inputs)
        got = got.logits if hasattr(got, "logits") else got[0]
        assert (got - ref(**inputs).logits).abs().max() < 1e-5


# --- case 5: the published ProSparse / MiniCPM-S format ----------------------------------------


def _published_checkpoint(folder: Path, t: float) -> LlamaForCausalLM:
    """A SiLU tiny LLaMA saved in the MiniCPM-S format (remote code named but not shipped)."""
    model = tiny("llama")
    model.save_pretrained(folder)
    _rewrite_checkpoint(
        folder,
        hidden_act="fatrelu",
        hidden_act_param=t,
        architectures=["SparseLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_sparse_llama.SparseLlamaConfig",
            "AutoModelForCausalLM": "modeling_sparse_llama.SparseLlamaForCausalLM",
        },
    )
    return model


def test_published_format_loads_exactly(tmp_path: Path, ids: torch.Tensor) -> None:
    t = 0.01
    silu = _published_checkpoint(tmp_path, t)
    sites = find_ffn_sites(silu)
    ref = _hand_model(silu, {s.activation_module: HandFATReLU(t) for s in sites})
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert (want - silu(input_ids=ids).logits).abs().max() > 1e-4  # FATReLU really differs
    for _ in range(2):  # the old bug: uninitialised memory, different on each load
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert type(loaded) is LlamaForCausalLM
        assert _thresholds(loaded) == [t, t]
        with torch.no_grad():
            assert (loaded(input_ids=ids).logits - want).abs().max() < 1e-5


def test_construction_from_config_takes_hidden_act_param(ids: torch.Tensor) -> None:
    config = copy.deepcopy(tiny("llama").config)
    config.hidden_act, config.hidden_act_param = "fatrelu", 0.03
    assert _thresholds(LlamaForCausalLM(config)) == [0.03, 0.03]


def test_missing_threshold_and_no_param_is_refused(tmp_path: Path) -> None:
    _published_checkpoint(tmp_path, 0.01)
    _rewrite_checkpoint(tmp_path, hidden_act_param=None)
    with pytest.raises(
        ValueError, match="no threshold: none in the weights and no hidden_act_param"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_buffer_disagreeing_with_config_warns(tmp_path: Path) -> None:
    model = tiny("llama")
    relufy_(model, "fatrelu", 0.05)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["hidden_act_param"] = 0.02
    del data["prosparse_thresholds"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"threshold 0\.05 disagrees.*hidden_act_param = 0\.02"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _thresholds(loaded) == [0.05, 0.05]  # the weights win, as saved


def test_per_layer_thresholds_restored_from_config(tmp_path: Path, ids: torch.Tensor) -> None:
    """Per-layer thresholds missing from the weights come from ``prosparse_thresholds``, by path,
    also into the base model class (paths drop ``base_model_prefix``); a matching list is no
    disagreement."""
    model = tiny("llama")
    relufy_(model, "fatrelu", [0.02, 0.07])
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _rewrite_checkpoint(tmp_path)  # thresholds now only in the config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _thresholds(loaded) == [0.02, 0.07]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert _thresholds(LlamaModel.from_pretrained(tmp_path)) == [0.02, 0.07]


# --- case 11: BERT with its masked-LM head -----------------------------------------------------


def _tiny_bert_mlm() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return BertForMaskedLM(config).eval()


@pytest.mark.parametrize("activation", ["relu", "fatrelu"])
def test_bert_head_keeps_gelu_after_reload(
    tmp_path: Path, ids: torch.Tensor, activation: str
) -> None:
    model = _tiny_bert_mlm()
    sites = find_ffn_sites(model)
    assert [s.activation_module for s in sites] == [
        f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)
    ]
    hand = HandFATReLU(0.05) if activation == "fatrelu" else nn.ReLU()
    ref = _hand_model(model, {s.activation_module: hand for s in sites})
    relufy_(model, activation, 0.05, sites=sites)
    assert type(model.cls.predictions.transform.transform_act_fn) is GELUActivation
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert (before - ref(input_ids=ids).logits).abs().max() < 1e-5
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    # the head reads hidden_act too: the key stays, the FFN sites are recorded by path
    assert loaded.config.hidden_act == "gelu"
    assert set(loaded.config.prosparse_ffn_activations.values()) == {activation}
    assert type(loaded.cls.predictions.transform.transform_act_fn) is GELUActivation
    acts = [loaded.bert.encoder.layer[i].intermediate.intermediate_act_fn for i in range(2)]
    assert all(type(a) is get_activation(activation).module_type for a in acts)
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - before).abs().max() < 1e-5


# --- dReLU (TurboSparse Sec. 3) ------------------------------------------------------------------


class HandDReLUMLP(nn.Module):
    """A LLaMA MLP written out with dReLU: down(FATReLU_t(gate(x)) * ReLU(up(x)))."""

    def __init__(self, mlp: nn.Module, t: float) -> None:
        super().__init__()
        self.mlp, self.t = mlp, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.mlp.gate_proj(x), self.mlp.up_proj(x)
        return self.mlp.down_proj(g * (g >= self.t) * (u * (u > 0)))


def _hand_drelu_llama(model: nn.Module, ts: list[float]) -> nn.Module:
    ref = copy.deepcopy(model)
    for layer, t in zip(ref.model.layers, ts):
        mlp = layer.mlp
        mlp.up_proj.__class__ = nn.Linear  # plain linears in the hand-made reference
        layer.mlp = HandDReLUMLP(mlp, t)
    return ref.eval()


@pytest.mark.parametrize("thresholds", [0.0, [0.02, 0.07]])
def test_drelu_eager_save_and_reload_exactly(
    tmp_path: Path, ids: torch.Tensor, thresholds: float | list[float]
) -> None:
    """relufy_(model, "drelu"[, t]) computes the hand-written dReLU FFN (and differs from the
    ReLU-gated one), saves as hidden_act="drelu" with per-layer thresholds and the up ReLU
    recorded, and reloads with from_pretrained to the same logits; relufy_ "relu" undoes the
    up ReLU."""
    model = tiny("llama")
    ts = thresholds if isinstance(thresholds, list) else [thresholds] * 2
    ref = _hand_drelu_llama(model, ts)
    sites = relufy_(model, "drelu", thresholds)
    assert [(s.activation, s.threshold) for s in sites] == [("drelu", t) for t in ts]
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "ReLULinear"
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert (got - ref(input_ids=ids).logits).abs().max() < 1e-5
        relu_model = copy.deepcopy(model)
        relufy_(relu_model, "fatrelu", thresholds)
        assert (relu_model(input_ids=ids).logits - got).abs().max() > 1e-3
    found = find_ffn_sites(model)
    assert [(s.activation, s.threshold) for s in found] == [("drelu", t) for t in ts]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_act"] == "drelu"
    assert config["prosparse_up_relu"] == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    assert all(
        "up_proj.weight" in k or "up_proj" not in k
        for k in load_file(tmp_path / "model.safetensors")
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _thresholds(loaded) == ts
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, got)
    assert [s.activation for s in find_ffn_sites(loaded)] == ["drelu", "drelu"]
    relufy_(loaded, "relu")  # back: the up ReLU goes, and the config record with it
    assert type(loaded.model.layers[0].mlp.up_proj) is nn.Linear
    assert not hasattr(loaded.config, "prosparse_up_relu")


def test_drelu_refuses_plain_ffn_by_site(ids: torch.Tensor) -> None:
    model = tiny("gpt2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"needs a gated FFN.*transformer\.h\.0\.mlp.*'relu'"):
        relufy_(model, "drelu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"


def test_drelu_mixture_of_experts_eager_and_reload(tmp_path: Path) -> None:
    """Mixtral's experts with dReLU: each expert computes act(gate) * relu(up) (checked against
    a loop over the experts written here), in the eager and batched_mm implementations, after
    save_pretrained / from_pretrained too; measure_sparsity counts exact zeros of that x1."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from prosparse_fx import measure_sparsity

    torch.manual_seed(0)
    model = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
        )  # fmt: skip
    ).eval()
    sites = relufy_(model, "drelu", 0.01)
    assert len(sites) == 8 and {s.activation for s in sites} == {"drelu"}
    experts = model.model.layers[0].mlp.experts
    h = torch.randn(6, 32)
    idx = torch.randint(0, 4, (6, 2))
    w = torch.rand(6, 2)
    want = torch.zeros_like(h)
    zeros = []
    for e in range(4):
        tok, k = torch.where(idx == e)
        gate, up = (h[tok] @ experts.gate_up_proj[e].T).chunk(2, -1)
        x1 = gate * (gate >= 0.01) * (up * (up > 0))
        zeros.append(x1)
        want.index_add_(0, tok, (x1 @ experts.down_proj[e].T) * w[tok, k, None])
    with torch.no_grad():
        for impl in ("eager", "batched_mm"):
            experts.config._experts_implementation = impl
            assert (experts(h, idx, w) - want).abs().max() < 1e-5, impl
        experts.config._experts_implementation = "eager"
    ids = torch.randint(3, 128, (2, 8))
    report = measure_sparsity(model, ids, sites=sites)
    assert 0.5 < report.sparsity < 1.0  # ReLU on both sides: most x1 entries are zero
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        # the loaded model runs its default experts implementation: float rounding only
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5
    assert {s.activation for s in find_ffn_sites(loaded)} == {"drelu"}
