"""Measurement: activation sparsity of x1 per layer and overall, and perplexity
(ProSparse Sec. 4.1: sparsity is the fraction of exact zeros in the down_proj input, per token,
averaged over tokens; it depends on the data, so always name the data)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .ffn import FFNSite, find_ffn_sites
from .taps import down_paths, tap_inputs


@dataclass
class SparsityReport:
    """Activation sparsity of x1.

    Attributes:
        sparsity: mean over sites of the per-site sparsity (0..1); each expert of a
            mixture-of-experts layer is a site.
        per_layer: per FFN site, the fraction of exact zeros in x1 per token, averaged over
            the tokens that reached the site (0..1; for an expert, the tokens routed to it;
            NaN for an expert that none reached).
        tokens: number of token positions measured (a BOS that starts a window included).
        sites: module paths of the FFN sites, in the order of ``per_layer``.
    """

    sparsity: float
    per_layer: list[float]
    tokens: int
    sites: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """Held-out quality and sparsity from one pass over the same windows."""

    perplexity: float
    sparsity: SparsityReport


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    sites: Sequence[FFNSite] | None = None,
    batch_size: int = 4,
    with_loss: bool = True,
) -> Evaluation:
    """Perplexity and x1 sparsity of a model over token windows, in one pass.

    Sparsity: per token, the fraction of exact zeros in x1 (the down_proj input), averaged over
    tokens, per FFN site; overall = mean over sites. Perplexity: ``exp(mean next-token NLL)``,
    every window scored on its own, all predicted tokens weighted equally. The first token of a
    window is context only, never a target: windows that start with BOS (as
    :func:`~prosparse_fx.data.token_windows` makes them for tokenizers that add BOS) score
    every text token and never the BOS.

    Args:
        model: a causal LM whose forward takes ``input_ids`` (and ``labels`` when
            ``with_loss``).
        windows: ``[N, T]`` int64 token ids, T >= 2, no padding.
        sites: FFN sites (found by capture when ``None``).
        batch_size: windows per forward pass.
        with_loss: compute perplexity (``nan`` otherwise, e.g. for encoders).

    Raises:
        ValueError: ``windows`` is not ``[N, T]`` with N >= 1, T >= 2.
        FFNNotFoundError: the model has no FFN.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(
            f"expected token windows of shape [N, T] with N >= 1, T >= 2, got "
            f"{tuple(windows.shape)}"
        )
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    zero_sums = [0.0] * len(sites)
    site_tokens = [0] * len(sites)  # tokens that reached each site (an expert sees some)
    tokens = 0
    nll, count = 0.0, 0

    def record(i: int, x1: torch.Tensor) -> None:
        zero_sums[i] += float((x1 == 0).float().mean(-1).sum())
        site_tokens[i] += x1.shape[:-1].numel()

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with tap_inputs(model, down_paths(sites), record):
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                if with_loss:
                    loss = model(input_ids=batch, labels=batch).loss
                    n = batch.shape[0] * (batch.shape[1] - 1)
                    nll += float(loss) * n
                    count += n
                else:
                    model(input_ids=batch)
                tokens += batch.numel()
    finally:
        model.train(was_training)
    per_layer = [z / n if n else float("nan") for z, n in zip(zero_sums, site_tokens)]
    report = SparsityReport(
        sparsity=_mean(per_layer),
        per_layer=per_layer,
        tokens=tokens,
        sites=[s.path for s in sites],
    )
    ppl = math.exp(nll / count) if with_loss else float("nan")
    return Evaluation(perplexity=ppl, sparsity=report)


def _mean(values: Sequence[float]) -> float:
    """Mean over the sites that saw tokens (an expert may see none)."""
    seen = [v for v in values if not math.isnan(v)]
    return sum(seen) / len(seen) if seen else float("nan")


def measure_sparsity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    sites: Sequence[FFNSite] | None = None,
    batch_size: int = 4,
) -> SparsityReport:
    """Fraction of exact zeros in x1 (the down_proj input) per layer and overall.

    Args:
        model: a model whose forward takes ``input_ids``.
        windows: ``[N, T]`` int64 token ids, each row one window (no padding).
        sites: FFN sites (found by capture when ``None``).
        batch_size: windows per forward pass.

    Returns:
        A :class:`SparsityReport` (see :func:`evaluate` for the definition).

    Raises:
        ValueError: ``windows`` is not ``[N, T]`` with N >= 1, T >= 2.
        FFNNotFoundError: the model has no FFN.
    """
    return evaluate(model, windows, sites=sites, batch_size=batch_size, with_loss=False).sparsity


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Perplexity ``exp(mean next-token NLL)`` of a causal LM over ``[N, T]`` token windows.

    Raises:
        ValueError: ``windows`` is not ``[N, T]`` with N >= 1, T >= 2.
    """
    return evaluate(model, windows, sites=[], batch_size=batch_size).perplexity
