"""The token windows of a sparsify run, made once from its config, so that the run, the frontier
benchmark and anyone re-measuring a run get the same windows.

* ``train``: every window of the training split, plus the documents of ``config.train_texts``;
* ``held_out``: ``config.eval_windows`` windows spread over the held-out split (the report's
  perplexity and sparsity);
* ``calib``: ``config.calib_windows`` windows spread over the calibration split (threshold
  calibration);
* ``out_of_domain``: ``config.eval_texts``' windows, sampled as
  :func:`prosparse_fx.data.sample_windows` samples them (never trained on).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from .config import SparsifyConfig
from .data import DocumentSplit, sample_windows, spread, token_windows
from .errors import InputError
from .models import check_token_ids
from .texts import load_text


@dataclasses.dataclass
class RunWindows:
    """``[N, config.seq_len]`` int64 token-id windows of one run (see the module docstring)."""

    train: torch.Tensor
    held_out: torch.Tensor
    calib: torch.Tensor
    out_of_domain: dict[str, torch.Tensor]

    @classmethod
    def make(cls, tokenizer: Any, split: DocumentSplit, config: SparsifyConfig) -> RunWindows:
        """Tokenize ``split`` (from :func:`prosparse_fx.data.split_documents` with
        ``config.seed``) and the named texts of ``config``.

        Raises:
            InputError: the training text gives fewer windows than one batch of
                ``config.batch_size``; a named text that is not installed; a text of
                ``config.train_texts`` whose documents are in the held-out or calibration
                split (the same text given as data: training on it would leak into the
                measurement).
        """
        n = config.eval_windows
        train_docs = list(split.train)
        for name in config.train_texts:
            docs = load_text(name)
            _check_no_leak(name, docs, split)
            train_docs.extend(docs)
        train = token_windows(tokenizer, train_docs, config.seq_len)
        needed = max(config.batch_size, 1)
        if train.shape[0] < needed:
            raise InputError(
                f"training text gives {train.shape[0]} windows of {config.seq_len} tokens, "
                f"fewer than one batch of {needed}; give more text"
            )
        return cls(
            train=train,
            held_out=spread(token_windows(tokenizer, split.held_out, config.seq_len), n),
            calib=spread(
                token_windows(tokenizer, split.calib, config.seq_len), config.calib_windows
            ),
            out_of_domain={
                name: sample_windows(tokenizer, load_text(name), config.seq_len, n)
                for name in config.eval_texts
            },
        )

    def check(self, model: Any, source: Path) -> None:
        """Refuse token ids outside ``model``'s embedding (a tokenizer that is not the model's,
        read from ``source``); see :func:`prosparse_fx.models.check_token_ids`."""
        for w in (self.train, self.held_out, self.calib, *self.out_of_domain.values()):
            check_token_ids(w, model, source)

    def counts(self) -> dict[str, int]:
        """Window counts as the report's ``data_split`` records them."""
        return {
            "train_windows": int(self.train.shape[0]),
            "held_out_windows": int(self.held_out.shape[0]),
            "calib_windows": int(self.calib.shape[0]),
        }


_MIN_SHARED = 40  # characters: shorter shared strings may be boilerplate, not a document


def _sentences(text: str) -> set[str]:
    """The sentences of ``text`` (split after . ! ?) of at least ``_MIN_SHARED`` characters,
    whitespace collapsed."""
    return {s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) >= _MIN_SHARED}


def _check_no_leak(name: str, docs: list[str], split: DocumentSplit) -> None:
    """Refuse a training text whose documents occur in the held-out or calibration split,
    however the data file cut them: a whole document (40 characters or more, whitespace
    collapsed) inside the measured text, or a sentence of 40 characters or more shared with it
    (a document the data file cut in two)."""
    measured = " ".join(" ".join(d.split()) for d in (*split.held_out, *split.calib))
    shared = _sentences(measured)

    def leaks(doc: str) -> bool:
        flat = " ".join(doc.split())
        return (len(flat) >= _MIN_SHARED and flat in measured) or bool(_sentences(flat) & shared)

    leaked = [d for d in docs if leaks(d)]
    if leaked:
        raise InputError(
            f"train_texts {name!r}: {len(leaked)} of its {len(docs)} documents are in the data's "
            "held-out or calibration split (is --data the same text?), so training on them "
            f"would leak into the measurement; drop {name!r} from train_texts or give other data"
        )
