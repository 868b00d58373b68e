"""The trained predictor kind: Deja Vu's low-rank classifier (Liu et al. 2023,
arXiv 2310.17157, Sec. 4.1), ``d -> rank -> d_ff`` with no nonlinearity between the two
linears, trained per FFN site with a binary cross-entropy on which neurons were active (x1 != 0)
for the tokens of the calibration text.

The factors keep the layout of the SVD kind (``a`` ``[rank, d]``, ``b`` ``[d_ff, rank]``), so
both kinds run through the same op and files; only the units of the estimate differ (a logit
here, the gate pre-activation there), and the cut is calibrated to the target recall afterwards
either way. Training starts from the SVD factors (the training-free predictor), and the factors
kept are those of the epoch with the highest predicted sparsity at the target recall on a
held-back tenth of the tokens, the start included: on those tokens the trained kind is never
worse than the SVD kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .predictor import low_rank_estimate


@dataclass(frozen=True)
class TrainingConfig:
    """How the trained kind is fitted (per FFN site).

    Attributes:
        epochs: passes over the calibration tokens (>= 1).
        batch_tokens: tokens per optimiser step (>= 1).
        lr: Adam learning rate (> 0).
        pos_weight: weight of an active neuron's term in the loss, relative to an inactive
            one's; ``None`` balances them (the ratio of inactive to active pairs), which favours
            recall at the high sparsity of a ProSparse model.
        holdout: fraction of the tokens held back to choose the epoch, in ``(0, 1)``.
    """

    epochs: int = 12
    batch_tokens: int = 512
    lr: float = 2e-3
    pos_weight: float | None = None
    holdout: float = 0.1

    def __post_init__(self) -> None:
        ints = {"epochs": self.epochs, "batch_tokens": self.batch_tokens}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingConfig.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainingConfig.lr must be a finite number > 0, got {self.lr!r}")
        if self.pos_weight is not None and not (
            isinstance(self.pos_weight, (int, float))
            and math.isfinite(self.pos_weight)
            and self.pos_weight > 0
        ):
            raise ValueError(
                f"TrainingConfig.pos_weight must be None or a finite number > 0, got "
                f"{self.pos_weight!r}"
            )
        if not (isinstance(self.holdout, float) and 0.0 < self.holdout < 1.0):
            raise ValueError(f"TrainingConfig.holdout must be in (0, 1), got {self.holdout!r}")


def sparsity_at_recall(estimate: torch.Tensor, active: torch.Tensor, recall: float) -> float:
    """Fraction of (token, neuron) pairs predicted inactive when the cut keeps ``recall`` of the
    truly active pairs (the quantity the trained kind maximises; 0.0 with no active pair).

    Args:
        estimate: ``[N, d_ff]`` float estimate; active: ``[N, d_ff]`` bool; recall in (0, 1].
    """
    from .calibrate import cut_for_recall

    positives = estimate[active]
    if positives.numel() == 0:
        return 0.0
    cut = cut_for_recall(positives, recall)
    return float((estimate <= cut).float().mean())


def train_factors(
    x: torch.Tensor,
    active: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    recall: float,
    config: TrainingConfig | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one site's factors to its active masks (Deja Vu, arXiv 2310.17157, Sec. 4.1).

    Minimises ``BCEWithLogits(x @ a.T @ b.T + bias + c, active)`` (with ``config.pos_weight``)
    by Adam in float32 from the given factors; ``c`` is a scalar offset used in training only (a
    shift of every logit is absorbed by the cut calibrated afterwards).

    Args:
        x: ``[N, d]`` FFN inputs of the calibration tokens (any float dtype; N >= 2).
        active: ``[N, d_ff]`` bool, x1 != 0 for those tokens.
        a: ``[rank, d]``, b: ``[d_ff, rank]``: the starting factors (the SVD kind's).
        bias: ``[d_ff]`` starting bias (fc1's, for a plain FFN), trained too; or ``None`` (a
            gated FFN: the predicted op takes no bias).
        recall: the target recall the epoch is chosen at, in (0, 1].
        config: the :class:`TrainingConfig` (default: its defaults).
        seed: seed of the held-back split and the batch order.

    Returns:
        ``(a, b, bias)`` in the dtype and on the device of the given ``a`` (``bias`` ``None``
        where none was given): those of the epoch with the highest held-back predicted sparsity
        at ``recall`` (the start included).

    Raises:
        ValueError: shapes that do not fit, fewer than 2 tokens, or no active pair.
    """
    config = config or TrainingConfig()
    n, d = x.shape
    if (
        active.shape != (n, b.shape[0])
        or a.shape[1] != d
        or a.shape[0] != b.shape[1]
        or (bias is not None and bias.shape != (b.shape[0],))
    ):
        raise ValueError(
            f"train_factors: x {list(x.shape)}, active {list(active.shape)}, a "
            f"{list(a.shape)} and b {list(b.shape)} do not fit together"
        )
    if n < 2 or not bool(active.any()):
        raise ValueError(
            "train_factors needs at least 2 tokens and one active (token, neuron) pair: use "
            "more calibration windows"
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_held = max(1, round(n * config.holdout))
    held, train = order[:n_held], order[n_held:] if n > n_held else order[:n_held]
    x = x.detach().float().cpu()
    active = active.detach().cpu()
    positives = int(active[train].sum())
    pairs = active[train].numel()
    pos_weight = config.pos_weight or max(pairs - positives, 1) / max(positives, 1)
    weight = torch.tensor(float(pos_weight))
    with torch.enable_grad():
        fa = a.detach().float().cpu().clone().requires_grad_(True)
        fb = b.detach().float().cpu().clone().requires_grad_(True)
        fbias = None if bias is None else bias.detach().float().cpu().clone().requires_grad_(True)
        offset = torch.zeros((), requires_grad=True)
        params = [fa, fb, offset] + ([] if fbias is None else [fbias])
        optimiser = torch.optim.Adam(params, lr=config.lr)

        def snapshot() -> tuple[torch.Tensor, ...]:
            kept = (fa, fb) if fbias is None else (fa, fb, fbias)
            return tuple(t.detach().clone() for t in kept)

        def held_score() -> float:
            with torch.no_grad():
                est = low_rank_estimate(x[held], fa, fb, fbias)
                return sparsity_at_recall(est, active[held], recall)

        best = (held_score(), snapshot())
        for _ in range(config.epochs):
            perm = train[torch.randperm(train.numel(), generator=gen)]
            for idx in perm.split(config.batch_tokens):
                logits = low_rank_estimate(x[idx], fa, fb, fbias) + offset
                loss = F.binary_cross_entropy_with_logits(
                    logits, active[idx].float(), pos_weight=weight
                )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            score = held_score()
            if score > best[0]:
                best = (score, snapshot())
    kept = [t.to(device=a.device, dtype=a.dtype) for t in best[1]]
    return kept[0], kept[1], (kept[2] if bias is not None else None)
