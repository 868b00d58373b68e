"""Where approximate mode pays: each site's predicted FFN op timed against its exact sparse op
on the model's own FFN inputs, one token at a time (decoding), on the machine at hand.

A predictor pays where its predicted sparsity is high enough that skipping the gate's rows
outweighs computing the estimate: one token reads ``p + 3 (1 - s')`` matrices in approximate
mode and ``1 + 2 (1 - s)`` in exact mode (p the predictor's share of one matrix, s' the
predicted and s the true sparsity). The crossover depends on the machine and the widths, so it
is measured, as the exact path's dense/sparse crossover is, and :func:`predictors_that_pay`
keeps the sites where approximate mode was not slower.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..ffn import FFNSite
from .predictor import Predictor
from .quality import tapped_ffn_forwards

log = logging.getLogger(__name__)


@torch.no_grad()
def time_predictors(
    model: nn.Module,
    predictors: Sequence[Predictor],
    windows: torch.Tensor,
    sites: Sequence[FFNSite],
    *,
    tokens: int = 16,
    repeats: int = 5,
) -> list[Predictor]:
    """Each predictor with :attr:`~Predictor.speedup` measured: the median time of the site's
    exact sparse op over that of its predicted op, for one token, over ``tokens`` FFN inputs
    that the exact ``model`` gives on ``windows`` (each op called once per input, ``repeats``
    rounds after one warm-up round, the two ops interleaved).

    Args:
        model: the exact (ReLU-family) model the predictors were built for (not changed).
        predictors: one per site, in the order of ``sites``.
        windows: ``[N, T]`` int64 token ids (the calibration text).
        sites: the FFN sites of ``model``.
        tokens: FFN inputs per site (spread over the first window's positions), >= 1.
        repeats: timed rounds, >= 1.

    Returns:
        Copies of ``predictors`` with ``speedup`` set (> 1: approximate mode was faster).

    Raises:
        ValueError: the predictors are not a list of one per site in order; ``tokens`` or
            ``repeats`` not an integer >= 1; bad ``windows`` (not a non-empty ``[N, T]``
            integer tensor of ids in the vocabulary); a predictor that does not fit its site or
            was built for another gate weight.
    """
    from ..sparse_modules import predictors_for_sites, site_modules
    from .calibrate import check_token_windows
    from .gate import gate_weight

    if isinstance(predictors, Mapping) or [getattr(p, "site", None) for p in predictors] != [
        s.path for s in sites
    ]:
        raise ValueError("give one predictor per site, in a list in the order of the sites")
    for name, value in (("tokens", tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    # widths, dtype, finite values, and built for this model's gates
    predictors_for_sites(predictors, sites, gates=lambda s: gate_weight(model, s))
    check_token_windows(model, windows, "windows")
    device = next(model.parameters()).device
    inputs: list[torch.Tensor | None] = [None] * len(sites)

    def keep(i: int, x: torch.Tensor, x1: torch.Tensor) -> None:
        if inputs[i] is None:
            step = max(1, x.shape[0] // tokens)
            inputs[i] = x[::step][:tokens].clone()

    tapped_ffn_forwards(model, windows[:1], sites, 1, keep)
    timed = []
    for p, site, xs in zip(predictors, sites, inputs):
        exact = site_modules(model, site)[0][1]
        predicted = site_modules(model, site, p)[0][1]
        ms = {"exact": [], "predicted": []}
        for r in range(repeats + 1):
            for name, module in (("exact", exact), ("predicted", predicted))[:: 1 - 2 * (r % 2)]:
                start = time.perf_counter()
                for x in xs:
                    module(x[None])
                if device.type == "cuda":  # time the kernels, not their launches
                    torch.cuda.synchronize(device)
                if r:  # the first round warms up
                    ms[name].append(time.perf_counter() - start)
        speedup = statistics.median(ms["exact"]) / max(statistics.median(ms["predicted"]), 1e-12)
        timed.append(dataclasses.replace(p, speedup=speedup))
    return timed


def predictors_that_pay(predictors: Sequence[Predictor]) -> list[Predictor]:
    """The predictors whose measured :attr:`~Predictor.speedup` is at least 1, or that were
    not timed (NaN: used as given), in their order; logs (INFO) the sites that stay exact.

    Args:
        predictors: checked :class:`Predictor` records (``speedup`` a float).

    Returns:
        The subsequence of ``predictors`` that approximate mode uses.
    """
    slower = [p for p in predictors if not math.isnan(p.speedup) and p.speedup < 1.0]
    if slower:
        log.info(
            "approximate mode: %d site(s) stay exact, where their predictor measured slower "
            "than the exact op (%s)",
            len(slower),
            ", ".join(f"{p.site} {p.speedup:.2f}x" for p in slower[:3])
            + (" ..." if len(slower) > 3 else ""),
        )
    return [p for p in predictors if p not in slower]
