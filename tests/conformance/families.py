"""Tiny random-initialised models of the transformers families the conformance suite covers, and
their hand-made references: the same architecture built by transformers with the FFN activation
set in its config (``"relu"``, or a FATReLU written here in three lines), loaded with the same
weights. The references share no code with prosparse_fx."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from torch import nn
from transformers import activations as hf_activations

VOCAB = 96
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_DEC = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    **_ATTN,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _configs() -> dict[str, tuple[Callable[..., nn.Module], Callable[[], object], str]]:
    """family -> (model class, config factory, config key of the FFN activation)."""
    return {
        "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_DEC), "hidden_act"),
        "llama-mlp-bias": (
            tf.LlamaForCausalLM,
            lambda: tf.LlamaConfig(**_DEC, mlp_bias=True),
            "hidden_act",
        ),
        "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(**_DEC), "hidden_act"),
        "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**_DEC), "hidden_act"),
        "qwen3": (tf.Qwen3ForCausalLM, lambda: tf.Qwen3Config(**_DEC, head_dim=8), "hidden_act"),
        "gemma2": (
            tf.Gemma2ForCausalLM,
            lambda: tf.Gemma2Config(**_DEC, head_dim=8, hidden_activation="gelu_pytorch_tanh"),
            "hidden_activation",
        ),
        "gemma3": (
            tf.Gemma3ForCausalLM,
            lambda: tf.Gemma3TextConfig(**_DEC, head_dim=8, hidden_activation="gelu_pytorch_tanh"),
            "hidden_activation",
        ),
        "phi3": (tf.Phi3ForCausalLM, lambda: tf.Phi3Config(**_DEC), "hidden_act"),
        "olmo2": (tf.Olmo2ForCausalLM, lambda: tf.Olmo2Config(**_DEC), "hidden_act"),
        "gpt2": (
            tf.GPT2LMHeadModel,
            lambda: tf.GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_inner=48,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            ),
            "activation_function",
        ),
        "gpt_neox": (
            tf.GPTNeoXForCausalLM,
            lambda: tf.GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                hidden_dropout=0.0,
                attention_dropout=0.0,
            ),
            "hidden_act",
        ),
        "opt": (
            tf.OPTForCausalLM,
            lambda: tf.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
                activation_function="gelu",
                dropout=0.0,
                attention_dropout=0.0,
            ),
            "activation_function",
        ),
        "bert": (
            tf.BertModel,
            lambda: tf.BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            "hidden_act",
        ),
        "mixtral": (
            tf.MixtralForCausalLM,
            lambda: tf.MixtralConfig(**_DEC, num_local_experts=4, num_experts_per_tok=2),
            "hidden_act",
        ),
        "qwen2_moe": (
            tf.Qwen2MoeForCausalLM,
            lambda: tf.Qwen2MoeConfig(
                **_DEC,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=48,
            ),
            "hidden_act",
        ),
    }


FAMILIES = list(_configs())
ENCODERS = {"bert"}
MOE = {"mixtral", "qwen2_moe"}


def build(family: str, seed: int = 0) -> nn.Module:
    """The tiny model of ``family`` (float32, eval mode, seeded)."""
    cls, config, _ = _configs()[family]
    torch.manual_seed(seed)
    model = cls(config())
    with torch.no_grad():  # larger gate values than the default init, so FATReLU thresholds bite
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    return model.eval()


class RefFATReLU(nn.Module):
    """FATReLU of the paper (Eq. 3), written independently: ``x`` where ``x >= t``, else 0. Counts
    the inputs within ``1e-4`` of ``t``, where two correct implementations may round apart."""

    near = 0

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        RefFATReLU.near += int(((x.float() - self.t).abs() < 1e-4).sum())
        return torch.where(x >= self.t, x, torch.zeros_like(x))


def reference(model: nn.Module, family: str, threshold: float | None) -> nn.Module:
    """The hand-made reference of ``model``: transformers builds the same architecture with its
    FFN activation ReLU (``threshold=None``) or :class:`RefFATReLU` (``t``), and loads the same
    weights."""
    cls, config_factory, key = _configs()[family]
    config = config_factory()
    if threshold is None:
        setattr(config, key, "relu")
    else:
        name = f"conformance_fatrelu_{threshold}"
        hf_activations.ACT2CLS[name] = hf_activations.ACT2FN[name] = (RefFATReLU, {"t": threshold})
        setattr(config, key, name)
    ref = cls(config)
    # the library's FATReLU keeps its threshold in a buffer; the reference's is an attribute
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("threshold_bits")}
    ref.load_state_dict(state, strict=True)
    return ref.to(next(model.parameters()).dtype).eval()
