"""A causal LM with its KV cache as flat tensors: the signature an ONNX decoder exports with.

Inputs ``input_ids [batch, seq]``, ``attention_mask [batch, past + seq]``,
``position_ids [batch, seq]`` (int64) and, per layer i, ``past_key_values.{i}.key`` /
``.value`` ``[batch, kv_heads, past, head_dim]``; outputs ``logits [batch, seq, vocab]`` and
``present.{i}.key`` / ``.value`` ``[batch, kv_heads, past + seq, head_dim]``. A first step
passes ``past = 0``. The names follow the convention of Hugging Face Optimum's ONNX decoders.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class CacheLayout:
    """A decoder's KV cache: ``layers`` x (key, value), each ``[b, kv_heads, p, head_dim]``."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> CacheLayout:
        """Read the layout from a Hugging Face causal LM's config.

        Raises:
            InputError: the model has no decoder config (layers, heads, hidden size).
        """
        cfg = getattr(model, "config", None)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        try:
            layers = int(cfg.num_hidden_layers)
            heads = int(cfg.num_attention_heads)
            kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        except (AttributeError, TypeError) as exc:
            raise InputError(
                f"{type(model).__name__} has no decoder config (num_hidden_layers, "
                "num_attention_heads, hidden_size): a Hugging Face model without a KV cache "
                "exports with kv_cache=False (--no-cache), any other module with "
                "example_inputs=(tensor, ...)"
            ) from exc
        return cls(layers, kv_heads, head_dim)

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids"]
        for i in range(self.layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Zero-length past tensors for a first step."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.layers)]


def _cache_keyword(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise InputError(
        f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor "
        "`past_key_values`): export it with kv_cache=False (--no-cache)"
    )


class CachedDecoder(nn.Module):
    """Wrap a Hugging Face causal LM so that its KV cache goes in and out as flat tensors.

    Args:
        model: a causal LM whose cache is a ``transformers.DynamicCache`` of full-attention
            layers (LLaMA, Qwen2, Mistral without sliding window, ...).

    Raises:
        InputError: the model has no decoder config or takes no cache.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # capture restores this mode: keep the user's
        self.layout = CacheLayout.of(model)
        self.cache_keyword = _cache_keyword(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layout.layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        kwargs: dict[str, Any] = {self.cache_keyword: cache}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        new_cache = _returned_cache(out)
        if new_cache is None:
            raise InputError(_NO_CACHE.format(name=type(self.model).__name__))
        present: list[torch.Tensor] = []
        for layer in new_cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


_NO_CACHE = (
    "{name} returns no KV cache from its forward (an encoder, or a model whose config turns "
    "the cache off), so it has no present key/values to export with the KV-cache signature: "
    "export it with kv_cache=False (--no-cache)"
)


def _returned_cache(out: Any) -> Any:
    for name in ("past_key_values", "cache"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def check_full_attention(decoder: CachedDecoder) -> None:
    """Refuse models the KV-cache signature cannot express: those whose forward returns no
    cache (an encoder such as BERT), and caches that drop tokens (sliding window), whose
    present would not be ``past + seq``. The first is found by one forward of one token.

    Raises:
        InputError: the model returns no cache, or a layer of its cache is not a plain
            full-attention layer; both name ``kv_cache=False`` (``--no-cache``).
    """
    from transformers import DynamicCache

    layout = decoder.layout
    name = type(decoder.model).__name__
    past = layout.empty_past(1)
    pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layout.layers)]
    cache = DynamicCache(pairs, config=decoder.model.config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {"DynamicLayer"}:
        raise InputError(
            f"{name} has cache layers {sorted(kinds)}; the KV-cache export "
            "supports full-attention layers (DynamicLayer) only: export with kv_cache=False "
            "(--no-cache)"
        )
    param = next(decoder.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    one = torch.zeros((1, 1), dtype=torch.long, device=device)
    probe = DynamicCache(config=decoder.model.config)
    try:
        with torch.no_grad():
            out = decoder.model(
                input_ids=one,
                attention_mask=torch.ones_like(one),
                position_ids=one,
                use_cache=True,
                **{decoder.cache_keyword: probe},
            )
    except Exception:  # noqa: BLE001  (the capture that follows reports what fails)
        return
    if _returned_cache(out) is None:
        raise InputError(_NO_CACHE.format(name=name))


def example_inputs(layout: CacheLayout, vocab: int) -> tuple[torch.Tensor, ...]:
    """Example inputs for tracing: batch 2, 3 new tokens after 4 cached ones (all dims > 1 so
    that none is specialised)."""
    batch, seq, past = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [
        torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=gen)
        for _ in range(2 * layout.layers)
    ]
    return (ids, mask, pos, *kv)


def dynamic_shapes(layout: CacheLayout) -> tuple[Any, ...]:
    """Dynamic batch, sequence, past and total (past + sequence) lengths."""
    dim = torch.export.Dim
    batch, seq, past = dim("batch"), dim("seq"), dim("past")
    total = dim.AUTO  # past + seq, derived by torch.export
    kv = [{0: batch, 2: past} for _ in range(2 * layout.layers)]
    # one entry per forward parameter: ``*past`` takes a tuple
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple(kv))
