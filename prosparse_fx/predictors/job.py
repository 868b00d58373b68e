"""The ``prosparse-fx predictors`` job: build the predictors of a relufied model folder on
calibration text, measure approximate mode against the exact model on held-out text, and save
the predictors into the folder (composes :func:`build_predictors`, :func:`sparsify_ffn_` and
:func:`save_predictors`)."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..ffn import FFNSite
from .predictor import KINDS, Predictor
from .quality import measure_predictors
from .storage import JSON_FILE, TENSORS_FILE
from .trained import TrainingConfig


def approximate_mode_report(
    model: nn.Module,
    predictors: Sequence[Predictor],
    windows: torch.Tensor,
    sites: Sequence[FFNSite],
    *,
    exact_perplexity: float | None = None,
) -> dict[str, Any]:
    """Approximate mode against the exact model on ``windows`` (held-out text).

    Args:
        model: the exact model (left unchanged: approximate mode runs on a copy).
        predictors: one per site of ``sites``, in order.
        windows: ``[N, T]`` token ids.
        sites: the FFN sites of ``model``.
        exact_perplexity: the exact model's perplexity on ``windows`` when already measured.

    Returns:
        ``perplexity_exact``, ``perplexity_predicted``, their ratio, the sites that stay exact
        because their predictor measured slower (``exact_sites``), the predictors' ``kinds``
        and ``ranks`` (sorted, distinct), and per site the recall,
        precision, predicted and true sparsity of its predictor on ``windows``
        (:func:`~prosparse_fx.predictors.measure_predictors`, on the exact model's x and x1).
    """
    from ..measure import perplexity
    from ..sparse_modules import sparsify_ffn_
    from .speed import predictors_that_pay

    exact = perplexity(model, windows) if exact_perplexity is None else exact_perplexity
    paying = predictors_that_pay(predictors)
    approximate = copy.deepcopy(model).eval()
    sparsify_ffn_(approximate, sites=sites, predictors=predictors)
    predicted = perplexity(approximate, windows)
    quality = measure_predictors(model, predictors, windows, sites)
    return {
        "perplexity_exact": exact,
        "perplexity_predicted": predicted,
        "perplexity_ratio": predicted / exact,
        "exact_sites": [p.site for p in predictors if p not in paying],
        "kinds": sorted({p.kind for p in predictors}),
        "ranks": sorted({p.rank for p in predictors}),
        "sites": [dataclasses.asdict(q) for q in quality],
    }


def run_predictors_job(
    model_dir: Path,
    *,
    data: Path | None = None,
    kind: str = "svd",
    rank: int,
    recall: float = 0.99,
    epochs: int = TrainingConfig.epochs,
    windows: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    tokenizer: Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build, measure and save the predictors of the model in ``model_dir``.

    The cut of each predictor is calibrated on the calibration split of the text, and the
    perplexities are measured on its held-out split (the document split of ``seed``, as
    ``prosparse-fx sparsify`` makes it).

    Args:
        model_dir: a Hugging Face model folder of a ReLU/FATReLU/dReLU causal LM; the
            predictors are written into it.
        data: the text (default: the Wikipedia sample).
        kind, rank, recall: as for :func:`~prosparse_fx.predictors.build_predictors`.
        epochs: training epochs of the trained kind (:class:`TrainingConfig`).
        windows, seq_len: windows of each split, tokens per window.
        seed: seed of the document split.
        tokenizer: a tokenizer folder when the model folder has none.
        overwrite: replace predictors already in the folder.

    Returns:
        The report: per site the cut and the recall, precision, predicted and true sparsity on
        the calibration windows (``sites``, with the measured ``speedup`` over exact mode) and
        on the held-out windows (``held_out_sites``), the sites that stay exact where their
        predictor measured slower (``exact_sites``), and the held-out perplexity of the exact
        model and of approximate mode.

    Raises:
        InputError: a bad argument, a model that is not a folder or not ReLU-family, or
            predictors already in the folder without ``overwrite``.
    """
    from ..data import load_documents, split_documents, spread, token_windows
    from ..ffn import FFNNotFoundError, find_ffn_sites
    from ..models import check_causal_lm, check_model_path, check_seq_len, load_model
    from ..sparse_modules import NotSparseError
    from .calibrate import build_predictors, check_recall
    from .speed import time_predictors
    from .storage import save_predictors

    if windows < 1 or seq_len < 2:
        raise InputError("--windows must be >= 1 and --seq-len >= 2")
    if kind not in KINDS:
        raise InputError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        check_recall(recall)
    except ValueError as exc:
        raise InputError(f"--recall: {exc}") from exc
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"--rank must be an integer >= 1, got {rank!r}")
    try:
        training = TrainingConfig(epochs=epochs)
    except ValueError as exc:
        raise InputError(f"--epochs must be an integer >= 1, got {epochs!r}") from exc
    if not check_model_path(model_dir).is_dir():
        raise InputError(
            f"{model_dir} is a file; the predictors are saved into the model's folder: give a "
            "Hugging Face model folder (e.g. a sparsify --out folder)"
        )
    if not os.access(model_dir, os.W_OK):
        raise InputError(
            f"{model_dir} is not writable, and the predictors are saved into it: make it "
            "writable, or copy the model to a folder you can write"
        )
    existing = [n for n in (JSON_FILE, TENSORS_FILE) if (model_dir / n).exists()]
    if existing and not overwrite:
        raise InputError(
            f"{model_dir} already holds predictors ({', '.join(existing)}); pass --overwrite to "
            "replace them"
        )
    config = check_causal_lm(model_dir).get_text_config()
    d = getattr(config, "hidden_size", None)
    d_ff = next(  # LLaMA-style, OPT, GPT-2 (n_inner; None means 4 d)
        (v for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(config, k, None))),
        4 * d if isinstance(d, int) and getattr(config, "model_type", "") == "gpt2" else None,
    )
    if isinstance(d, int) and isinstance(d_ff, int) and rank > min(d, d_ff):
        raise InputError(  # the model's FFNs are checked again once it is loaded
            f"--rank {rank} is above min(d, d_ff) = {min(d, d_ff)} of this model (hidden_size "
            f"{d}, intermediate_size {d_ff}): give a rank in [1, {min(d, d_ff)}]"
        )
    docs = load_documents(data)
    lm, tok = load_model(model_dir, tokenizer=tokenizer)
    check_seq_len(lm, seq_len)
    split = split_documents(docs, seed=seed)
    calib = spread(token_windows(tok, split.calib, seq_len), windows)
    held_out = spread(token_windows(tok, split.held_out, seq_len), windows)
    try:
        sites = find_ffn_sites(lm)
        predictors = build_predictors(
            lm, calib, sites, kind=kind, rank=rank, recall=recall, training=training
        )
        predictors = time_predictors(lm, predictors, calib, sites)
    except (FFNNotFoundError, NotSparseError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    held = approximate_mode_report(lm, predictors, held_out, sites)
    try:
        save_predictors(model_dir, predictors, lm, sites, overwrite=overwrite)
    except OSError as exc:  # OutputWriteError too: disk full, permissions changed meanwhile
        raise InputError(f"cannot save the predictors into {model_dir}: {exc}") from exc
    return {
        "model": str(model_dir),
        "kind": kind,
        "rank": rank,
        "recall_target": recall,
        **({"epochs": epochs} if kind == "trained" else {}),
        "perplexity_exact": held["perplexity_exact"],
        "perplexity_predicted": held["perplexity_predicted"],
        "perplexity_ratio": held["perplexity_ratio"],
        "calibration_windows": int(calib.shape[0]),
        "held_out_windows": int(held_out.shape[0]),
        "seq_len": seq_len,
        "sites": [
            {
                "site": p.site,
                "cut": p.cut,
                "recall": p.recall,
                "precision": p.precision,
                "predicted_sparsity": p.predicted_sparsity,
                "true_sparsity": p.true_sparsity,
                "speedup": p.speedup,
            }
            for p in predictors
        ],
        "exact_sites": held["exact_sites"],
        "held_out_sites": held["sites"],
    }


__all__ = ["approximate_mode_report", "run_predictors_job"]
