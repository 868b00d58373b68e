"""How well predictors guess the active neurons on a text: per FFN site, recall, precision and
predicted sparsity against the exact model's x1 (Deja Vu, arXiv 2310.17157, Sec. 4.1, measures
its predictors the same way). The taps here also feed the calibration and the training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..ffn import FFNSite
from ..taps import run_tapped
from .gate import check_gate, gate_weight
from .predictor import Predictor, predicted_mask


@dataclass(frozen=True)
class PredictorQuality:
    """What one site's predictor reached on a text, over all its (token, neuron) pairs.

    Attributes:
        site: module path of the FFN.
        recall: fraction of the truly active pairs (x1 != 0) predicted active.
        precision: fraction of the predicted pairs that are truly active.
        predicted_sparsity: fraction of pairs predicted inactive.
        true_sparsity: fraction of pairs with x1 == 0.
        tokens: tokens measured.
    """

    site: str
    recall: float
    precision: float
    predicted_sparsity: float
    true_sparsity: float
    tokens: int


def tapped_ffn_forwards(
    model: nn.Module,
    windows: torch.Tensor,
    sites: Sequence[FFNSite],
    batch_size: int,
    fn: Callable[[int, torch.Tensor, torch.Tensor], None],
) -> None:
    """Run ``windows`` (``[N, T]`` token ids) through ``model`` in eval mode (its mode is
    restored) and call ``fn(i, x, x1)`` per site ``i`` and batch, with the FFN input ``x``
    (``[tokens, d]``, tapped on the gate/fc1) and ``x1`` (``[tokens, d_ff]``, tapped on
    down_proj/fc2)."""
    n = len(sites)
    paths = [(s.gate or "") if s.kind == "gated" else s.up for s in sites]
    paths += [s.down for s in sites]
    pending: dict[int, torch.Tensor] = {}

    def seen(j: int, t: torch.Tensor) -> None:
        if j < n:
            pending[j] = t.detach()
        else:
            x = pending.pop(j - n)
            fn(j - n, x.reshape(-1, x.shape[-1]), t.detach().reshape(-1, t.shape[-1]))

    run_tapped(model, windows, paths, seen, batch_size)


@torch.no_grad()
def measure_predictors(
    model: nn.Module,
    predictors: Sequence[Predictor],
    windows: torch.Tensor,
    sites: Sequence[FFNSite],
    *,
    batch_size: int = 4,
) -> list[PredictorQuality]:
    """Per site, the recall, precision and sparsities of its predictor on ``windows``.

    The exact ``model`` runs (not approximate mode): each predictor is judged on the FFN inputs
    and x1 that the exact model gives, so a site's numbers do not include the errors of the
    sites before it.

    Args:
        model: the exact (ReLU-family) model the predictors were built for.
        predictors: one per site, in the order of ``sites``.
        windows: ``[N, T]`` int64 token ids (held-out text, to measure generalisation).
        sites: the FFN sites of ``model``.
        batch_size: windows per forward.

    Returns:
        One :class:`PredictorQuality` per site (recall and precision 0.0 where there is
        nothing to count).

    Raises:
        ValueError: the predictors are not one per site, in order, or one was built for
            another gate weight (:func:`~prosparse_fx.predictors.check_gate`).
    """
    if [p.site for p in predictors] != [s.path for s in sites]:
        raise ValueError(
            f"the predictors are for sites {[p.site for p in predictors][:3]} ..., not "
            f"{[s.path for s in sites][:3]} ...: give one per site, in order"
        )
    for p, s in zip(predictors, sites):
        check_gate(p, *gate_weight(model, s))
    counts = [[0, 0, 0, 0] for _ in sites]  # pairs, truly active, predicted, both

    def count(i: int, x: torch.Tensor, x1: torch.Tensor) -> None:
        predicted = predicted_mask(predictors[i], x)
        active = x1 != 0
        counts[i][0] += active.numel()
        counts[i][1] += int(active.sum())
        counts[i][2] += int(predicted.sum())
        counts[i][3] += int((predicted & active).sum())

    tapped_ffn_forwards(model, windows, sites, batch_size, count)
    return [
        PredictorQuality(
            site=s.path,
            recall=both / max(active, 1),
            precision=both / max(predicted, 1),
            predicted_sparsity=1.0 - predicted / max(pairs, 1),
            true_sparsity=1.0 - active / max(pairs, 1),
            tokens=pairs // max(s.intermediate_size, 1),
        )
        for s, (pairs, active, predicted, both) in zip(sites, counts)
    ]
