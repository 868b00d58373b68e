"""Activation threshold shifting (ProSparse Sec. 3.3, Table 9): FATReLU thresholds for all
layers at once, per layer calibrated to a target sparsity, and the threshold sweep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .activations import check_threshold
from .ffn import FFNSite
from .measure import Evaluation, evaluate
from .relufy import relufy_
from .taps import run_tapped

_SAMPLES_PER_LAYER = 1 << 21


def shift_thresholds_(
    model: nn.Module, thresholds: float | Sequence[float], sites: Sequence[FFNSite]
) -> list[FFNSite]:
    """Set the FATReLU threshold of every FFN site (one float, or one per site), in place.

    Equivalent to ``relufy_(model, "fatrelu", thresholds, sites=sites)``; for dReLU sites
    (TurboSparse) ``relufy_(model, "drelu", ...)``, which shifts the gate's threshold and keeps
    the ReLU on up.

    Raises:
        ValueError: ``sites`` mix dReLU and other activations (shift them in two calls), or what
            :func:`~prosparse_fx.relufy_` raises.
    """
    drelu = {s.activation == "drelu" for s in sites}
    if drelu == {True, False}:
        raise ValueError(
            "shift_thresholds_: the sites mix dReLU and other activations; shift the dReLU "
            "sites and the others in two calls, so that no dReLU site loses its up ReLU"
        )
    return relufy_(model, "drelu" if drelu == {True} else "fatrelu", thresholds, sites=sites)


def _activation_paths(sites: Sequence[FFNSite]) -> list[str]:
    missing = [s.path for s in sites if s.activation_module is None]
    if missing:
        raise ValueError(
            f"sites {missing} have no activation module to observe; relufy_ the model first"
        )
    return [s.activation_module or "" for s in sites]


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    windows: torch.Tensor,
    target_sparsity: float,
    sites: Sequence[FFNSite],
    *,
    batch_size: int = 4,
    seed: int = 0,
    per_layer: bool = True,
) -> list[float]:
    """Per-layer FATReLU thresholds that reach ``target_sparsity`` on calibration text.

    x1 is zero where the gate pre-activation is below t, so layer l's threshold is the
    ``target_sparsity`` quantile of its gate pre-activations on the calibration windows, clipped
    at 0 (a layer already sparser than the target with ReLU keeps t = 0). Lower layers are
    denser (paper Sec. 4.4), so they get larger thresholds. For dReLU sites x1 is also zero
    where up is <= 0, so the target is the gate's sparsity and x1 ends up sparser.

    Args:
        model: a ReLU/FATReLU model (see :func:`prosparse_fx.relufy_`).
        windows: ``[N, T]`` int64 calibration token windows (not the evaluation text).
        target_sparsity: in [0, 1).
        sites: FFN sites of ``model``.
        batch_size: windows per forward.
        seed: seed of the subsample drawn from each layer (at most 2M values per layer).
        per_layer: ``False``: one threshold for all layers, the ``target_sparsity`` quantile of
            all layers' gate pre-activations pooled (each layer sampled alike), so the layers
            keep their own sparsities and the model as a whole reaches the target. On SmolLM2
            this beats equal per-layer sparsity at equal overall sparsity (README, the quality
            frontier).

    Returns:
        One threshold >= 0 per site (all equal when ``per_layer`` is ``False``).

    Raises:
        ValueError: ``target_sparsity`` outside [0, 1), or a site without an activation module.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity!r}")
    paths = _activation_paths(sites)
    gen = torch.Generator().manual_seed(seed)
    samples: list[list[torch.Tensor]] = [[] for _ in sites]

    def record(i: int, pre: torch.Tensor) -> None:
        flat = pre.detach().float().flatten().cpu()
        if flat.numel() > _SAMPLES_PER_LAYER // 8:
            idx = torch.randint(0, flat.numel(), (_SAMPLES_PER_LAYER // 8,), generator=gen)
            flat = flat[idx]
        samples[i].append(flat)

    run_tapped(model, windows, paths, record, batch_size)

    def quantile(v: torch.Tensor) -> float:
        k = min(max(int(round(target_sparsity * v.numel())), 1), v.numel())
        return max(float(v.kthvalue(k).values), 0.0)

    if not per_layer:
        return [quantile(torch.cat([torch.cat(v) for v in samples]))] * len(sites)
    return [quantile(torch.cat(values)) for values in samples]


def _evaluate_at(
    model: nn.Module,
    windows: torch.Tensor,
    thresholds: float | Sequence[float],
    sites: Sequence[FFNSite],
    batch_size: int,
) -> Evaluation:
    """Perplexity and sparsity of ``model`` on ``windows`` with its FFN thresholds set to
    ``thresholds``; the sites' own thresholds are restored afterwards, also on error."""
    original = [s.threshold or 0.0 for s in sites]
    try:
        current = shift_thresholds_(model, thresholds, sites)
        return evaluate(model, windows, sites=current, batch_size=batch_size)
    finally:
        shift_thresholds_(model, original, sites)


def threshold_sweep(
    model: nn.Module,
    windows: torch.Tensor,
    thresholds: Sequence[float],
    sites: Sequence[FFNSite],
    *,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Sparsity and perplexity of the model at each global FATReLU threshold (paper Table 9).

    The model's thresholds are restored afterwards.

    Args:
        model: a ReLU/FATReLU causal LM.
        windows: ``[N, T]`` int64 token windows to measure on.
        thresholds: values of t >= 0 to try.
        sites: FFN sites of ``model``.

    Returns:
        ``[{"threshold": t, "sparsity": s, "perplexity": p, "per_layer_sparsity": [...]}, ...]``.
    """
    rows = []
    for t in thresholds:
        ev = _evaluate_at(model, windows, check_threshold(t), sites, batch_size)
        rows.append(
            {
                "threshold": float(t),
                "sparsity": ev.sparsity.sparsity,
                "perplexity": ev.perplexity,
                "per_layer_sparsity": ev.sparsity.per_layer,
            }
        )
    return rows


def calibrate_to_budget(
    model: nn.Module,
    windows: torch.Tensor,
    budget: float,
    sites: Sequence[FFNSite],
    *,
    batch_size: int = 4,
    iterations: int = 6,
    per_layer: bool = False,
) -> dict[str, Any]:
    """Per-layer FATReLU thresholds for the highest sparsity whose perplexity on calibration
    text stays within ``budget`` times the unshifted model's (a quality budget instead of a
    fixed t, which fits one model and not another: ProSparse Sec. 3.3 tunes t per model).

    For a target sparsity s, the threshold is the s-quantile of the gate pre-activations of all
    layers pooled (one t per model), or with ``per_layer`` of each layer's own
    (:func:`calibrate_thresholds`); s is found by bisection between the model's own sparsity
    (t = 0) and 0.99, ``iterations`` evaluations of ``windows``. The model is left unshifted.

    Args:
        model: a ReLU/FATReLU causal LM.
        windows: ``[N, T]`` int64 calibration windows (not the evaluation text).
        budget: allowed perplexity ratio over the unshifted model, >= 1 (e.g. 1.05: 5% worse).
        sites: FFN sites of ``model``.
        batch_size: windows per forward.
        iterations: bisection steps (each one evaluation of ``windows``).
        per_layer: one threshold per layer at equal sparsity instead of one per model (measured
            worse on SmolLM2 at equal overall sparsity: README, the quality frontier).

    Returns:
        ``{"thresholds": [...], "target_sparsity": s, "calib_perplexity": p,
        "calib_sparsity": q, "unshifted_perplexity": p0, "budget": budget, "tried": [...]}``;
        ``thresholds`` are all 0 when no target above the model's own sparsity fits.

    Raises:
        ValueError: ``budget`` < 1 or not finite, or ``iterations`` < 1.
    """
    if not (budget >= 1.0 and budget < float("inf")):
        raise ValueError(f"the perplexity budget must be a finite ratio >= 1, got {budget!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    base = evaluate(model, windows, sites=sites, batch_size=batch_size)
    best = {
        "thresholds": [s.threshold or 0.0 for s in sites],
        "target_sparsity": base.sparsity.sparsity,
        "calib_perplexity": base.perplexity,
        "calib_sparsity": base.sparsity.sparsity,
    }
    tried = []
    lo, hi = base.sparsity.sparsity, 0.99
    for _ in range(iterations):
        target = (lo + hi) / 2
        thresholds = calibrate_thresholds(
            model, windows, target, sites, batch_size=batch_size, per_layer=per_layer
        )
        ev = _evaluate_at(model, windows, thresholds, sites, batch_size)
        fits = ev.perplexity <= budget * base.perplexity
        tried.append(
            {
                "target_sparsity": target,
                "sparsity": ev.sparsity.sparsity,
                "perplexity": ev.perplexity,
                "fits": fits,
            }
        )
        if fits:
            lo = target
            best = {
                "thresholds": thresholds,
                "target_sparsity": target,
                "calib_perplexity": ev.perplexity,
                "calib_sparsity": ev.sparsity.sparsity,
            }
        else:
            hi = target
    return {
        **best,
        "unshifted_perplexity": base.perplexity,
        "budget": budget,
        "tried": tried,
    }
