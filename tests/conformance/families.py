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
PLAIN = {"gpt2", "gpt_neox", "opt", "bert"}  # fc1 -> act -> fc2: no up projection
GATED = [f for f in FAMILIES if f not in PLAIN]


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


# ----------------------------------------------------------------------------- dReLU reference


def _drelu_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP with ReLU on up too (TurboSparse Sec. 3): down(act(gate(x)) * relu(up(x)))."""
    up = self.up_proj(x)
    return self.down_proj(self.act_fn(self.gate_proj(x)) * torch.where(up > 0, up, 0.0))


def _drelu_fused_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's fused MLP with ReLU on the up half."""
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self.activation_fn(gate) * torch.where(up > 0, up, 0.0))


def _drelu_experts(self: nn.Module, hidden: torch.Tensor, top_k_index, top_k_weights):
    """transformers' eager experts loop (Mixtral, Qwen2-MoE) with ReLU on each expert's up."""
    out = torch.zeros_like(hidden)
    for e in range(self.gate_up_proj.shape[0]):
        token_idx, k_pos = torch.where(top_k_index == e)
        gate, up = nn.functional.linear(hidden[token_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
        h = self.act_fn(gate) * torch.where(up > 0, up, 0.0)
        h = nn.functional.linear(h, self.down_proj[e]) * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


def drelu_reference(model: nn.Module, family: str, threshold: float | None) -> nn.Module:
    """:func:`reference` with each gated FFN's forward written out by hand as dReLU: the gate's
    ReLU (or :class:`RefFATReLU` t) times ReLU of up (TurboSparse Sec. 3). Plain FFNs have no
    up projection: ``ValueError``."""
    import types

    ref = reference(model, family, threshold)
    patched = 0
    for module in ref.modules():
        if isinstance(getattr(module, "gate_up_proj", None), nn.Linear):
            module.forward = types.MethodType(_drelu_fused_mlp, module)
        elif isinstance(getattr(module, "up_proj", None), nn.Linear) and hasattr(
            module, "gate_proj"
        ):
            module.forward = types.MethodType(_drelu_mlp, module)
        elif isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            module.forward = types.MethodType(_drelu_experts, module)
        else:
            continue
        patched += 1
    if not patched:
        raise ValueError(f"{family} has no gated FFN for a dReLU reference")
    return ref
