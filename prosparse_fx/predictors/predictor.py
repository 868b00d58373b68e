"""The activation predictor of one FFN site: which neurons a token will activate, guessed from
the FFN input before the gate is computed (Deja Vu, Liu et al. 2023, arXiv 2310.17157;
ProSparse Sec. 4 and its appendix on approximate acceleration).

A predictor maps the FFN input ``x`` to an estimate of the gate pre-activation; neuron ``j`` is
predicted active where its estimate is above the predictor's ``cut``. A sparse kernel then reads
the gate, up and down rows of the predicted neurons only, and still applies the FATReLU to them:
a neuron predicted active but truly inactive gives exactly 0, so a truly active neuron that the
predictor misses is the only approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("svd", "trained")


@dataclass(eq=False)
class Predictor:
    """The predictor of one FFN site, with the cut calibrated on text and what it measured there.

    Attributes:
        site: module path of the FFN (:attr:`prosparse_fx.ffn.FFNSite.path`).
        kind: ``"svd"`` (training-free, :func:`~prosparse_fx.predictors.svd_factors`; the
            estimate is in the units of the gate pre-activation) or ``"trained"`` (Deja Vu's
            classifier, :func:`~prosparse_fx.predictors.train_factors`; the estimate is a
            logit).
        rank: the rank r of the low-rank estimate.
        a: ``[rank, d]`` floating-point factor applied to the input first.
        b: ``[d_ff, rank]`` floating-point factor.
        cut: a neuron is predicted active where its estimate is above ``cut`` (in the units of
            the gate pre-activation; a float32 value, compared in float32).
        bias: ``[d_ff]`` added to the estimate (the gate's or fc1's bias), or ``None``.
        recall: fraction of the truly active (token, neuron) pairs predicted active, on the
            calibration windows.
        precision: fraction of the predicted (token, neuron) pairs that are truly active.
        predicted_sparsity: fraction of (token, neuron) pairs predicted inactive.
        true_sparsity: fraction of (token, neuron) pairs with x1 == 0.
        speedup: the exact sparse op's time over the predicted op's for one token on the
            calibration text, on the machine that measured it
            (:func:`~prosparse_fx.predictors.time_predictors`); NaN when not measured. Below 1,
            ``sparsify_ffn_`` and the compile backend keep the site exact (approximate mode
            does not pay there).
        gate_sha256: the fingerprint (:func:`~prosparse_fx.predictors.gate_fingerprint`) of
            the gate weight it was built for. :func:`~prosparse_fx.predictors.build_predictors`
            and :func:`~prosparse_fx.predictors.load_predictors` set it, and every use
            (``sparsify_ffn_``, the compile backend's ``predictors`` option, ``export_onnx``,
            ``save_predictors``) refuses a predictor whose fingerprint is not the model's gate
            (another model of the same widths). ``None`` for a predictor made by hand, which is
            then used unchecked.
    """

    site: str
    kind: str
    rank: int
    a: torch.Tensor
    b: torch.Tensor
    cut: float
    bias: torch.Tensor | None = None
    recall: float = math.nan
    precision: float = math.nan
    predicted_sparsity: float = math.nan
    true_sparsity: float = math.nan
    speedup: float = math.nan
    gate_sha256: str | None = None

    @property
    def d(self) -> int:
        """Width of the FFN input."""
        return self.a.shape[1]

    @property
    def d_ff(self) -> int:
        """Number of neurons (width of x1)."""
        return self.b.shape[0]


def check_predictor(
    p: Predictor,
    d: int | None = None,
    d_ff: int | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Refuse a predictor whose tensors or cut cannot be used, for an FFN of widths ``d`` and
    ``d_ff`` when they are given (else the widths its factors imply).

    Raises:
        error: (``ValueError`` by default) naming the site and the problem: a tensor that is not
            floating point, not of the factors' dtype, without data (meta device) or not of the
            shape that ``rank``, ``d`` and ``d_ff`` give (``a`` ``[rank, d]``, ``b``
            ``[d_ff, rank]``, ``bias`` ``[d_ff]``); widths other than ``d``/``d_ff``; a NaN or
            infinite cut or tensor value; a ``speedup`` that is neither NaN nor a positive
            finite number; a ``gate_sha256`` that is neither None nor a sha256 hex digest.
    """
    malformed = f"the predictor of {p.site} is malformed:"
    tensors = {"a": p.a, "b": p.b, "bias": p.bias}
    for name, t in tensors.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise error(f"{malformed} tensor {name} is {kind}, not floating point")
        if t.dtype != p.a.dtype:
            raise error(f"{malformed} tensor {name} is {t.dtype}, a is {p.a.dtype}: use one dtype")
        if t.device.type == "meta":
            raise error(f"{malformed} tensor {name} has no data (meta device)")
    if p.a.dim() != 2 or p.b.dim() != 2:
        raise error(f"{malformed} a and b must be 2-D, got {list(p.a.shape)}, {list(p.b.shape)}")
    own_d, own_d_ff = p.a.shape[1], p.b.shape[0]
    if (d, d_ff) != (None, None) and (own_d, own_d_ff) != (d or own_d, d_ff or own_d_ff):
        raise error(
            f"the predictor of {p.site} is for d={own_d}, d_ff={own_d_ff}, but the FFN has "
            f"d={d or own_d}, d_ff={d_ff or own_d_ff}: build the predictors for this model "
            "(prosparse-fx predictors)"
        )
    expected = {"a": (p.rank, own_d), "b": (own_d_ff, p.rank), "bias": (own_d_ff,)}
    for name, shape in expected.items():
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            raise error(
                f"{malformed} tensor {name} has shape {list(t.shape)}, not {list(shape)} "
                f"(rank {p.rank}, d={own_d}, d_ff={own_d_ff})"
            )
    if not math.isfinite(p.cut):
        raise error(f"the predictor of {p.site} holds a NaN or infinite cut ({p.cut!r})")
    speedup = p.speedup
    if (
        isinstance(speedup, bool)
        or not isinstance(speedup, (int, float))
        or not (math.isnan(speedup) or 0.0 < speedup < math.inf)
    ):
        raise error(
            f"{malformed} speedup {speedup!r} is not a positive finite number or NaN (not "
            "measured; time_predictors measures it)"
        )
    sha = p.gate_sha256
    if sha is not None and not (
        isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
    ):
        raise error(
            f"{malformed} gate_sha256 {sha!r} is not a sha256 hex digest (or None for a "
            "predictor made by hand)"
        )
    for name, t in tensors.items():
        if t is not None and not bool(t.isfinite().all()):
            raise error(f"the predictor of {p.site} holds NaN or infinite values in {name}")


def low_rank_estimate(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ a.T @ b.T (+ bias)``: the low-rank estimate of the gate pre-activation.

    Args:
        x: ``[..., d]`` (cast to the dtype of ``a``).
        a: ``[rank, d]``; b: ``[d_ff, rank]``; bias: ``[d_ff]`` or ``None``.

    Returns:
        ``[..., d_ff]`` in the dtype of ``a``.
    """
    return F.linear(F.linear(x.to(a.dtype), a), b, bias)


def predicted_active(estimate: torch.Tensor, cut: float) -> torch.Tensor:
    """Bool ``[..., d_ff]``: the neurons predicted active, where ``estimate > cut``.

    Compared in float32 (the precision the cut was calibrated in). A non-finite estimate (from a
    NaN or infinite input) counts as active, so that the neuron is computed and the NaN reaches
    the output as in the dense model, instead of being skipped as a silent 0.
    """
    estimate = estimate.float()
    return ~((estimate <= cut) & estimate.isfinite())


def estimate(predictor: Predictor, x: torch.Tensor) -> torch.Tensor:
    """The predictor's estimate of the gate pre-activation: ``[..., d]`` -> ``[..., d_ff]``, in
    the dtype of ``predictor.a``."""
    return low_rank_estimate(x, predictor.a, predictor.b, predictor.bias)


def predicted_mask(predictor: Predictor, x: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., d_ff]``: the neurons predicted active for each token of ``x`` (``[..., d]``);
    see :func:`predicted_active`."""
    return predicted_active(estimate(predictor, x), predictor.cut)
