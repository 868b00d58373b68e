"""Greedy generation with an exported model in ONNX Runtime (no torch needed at run time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .export import METADATA_PREFIX


class OnnxCausalLM:
    """An ONNX file written by :func:`~prosparse_fx.onnx.export_onnx`, run by ONNX Runtime.

    Args:
        path: the ``.onnx`` file (its ``.data`` file beside it, if any).
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).

    Raises:
        InputError: the file is missing or ONNX Runtime cannot load it, or its inputs are not
            those of an exported causal LM.
    """

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"ONNX file {str(path)!r} does not exist")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
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
        self.past_inputs = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.kv_cache = bool(self.past_inputs)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {
            k.removeprefix(METADATA_PREFIX): v
            for k, v in meta.items()
            if k.startswith(METADATA_PREFIX)
        }

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
        """
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
            InputError: ``max_new_tokens < 0`` or ``input_ids`` not 2-D.
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be [batch, prompt] with a prompt, got {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
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
