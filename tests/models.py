"""Tiny random-initialised Hugging Face models of the six families the passes must handle."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
HIDDEN = 32
FFN = 64
LAYERS = 2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


class HandFATReLU(torch.nn.Module):
    """``x * (x >= t)``: FATReLU written out by hand (ProSparse Eq. 3), for references."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x >= self.t).to(x.dtype)


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` in eval mode (float32)."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_COMMON))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(**_COMMON, head_dim=8, hidden_activation="gelu_pytorch_tanh")
        )
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_inner=FFN,
                n_layer=LAYERS,
                n_head=4,
                n_positions=128,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
    elif family == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=FFN,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                max_position_embeddings=128,
            )
        )
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "gpt2", "bert"]
GATED = {"llama", "qwen2", "mistral", "gemma3"}
EXPECTED_ACT = {
    "llama": "silu",
    "qwen2": "silu",
    "mistral": "silu",
    "gemma3": "gelu_tanh",
    "gpt2": "gelu_tanh",
    "bert": "gelu",
}


# A word-level vocabulary and tokenizer: tiny models whose folders save and load in
# milliseconds (the crash and bad-input tests run many of them).
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def word_tokenizer(far_ids: bool = False):  # noqa: ANN201
    """One token per word, no BOS. ``far_ids``: words w36.. get ids 1000 and up, so the
    tokenizer has as many tokens as the model's embedding has rows but ids past them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i + (1000 if far_ids and i >= 40 else 0) for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip


def word_text(rng, n: int) -> str:
    """``n`` random words of :data:`WORDS` (w0..w59)."""
    return " ".join(f"w{rng.randrange(60)}" for _ in range(n))
