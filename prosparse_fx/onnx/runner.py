"""Greedy generation with an exported model in ONNX Runtime (no torch needed at run time)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .export import METADATA_PREFIX


def session_options(threads: int | None = None, spinning: bool = True) -> Any:
    """``onnxruntime.SessionOptions`` with ``threads`` intra-op threads (``None``: ONNX
    Runtime's choice) and, with ``spinning=False``, idle threads that sleep instead of spinning
    between calls (for several sessions taking turns on few cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxCausalLM:
    """An ONNX file written by :func:`~prosparse_fx.onnx.export_onnx`, run by ONNX Runtime.

    Args:
        path: the ``.onnx`` file (its ``.data`` file beside it, if any).
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).
        spinning: let idle intra-op threads spin between calls (ONNX Runtime's default; turn it
            off when several sessions take turns on few cores).

    Raises:
        InputError: the file is missing or ONNX Runtime cannot load it, or its inputs are not
            those of an exported causal LM.
    """

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        spinning: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            what = "is not a file" if self.path.exists() else "does not exist"
            raise InputError(f"ONNX file {str(path)!r} {what}")
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                session_options(threads, spinning),
                providers=providers or ["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise InputError(f"ONNX Runtime cannot load {str(path)!r}: {exc}") from exc
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        if self.input_names[:2] != ["input_ids", "attention_mask"]:
            raise InputError(
                f"{str(path)!r} takes inputs {self.input_names[:4]}, not those of a causal LM "
                "exported by prosparse-fx (input_ids, attention_mask, ...)"
            )
        outputs = self.session.get_outputs()
        if outputs[0].name != "logits" or len(outputs[0].shape) != 3:
            raise InputError(
                f"{str(path)!r} does not return logits [batch, seq, vocab] first (it returns "
                f"{outputs[0].name} {outputs[0].shape}); export the model with prosparse-fx export"
            )
        self.past_inputs = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.kv_cache = bool(self.past_inputs)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {
            k.removeprefix(METADATA_PREFIX): v
            for k, v in meta.items()
            if k.startswith(METADATA_PREFIX)
        }
        # "learned" / "rotary" and the positions the model was built for (files exported before
        # these were recorded have neither: set them from the source model's config)
        self.positions: str | None = self.metadata.get("positions")
        limit = self.metadata.get("max_positions", "")
        self.max_positions: int | None = int(limit) if limit.isdigit() else None

    @property
    def vocab_size(self) -> int | None:
        """The logits' last dimension, when the file states it."""
        size = self.session.get_outputs()[0].shape[-1]
        return size if isinstance(size, int) else None

    def _check_ids(self, ids: np.ndarray) -> None:
        vocab = self.vocab_size
        if ids.size and (ids.min() < 0 or (vocab is not None and ids.max() >= vocab)):
            raise InputError(
                f"token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}"
            )

    def check_length(
        self, prompt_tokens: int, max_new_tokens: int, option: str = "max_new_tokens"
    ) -> str | None:
        """Check that generation stays within the model's positions: the last new token is
        predicted from position ``prompt_tokens + max_new_tokens - 2``, the last one fed.

        Args:
            prompt_tokens: tokens of the prompt (padding included).
            max_new_tokens: tokens to add.
            option: how the caller names ``max_new_tokens`` (in the message).

        Returns:
            A warning when a model with rotary positions goes past those it was trained with
            (it computes, but was never trained there), else ``None``.

        Raises:
            InputError: a model with learned positions (GPT-2) would go past its last one,
                where it has no embedding; the message names the limit and the largest
                ``max_new_tokens`` that fits.
        """
        limit = self.max_positions
        if limit is None or max_new_tokens < 1 or prompt_tokens + max_new_tokens - 1 <= limit:
            return None
        fits = limit - prompt_tokens + 1
        if self.positions == "learned":
            sep = "=" if option.isidentifier() else " "  # max_new_tokens=13, --max-new-tokens 13
            fix = f"pass {option}{sep}{fits} or less" if fits > 0 else "shorten the prompt"
            raise InputError(
                f"the prompt ({prompt_tokens} tokens) and {max_new_tokens} new tokens need "
                f"{prompt_tokens + max_new_tokens - 1} positions, but the model has "
                f"{limit} positions (learned position embeddings, max_position_embeddings), "
                f"none past them; {fix}"
            )
        return (
            f"the prompt ({prompt_tokens} tokens) and {max_new_tokens} new tokens go past the "
            f"{limit} positions the model was trained with (max_position_embeddings"
            f"{', rotary positions' if self.positions == 'rotary' else ''}); the tokens past "
            f"them may be poor"
        )

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past key/values: ``[batch, kv_heads, 0, head_dim]`` float32 per input."""
        return [
            np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.past_inputs
        ]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None = None,
        past: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: ``logits [batch, seq, vocab]`` float32 and the present key/values.

        Args:
            input_ids: ``[batch, seq]`` int64.
            attention_mask: ``[batch, past + seq]`` int64 (1 = attend, 0 = padding).
            position_ids: ``[batch, seq]`` int64 (default: from the mask).
            past: the present of the previous call (default: empty).

        Raises:
            InputError: ``input_ids`` is not 2-D, or has no rows or no tokens.
        """
        _check_not_empty(np.asarray(input_ids), "seq")
        self._check_ids(np.asarray(input_ids))
        feeds: dict[str, Any] = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        if self.kv_cache:
            if position_ids is None:
                position_ids = _positions(attention_mask)[:, -input_ids.shape[1] :]
            feeds["position_ids"] = position_ids.astype(np.int64)
            past = self.empty_past(input_ids.shape[0]) if past is None else past
            feeds |= {i.name: p for i, p in zip(self.past_inputs, past)}
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int = 32,
        attention_mask: np.ndarray | None = None,
        eos_token_id: int | None = None,
    ) -> np.ndarray:
        """Greedy decoding, one token per call with the KV cache (the whole sequence without).

        Args:
            input_ids: ``[batch, prompt]`` int64 (left-padded when batched).
            max_new_tokens: tokens to add (>= 0).
            attention_mask: ``[batch, prompt]`` (default: all ones).
            eos_token_id: stop a row at this token; finished rows repeat it.

        Returns:
            ``[batch, prompt + new]`` int64; fewer new tokens when every row ended.

        Raises:
            InputError: ``max_new_tokens`` not a whole number >= 0, ``input_ids`` not 2-D,
                without rows or tokens, not integers or outside the vocabulary, or an
                ``attention_mask`` of another shape, not 0/1, with an all-zero row, or
                right-padded; a model with learned positions would go past its last one (see
                :meth:`check_length`; with rotary positions, a warning).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise InputError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = np.asarray(input_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        _check_not_empty(ids, "prompt")
        self._check_ids(ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(
                f"attention_mask must have the shape of input_ids {list(ids.shape)}, "
                f"got {list(mask.shape)}"
            )
        if not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
            raise InputError("attention_mask must hold 0/1 with at least one 1 in every row")
        if (np.diff(mask, axis=1) < 0).any():
            raise InputError(
                "attention_mask has padding after a token (right padding): generation appends "
                "to the end of every row, so pad on the left (tokenizer.padding_side = 'left')"
            )
        too_long = self.check_length(ids.shape[1], int(max_new_tokens))
        if too_long is not None:
            warnings.warn(too_long, stacklevel=2)
        done = np.zeros(ids.shape[0], dtype=bool)
        past: list[np.ndarray] | None = None
        step_ids = ids
        for _ in range(max_new_tokens):
            if self.kv_cache:
                logits, past = self.forward(step_ids, mask, past=past)
            else:
                logits, _ = self.forward(ids, mask)
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(nxt)[:, None]], axis=1)
            step_ids = nxt[:, None]
            if done.all():
                break
        return ids


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position of each token counting only attended ones (left padding gets 0)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def _check_not_empty(ids: np.ndarray, seq: str) -> None:
    """Refuse input_ids that are not ``[batch, seq]`` with ``batch, seq >= 1`` (``seq``: the
    name of the second dim in the message).

    The exported graph computes what the torch model computes, and the Hugging Face models
    refuse an empty batch or sequence (their attention reshapes with an inferred dim that 0
    elements leave ambiguous): in ONNX Runtime a zero-length sequence fails in a Reshape, and
    an empty batch would make :meth:`OnnxCausalLM.generate` stop at once (all of no rows ended).
    """
    if ids.ndim != 2 or 0 in ids.shape:
        raise InputError(
            f"input_ids must be [batch, {seq}] with at least one row and one token, got shape "
            f"{list(ids.shape)} (the model, like its torch original, cannot run an empty batch "
            "or sequence)"
        )
