"""Regressions found by a fresh review of issue 12's work, each once silently different (or an
unclear crash): FFN activations that do not come back from the config key after a reload
(BLOOM, MPT) or whose key other code reads as a string (Jamba's Mamba mixer); the sparse rewrite
of an FFN that takes a flattened input (Qwen2-MoE's shared expert) with batch > 1; the compile
backend's activation option on a model whose FFN the matcher does not know (Falcon); capture of
a model that takes ``use_cache`` through ``**kwargs`` (GraniteMoE)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn

from prosparse_fx import find_ffn_sites, relufy_
from tests.conformance.families import build

_DEC = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
X = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(0))


def _scaled(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name and "wte" not in name:
                p.mul_(4.0)
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.mark.parametrize("family", ["bloom", "mpt"])
@pytest.mark.parametrize("activation", ["relu", "fatrelu"])
def test_ffn_activation_without_a_config_key_survives_reload(family, activation, tmp_path):
    torch.manual_seed(0)
    if family == "bloom":
        model = tf.BloomForCausalLM(
            tf.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4)
        )
    else:
        config = tf.MptConfig(
            vocab_size=96, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64
        )
        model = tf.MptForCausalLM(config)
    model = _scaled(model)
    relufy_(model, activation, 0.3)
    before = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), before, atol=1e-6, rtol=1e-6)


def test_jamba_mamba_mixer_keeps_silu_after_reload(tmp_path) -> None:
    torch.manual_seed(0)
    config = tf.JambaConfig(
        **_DEC,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        use_mamba_kernels=False,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
    )
    model = _scaled(tf.JambaForCausalLM(config))
    ref = copy.deepcopy(model)  # hand-made: the FFN activations ReLU, the mixer untouched
    ref.model.layers[0].feed_forward.act_fn = nn.ReLU()
    ref.model.layers[1].feed_forward.experts.act_fn = nn.ReLU()
    relufy_(model, "relu")
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-6, rtol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = tf.JambaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(ref), atol=1e-6, rtol=1e-6)


def test_sparse_rewrite_of_a_flattened_shared_expert_with_batch(tmp_path) -> None:
    model = build("qwen2_moe")
    relufy_(model, "relu")
    want = _logits(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prosparse", options={"compiler": "eager"})
    with torch.no_grad():
        got = compiled(input_ids=X).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compile_activation_refused_when_the_ffn_is_not_matched() -> None:
    torch.manual_seed(0)
    config = tf.FalconConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=48,
    )
    model = tf.FalconForCausalLM(config).eval()
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="prosparse", options={"activation": "relu", "compiler": "eager"}
    )
    with pytest.raises(Exception, match="no FFN site the backend can rewrite"):
        with torch.no_grad():
            compiled(input_ids=X)


def test_capture_passes_use_cache_through_kwargs() -> None:
    torch.manual_seed(0)
    config = tf.GraniteMoeConfig(**_DEC, num_local_experts=4, num_experts_per_tok=2)
    model = _scaled(tf.GraniteMoeForCausalLM(config))
    ref = copy.deepcopy(model)
    sites = find_ffn_sites(model)
    assert len(sites) == 8 and all(s.expert is not None for s in sites)
    relufy_(model, "relu", sites=sites)
    for layer in ref.model.layers:
        layer.block_sparse_moe.experts.act_fn = nn.ReLU()
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-6, rtol=1e-6)
