"""Mixture-of-experts experts as FFN sites (issue 12, case 7): found, relufied, tapped and
measured per expert, and trained end to end by ``prosparse-fx sparsify``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from prosparse_fx import find_ffn_sites, measure_sparsity, relufy_
from prosparse_fx.cli import app
from tests.test_cli import _config, runner


def _mixtral(vocab: int = 128, **kw) -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        **kw,
    )
    return MixtralForCausalLM(cfg).eval()


def test_each_expert_is_a_site() -> None:
    sites = find_ffn_sites(_mixtral())
    assert [(s.path, s.expert) for s in sites] == [
        (f"model.layers.{layer}.mlp.experts.{e}", e) for layer in range(2) for e in range(4)
    ]
    assert all(s.kind == "gated" and s.gate_up_split == (0, 64) for s in sites)
    assert {s.activation for s in sites} == {"silu"}


def test_per_expert_sparsity_against_hand_computation(ids) -> None:
    """measure's per-expert sparsity is, per expert, the mean over the tokens routed to it of the
    fraction of zeros of relu(x W_gate^T) * (x W_up^T), computed here from the router's choice."""
    model = _mixtral()
    sites = relufy_(model, "relu")
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        model.model.layers[layer].mlp.experts.register_forward_pre_hook(
            lambda _m, args, _l=layer: seen.__setitem__(_l, (args[0], args[1]))
        )
        for layer in range(2)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    want = []
    for layer in range(2):
        hidden, top_k = seen[layer]
        experts = model.model.layers[layer].mlp.experts
        for e in range(4):
            rows = (top_k == e).any(-1)
            gate, up = F.linear(hidden[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
            x1 = torch.relu(gate) * up
            want.append(float((x1 == 0).float().mean(-1).mean()) if len(x1) else float("nan"))
    got = measure_sparsity(model, ids, sites=sites).per_layer
    assert got == pytest.approx(want, nan_ok=True, abs=1e-6)


def test_experts_sharing_act_fn_refuse_different_thresholds() -> None:
    model = _mixtral()
    with pytest.raises(ValueError, match="share one activation module"):
        relufy_(model, "fatrelu", [0.1 * i for i in range(8)])


def test_sparsify_trains_a_tiny_mixtral(tmp_path, smollm2, text_file) -> None:  # noqa: F811
    _, tok = smollm2
    model_dir = tmp_path / "tiny-mixtral"
    model = _mixtral(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["sparsify", "--model", str(model_dir), "--data", str(text_file), "--out", str(out)]
    args += ["--max-steps", "4", "--config", str(_config(tmp_path))]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    per_expert = report["per_layer_sparsity"]
    assert len(per_expert) == 8 and all(0.0 <= v <= 1.0 for v in per_expert)
    reloaded = MixtralForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[0].mlp.experts.act_fn).__name__ == "FATReLU"
