"""Building predictors on calibration text: per FFN site, the factors and the cut that reaches a
target recall of the truly active neurons (Deja Vu, arXiv 2310.17157, Sec. 4; SVDP,
arXiv 2603.14110; ProSparse Sec. 4 and its appendix on approximate acceleration)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ffn import FFNSite
from ..sparse_modules import check_relu_family
from .gate import gate_fingerprint, gate_weight
from .predictor import KINDS, Predictor, low_rank_estimate
from .quality import measure_predictors, tapped_ffn_forwards
from .svd import check_rank, svd_factors
from .trained import TrainingConfig, train_factors

SAMPLES_PER_LAYER = 1 << 21  # values of the estimate kept per layer for the cut's quantile


def cut_for_recall(values: torch.Tensor, recall: float) -> float:
    """The largest float32 cut such that at least ``recall`` of ``values`` are above it.

    With ``n`` values, ``keep = ceil(recall * n)`` must be ``> cut``: the cut is the float32
    just below the ``(n - keep + 1)``-th smallest value (so ties at that value are all kept).

    Args:
        values: the estimates of the truly active (token, neuron) pairs, any shape, finite.
        recall: in ``(0, 1]``.

    Raises:
        ValueError: ``values`` is empty or has a non-finite value, or ``recall`` is out of range.
    """
    recall = check_recall(recall)
    v = values.detach().float().flatten().cpu()
    if v.numel() == 0 or not bool(v.isfinite().all()):
        raise ValueError("cut_for_recall needs at least one value, all of them finite")
    keep = min(v.numel(), math.ceil(recall * v.numel()))
    lowest_kept = v.kthvalue(v.numel() - keep + 1).values
    return float(torch.nextafter(lowest_kept, torch.tensor(-math.inf)))


def check_token_windows(model: nn.Module, windows: torch.Tensor, name: str) -> None:
    """Refuse ``windows`` unless it is a non-empty ``[N, T]`` integer tensor of ids in the
    vocabulary of ``model``.

    Raises:
        ValueError: naming ``name`` and the problem (dims, emptiness, dtype, an id outside
            ``[0, vocab)``).
    """
    if (
        not isinstance(windows, torch.Tensor)
        or windows.dim() != 2
        or windows.numel() == 0
        or windows.is_floating_point()
        or windows.is_complex()
        or windows.dtype == torch.bool
    ):
        shown = (
            f"{windows.dtype} of shape {list(windows.shape)}"
            if isinstance(windows, torch.Tensor)
            else type(windows).__name__
        )
        raise ValueError(f"{name} must be a non-empty [N, T] tensor of token ids, got {shown}")
    vocab = model.get_input_embeddings().num_embeddings
    if int(windows.min()) < 0 or int(windows.max()) >= vocab:
        raise ValueError(
            f"{name} holds token ids outside [0, {vocab}), the model's vocabulary: "
            "tokenize the text with the model's own tokenizer"
        )


def check_recall(recall: float) -> float:
    """Validate a target recall; return it as a float.

    Raises:
        ValueError: not a number in ``(0, 1]`` (NaN included).
    """
    try:
        value = float(recall)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {recall!r}")
    return value


def check_predictable(sites: Sequence[FFNSite]) -> None:
    """Raise unless a predictor can be built for every site.

    Raises:
        ValueError: no sites, a site is an expert of a mixture-of-experts layer, or a gated
            FFN with biases (neither supported yet: the predicted op references take no gated
            biases).
        NotSparseError: a site's activation is not ReLU/FATReLU/dReLU (relufy_ first).
    """
    if not sites:
        raise ValueError("no FFN sites given: pass the model's sites (find_ffn_sites)")
    experts = [s.path for s in sites if s.expert is not None]
    if experts:
        raise ValueError(
            f"{len(experts)} site(s) are experts of a mixture-of-experts layer ({experts[0]}, "
            "...): activation predictors for mixture-of-experts experts are not supported yet"
        )
    biased = [s.path for s in sites if s.kind == "gated" and s.bias]
    if biased:
        raise ValueError(
            f"{len(biased)} gated FFN site(s) have biases ({biased[0]}, ...): predictors for "
            "gated FFNs with biases are not supported yet (the predicted op would drop them)"
        )
    check_relu_family(sites)


class _Reservoir:
    """A uniform random sample of at most ``cap`` values from a stream (bottom-k by random key)."""

    def __init__(self, cap: int, gen: torch.Generator) -> None:
        self.cap, self.gen = cap, gen
        self.values = torch.empty(0)
        self.keys = torch.empty(0)

    def add(self, values: torch.Tensor) -> None:
        keys = torch.rand(values.numel(), generator=self.gen)
        self.values = torch.cat([self.values, values])
        self.keys = torch.cat([self.keys, keys])
        if self.values.numel() > self.cap:
            self.keys, idx = self.keys.topk(self.cap, largest=False)
            self.values = self.values[idx]


def _trained(
    model: nn.Module,
    windows: torch.Tensor,
    sites: Sequence[FFNSite],
    batch_size: int,
    start: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    recall: float,
    training: TrainingConfig | None,
    seed: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The trained kind's factors: collect each site's x and active mask, then fit per site."""
    xs: list[list[torch.Tensor]] = [[] for _ in sites]
    masks: list[list[torch.Tensor]] = [[] for _ in sites]

    def collect(i: int, x: torch.Tensor, x1: torch.Tensor) -> None:
        xs[i].append(x.cpu())
        masks[i].append((x1 != 0).cpu())

    tapped_ffn_forwards(model, windows, sites, batch_size, collect)
    factors = []
    for i, (s, (a, b, bias)) in enumerate(zip(sites, start)):
        x, active = torch.cat(xs[i]), torch.cat(masks[i])
        xs[i], masks[i] = [], []  # free as we go
        if not bool(active.any()):
            raise ValueError(
                f"{s.path}: no neuron was active on the {len(windows)} calibration windows (x1 "
                "is all zeros), so there is nothing to train on; use more windows or a lower "
                "FATReLU threshold"
            )
        factors.append(
            train_factors(x, active, a, b, bias, recall=recall, config=training, seed=seed + i)
        )
    return factors


@torch.no_grad()
def build_predictors(
    model: nn.Module,
    calib_windows: torch.Tensor,
    sites: Sequence[FFNSite],
    *,
    kind: str = "svd",
    rank: int,
    recall: float = 0.99,
    batch_size: int = 4,
    seed: int = 0,
    training: TrainingConfig | None = None,
) -> list[Predictor]:
    """One activation predictor per FFN site, its cut calibrated to a target recall.

    Two passes over ``calib_windows`` with taps on each site's FFN input x and x1 (three for
    the trained kind, whose first pass collects x and the active masks to train on). The first
    collects the estimate of every truly active (token, neuron) pair (x1 != 0: the gate is at
    or above the FATReLU threshold, and for dReLU up > 0), at most :data:`SAMPLES_PER_LAYER`
    per layer (a uniform sample drawn with ``seed``), and sets the cut to the quantile that
    keeps ``recall`` of them (:func:`cut_for_recall`). The second counts, over all pairs, the
    recall, precision and sparsities that the predictor reaches on those windows.

    Args:
        model: a ReLU/FATReLU/dReLU causal LM (:func:`prosparse_fx.relufy_`); left in its
            training mode.
        calib_windows: ``[N, T]`` int64 token windows (not the evaluation text).
        sites: the FFN sites of ``model``.
        kind: ``"svd"``: the training-free truncated SVD of the gate weight (SVDP);
            ``"trained"``: Deja Vu's low-rank classifier trained from the SVD factors on the
            active masks of ``calib_windows`` (:func:`~prosparse_fx.predictors.train_factors`).
        rank: rank of the estimate, ``1 <= rank <= min(d, d_ff)`` for every site.
        recall: target fraction of the truly active pairs predicted active, in ``(0, 1]``.
        batch_size: windows per forward.
        seed: seed of the subsample that the cut is taken from, and of the training.
        training: how the trained kind is fitted (default :class:`TrainingConfig`); ignored
            for the SVD kind.

    Returns:
        One :class:`Predictor` per site, in the order of ``sites``; its tensors in the dtype and
        on the device of the gate weight.

    Raises:
        ValueError: unknown ``kind``; ``recall`` or ``rank`` out of range; no sites, or an
            expert of a mixture-of-experts layer (not supported yet); ``calib_windows`` not a
            non-empty 2-D integer tensor, or with ids outside the vocabulary; a site with no
            active neuron, or a non-finite estimate, on the calibration windows.
        NotSparseError: a site's activation is SiLU/GELU: relufy_ the model first.
    """
    if kind not in KINDS:
        raise ValueError(f"predictor kind must be one of {', '.join(KINDS)}, got {kind!r}")
    recall = check_recall(recall)
    check_predictable(sites)
    for s in sites:
        check_rank(rank, s.hidden_size, s.intermediate_size)
    check_token_windows(model, calib_windows, "calib_windows")
    gates = [gate_weight(model, s) for s in sites]
    factors = [(*svd_factors(w, rank), bias) for w, bias in gates]
    if kind == "trained":
        factors = _trained(model, calib_windows, sites, batch_size, factors, recall, training, seed)
    gen = torch.Generator().manual_seed(seed)
    samples = [_Reservoir(SAMPLES_PER_LAYER, gen) for _ in sites]

    def estimate_of(i: int, x: torch.Tensor) -> torch.Tensor:
        return low_rank_estimate(x, *factors[i])

    def collect(i: int, x: torch.Tensor, x1: torch.Tensor) -> None:
        samples[i].add(estimate_of(i, x).float()[x1 != 0].cpu())

    tapped_ffn_forwards(model, calib_windows, sites, batch_size, collect)
    cuts = []
    for s, sample in zip(sites, samples):
        if sample.values.numel() == 0:
            raise ValueError(
                f"{s.path}: no neuron was active on the {len(calib_windows)} calibration "
                "windows (x1 is all zeros), so no cut can reach a recall; use more windows or a "
                "lower FATReLU threshold"
            )
        if not bool(sample.values.isfinite().all()):
            raise ValueError(
                f"{s.path}: the estimate is not finite on the calibration windows (the model's "
                "activations or weights hold NaN or infinity)"
            )
        cuts.append(cut_for_recall(sample.values, recall))

    built = [
        Predictor(
            site=s.path,
            kind=kind,
            rank=rank,
            a=a,
            b=b,
            cut=cut,
            bias=None if bias is None else bias.clone(),
            gate_sha256=gate_fingerprint(*gate),
        )
        for s, (a, b, bias), cut, gate in zip(sites, factors, cuts, gates)
    ]
    quality = measure_predictors(model, built, calib_windows, sites, batch_size=batch_size)
    return [
        dataclasses.replace(
            p,
            recall=q.recall,
            precision=q.precision,
            predicted_sparsity=q.predicted_sparsity,
            true_sparsity=q.true_sparsity,
        )
        for p, q in zip(built, quality)
    ]
