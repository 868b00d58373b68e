"""Eager sparse-FFN rewrite for ``nn.Module`` users: ``sparsify_ffn_`` swaps each
ReLU/FATReLU/dReLU FFN for a module that calls ``torch.ops.prosparse.sparse_gated_ffn`` /
``sparse_plain_ffn``, so ``generate()`` runs on the sparse kernels (ProSparse App. D;
TurboSparse Sec. 3 for dReLU); with predictors, FFNs call ``predicted_gated_ffn`` /
``predicted_plain_ffn`` (approximate mode)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import kernels  # noqa: F401  (registers the ops)
from .ffn import FFNSite, find_ffn_sites, resolve_module
from .peers import check_no_peers


class NotSparseError(ValueError):
    """An FFN's activation has no exact zeros (SiLU/GELU): relufy and train it first."""


class UnsupportedFFNError(NotSparseError):
    """An FFN the sparse-FFN ops cannot compute exactly (a gated FFN with biases, an expert of a
    mixture-of-experts layer); the message names the site, the feature and the way out."""


def sparse_rewrite_refusal(site: FFNSite) -> str | None:
    """Why the sparse-FFN ops cannot compute ``site`` exactly, or ``None`` when they can.

    The one precondition of every sparse rewrite (eager :func:`sparsify_ffn_`, the graph pass,
    the compile backend, the ONNX export), besides a ReLU-family activation.
    """
    if site.expert is not None:
        return (
            "an expert of a mixture-of-experts layer (the sparse ops compute one dense FFN; "
            "token routing is not rewritten)"
        )
    if site.kind == "gated" and site.bias:
        return "a gated FFN with biases (mlp_bias=True; the gated sparse op has no bias inputs)"
    return None


def check_sparse_rewritable(sites: Sequence[FFNSite]) -> None:
    """Raise unless the sparse-FFN ops compute every site exactly.

    Raises:
        NotSparseError: a site's activation is SiLU/GELU (relufy and train first).
        UnsupportedFFNError: a site has a feature the ops lack (see
            :func:`sparse_rewrite_refusal`); the message lists the sites and the way out.
    """
    check_relu_family(sites)
    bad = [(s, r) for s in sites if (r := sparse_rewrite_refusal(s)) is not None]
    if bad:
        listing = "; ".join(f"{s.path}: {r}" for s, r in bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise UnsupportedFFNError(
            f"{len(bad)} FFN site(s) cannot be rewritten to the sparse-FFN ops exactly: {listing}. "
            "Run these models with dense FFNs: the relufied model computes the same function "
            "(compile backend: options sparse_ffn=False; ONNX: export_onnx(..., sparse=False) / "
            "--dense; eager: do not call sparsify_ffn_)."
        )


def check_relu_family(sites: Sequence[FFNSite]) -> None:
    """Raise :class:`NotSparseError` listing the sites whose activation is not
    ReLU/FATReLU/dReLU."""
    bad = [s for s in sites if not s.is_relu_family]
    if bad:
        raise NotSparseError(
            f"{len(bad)} FFN site(s) have activation {sorted({s.activation for s in bad})}, whose "
            f"zeros are not exact ({', '.join(s.path for s in bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}). Relufy the model (prosparse_fx.relufy_) and "
            "train it (prosparse-fx sparsify) first."
        )


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D``."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return weight, module.bias
    if type(module).__name__ == "Conv1D":  # weight is [in, out]
        return weight.T, getattr(module, "bias", None)
    raise TypeError(f"cannot read a linear weight from {type(module).__name__}")


class SparseGatedFFN(nn.Module):
    """A gated FFN computed by ``prosparse::sparse_gated_ffn``.

    Holds ``w_gate``/``w_up`` (the original parameters) and ``w_down_t`` (``[d_ff, d]``, the
    transpose of down_proj.weight, made once; the original down weight is dropped).

    Args:
        gate, up, down: the FFN's linears (``gate is up`` for a fused gate_up linear).
        threshold: FATReLU t >= 0 of the gate.
        gate_up_split: for a fused gate_up linear, the first row of the gate's and of the up's
            part of its weight (:attr:`FFNSite.gate_up_split`), each d_ff rows.
        up_relu: dReLU (TurboSparse Sec. 3): ReLU on the up projection too.

    Raises:
        UnsupportedFFNError: a linear has a bias.
    """

    def __init__(
        self,
        gate: nn.Module,
        up: nn.Module,
        down: nn.Module,
        threshold: float,
        gate_up_split: tuple[int, int] | None = None,
        up_relu: bool = False,
    ) -> None:
        super().__init__()
        self.up_relu = bool(up_relu)
        w_gate, b_gate = linear_weight(gate)
        w_up, b_up = linear_weight(up)
        w_down, b_down = linear_weight(down)
        if any(b is not None for b in (b_gate, b_up, b_down)):
            raise UnsupportedFFNError("gated FFNs with biases are not supported by the sparse op")
        if gate_up_split is not None:
            d_ff = w_down.shape[1]
            w_gate = w_gate[gate_up_split[0] : gate_up_split[0] + d_ff]
            w_up = w_up[gate_up_split[1] : gate_up_split[1] + d_ff]
        self.w_gate = nn.Parameter(w_gate.detach().contiguous(), requires_grad=False)
        self.w_up = nn.Parameter(w_up.detach().contiguous(), requires_grad=False)
        self.w_down_t = nn.Parameter(w_down.detach().T.contiguous(), requires_grad=False)
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.prosparse.sparse_gated_ffn(
            x, self.w_gate, self.w_up, self.w_down_t, self.threshold, self.up_relu
        )

    def extra_repr(self) -> str:
        d_ff, d = self.w_gate.shape
        drelu = ", up_relu=True (dReLU)" if self.up_relu else ""
        return f"d={d}, d_ff={d_ff}, threshold={self.threshold:g}{drelu}"


class PredictedGatedFFN(SparseGatedFFN):
    """A gated FFN in approximate mode, computed by ``prosparse::predicted_gated_ffn``: a
    low-rank predictor guesses each token's active neurons, and gate, up and down are read on
    those rows only (Deja Vu; ProSparse Sec. 4). FATReLU still applies on them, so a neuron the
    predictor misses is the only approximation.

    Holds the FFN's weights as :class:`SparseGatedFFN` does, and the predictor's factors ``a``
    ``[rank, d]`` and ``b`` ``[d_ff, rank]`` (buffers, in the predictor's dtype) and its ``cut``.

    Args:
        gate, up, down, threshold, gate_up_split, up_relu: as for :class:`SparseGatedFFN`.
        predictor: the site's :class:`~prosparse_fx.predictors.Predictor` (without bias).

    Raises:
        UnsupportedFFNError: a linear has a bias.
        ValueError: the predictor is malformed or its widths differ from the FFN's
            (:func:`~prosparse_fx.predictors.check_predictor`), or it has a bias.
    """

    def __init__(
        self,
        gate: nn.Module,
        up: nn.Module,
        down: nn.Module,
        threshold: float,
        predictor: Any,
        gate_up_split: tuple[int, int] | None = None,
        up_relu: bool = False,
    ) -> None:
        super().__init__(gate, up, down, threshold, gate_up_split, up_relu)
        if predictor.bias is not None:
            raise ValueError(
                f"the predictor of {predictor.site} has a bias, which the gated predicted op "
                "does not take: build the gated FFN's predictors without one"
            )
        _keep_predictor(self, predictor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.prosparse.predicted_gated_ffn(
            x,
            self.a,
            self.b,
            self.cut,
            self.w_gate,
            self.w_up,
            self.w_down_t,
            self.threshold,
            self.up_relu,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, predictor rank={self.rank}, cut={self.cut:g}"


class SparsePlainFFN(nn.Module):
    """A plain FFN ``FATReLU_t(x @ w1.T + b1) @ w2_t + b2`` computed by
    ``prosparse::sparse_plain_ffn``; replaces fc2, while fc1 and the activation become identities.
    """

    def __init__(self, fc1: nn.Module, fc2: nn.Module, threshold: float) -> None:
        super().__init__()
        w1, b1 = linear_weight(fc1)
        w2, b2 = linear_weight(fc2)
        self.w1 = nn.Parameter(w1.detach().contiguous(), requires_grad=False)
        self.b1 = None if b1 is None else nn.Parameter(b1.detach(), requires_grad=False)
        self.w2_t = nn.Parameter(w2.detach().T.contiguous(), requires_grad=False)
        self.b2 = None if b2 is None else nn.Parameter(b2.detach(), requires_grad=False)
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.prosparse.sparse_plain_ffn(
            x, self.w1, self.b1, self.w2_t, self.b2, self.threshold
        )


class PredictedPlainFFN(SparsePlainFFN):
    """A plain FFN in approximate mode, computed by ``prosparse::predicted_plain_ffn``: the
    twin of :class:`PredictedGatedFFN` for ``fc2(FATReLU_t(fc1(x)))``; replaces fc2, while fc1
    and the activation become identities.

    Holds the FFN's weights as :class:`SparsePlainFFN` does, and the predictor's factors ``a``
    ``[rank, d]``, ``b`` ``[d_ff, rank]`` and bias ``pred_bias`` ``[d_ff]`` or ``None``
    (buffers, in the predictor's dtype) and its ``cut``.

    Raises:
        ValueError: the predictor is malformed or its widths differ from the FFN's
            (:func:`~prosparse_fx.predictors.check_predictor`).
    """

    def __init__(self, fc1: nn.Module, fc2: nn.Module, threshold: float, predictor: Any) -> None:
        super().__init__(fc1, fc2, threshold)
        _keep_predictor(self, predictor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.prosparse.predicted_plain_ffn(
            x, self.a, self.b, self.pred_bias, self.cut,
            self.w1, self.b1, self.w2_t, self.b2, self.threshold,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"predictor rank={self.rank}, cut={self.cut:g}"


def _keep_predictor(module: nn.Module, predictor: Any) -> None:
    """Check ``predictor`` against the FFN's widths and hold its tensors as buffers of
    ``module`` (``a``, ``b``, ``pred_bias``), with its ``cut`` and ``rank``."""
    from .predictors.predictor import check_predictor

    w = module.w_gate if hasattr(module, "w_gate") else module.w1
    check_predictor(predictor, w.shape[1], w.shape[0])
    module.register_buffer("a", predictor.a.detach().contiguous())
    module.register_buffer("b", predictor.b.detach().contiguous())
    bias = predictor.bias
    module.register_buffer("pred_bias", None if bias is None else bias.detach().contiguous())
    module.cut = float(predictor.cut)
    module.rank = int(predictor.rank)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _leaf(path: str, base: str) -> str:
    return path[len(base) + 1 :] if path.startswith(base + ".") else path


def predictors_for_sites(
    predictors: Any,
    sites: Sequence[FFNSite],
    *,
    partial: bool = False,
    gates: Callable[[FFNSite], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> dict[str, Any]:
    """``predictors`` (a sequence of :class:`~prosparse_fx.predictors.Predictor` or a mapping
    from site path to one) keyed by site path, each checked against its site.

    Args:
        predictors: the predictors, or ``None`` (none).
        sites: the FFN sites they are for.
        partial: return only those of ``sites`` (a graph holds some of the model's sites)
            instead of refusing predictors for other paths.
        gates: ``site -> (weight [d_ff, d], bias or None)``, the gate each returned predictor
            must have been built for (:func:`~prosparse_fx.predictors.check_gate`); ``None``
            checks widths only.

    Raises:
        TypeError: an item is not a ``Predictor``.
        ValueError: a mapping key that is not its predictor's site, two predictors for one
            site, a malformed predictor or one of other widths
            (:func:`~prosparse_fx.predictors.check_predictor`), a gated site's predictor with a
            bias, one built for another gate weight (another model of the same widths), or
            (unless ``partial``) a predictor for a path that is not a site.
    """
    from .predictors.gate import check_gate
    from .predictors.predictor import Predictor, check_predictor

    if predictors is None:
        return {}
    pairs = list(predictors.items()) if isinstance(predictors, Mapping) else None
    items = [p for _, p in pairs] if pairs is not None else list(predictors)
    for p in items:
        if not isinstance(p, Predictor):
            raise TypeError(f"predictors must be Predictor records, got {type(p).__name__}")
    if pairs is not None and any(key != p.site for key, p in pairs):
        bad = next(key for key, p in pairs if key != p.site)
        raise ValueError(f"predictors[{bad!r}] is the predictor of {predictors[bad].site!r}")
    by_site = {p.site: p for p in items}
    if len(by_site) != len(items):
        raise ValueError("two predictors for one FFN site; give one per site")
    for p in items:
        check_predictor(p)
    known = {s.path: s for s in sites}
    unknown = sorted(set(by_site) - set(known))
    if unknown and not partial:
        raise ValueError(
            f"predictors for {unknown[:3]}, which are not FFN sites of this model (its sites: "
            f"{list(known)[:3]} ...): build the predictors for this model"
        )
    found = {path: p for path, p in by_site.items() if path in known}
    for p in found.values():
        check_predictor(p, known[p.site].hidden_size, known[p.site].intermediate_size)
        if known[p.site].kind == "gated" and p.bias is not None:
            raise ValueError(
                f"the predictor of {p.site} has a bias, which the gated predicted op does not "
                "take: build the gated FFN's predictors without one"
            )
        if gates is not None:
            check_gate(p, *gates(known[p.site]))
    return found


def sparsify_ffn_(
    model: nn.Module,
    *,
    sites: Sequence[FFNSite] | None = None,
    example_inputs: Any = None,
    predictors: Any = None,
    only_faster: bool = True,
) -> list[FFNSite]:
    """Rewrite every ReLU/FATReLU/dReLU FFN of ``model`` to the sparse-FFN ops, in place.

    Gated FFNs: the FFN module (``site.path``, whose children must be exactly gate/up/down and
    the activation) becomes a :class:`SparseGatedFFN`, or with a predictor for it a
    :class:`PredictedGatedFFN` (approximate mode). Plain FFNs: fc2 becomes a
    :class:`SparsePlainFFN` (with a predictor a :class:`PredictedPlainFFN`), fc1 and the
    activation become ``nn.Identity``. The rewritten model
    is for inference (``generate()`` works); save the model before rewriting it.

    Args:
        model: a relufied (and trained) model.
        sites: its FFN sites (found by capture when ``None``).
        example_inputs: inputs for the capture when ``sites`` is ``None``.
        predictors: ``None`` (exact mode), or :class:`~prosparse_fx.predictors.Predictor` s (a
            sequence, or a mapping from site path) for some or all sites, as
            :func:`~prosparse_fx.predictors.build_predictors` or
            :func:`~prosparse_fx.predictors.load_predictors` give them; sites without one stay
            exact.
        only_faster: keep a site exact where its predictor measured slower than the exact
            op (:attr:`~prosparse_fx.predictors.Predictor.speedup` below 1, set by
            :func:`~prosparse_fx.predictors.time_predictors` and ``prosparse-fx predictors``;
            logged); ``False`` uses every predictor given.

    Returns:
        The sites that were rewritten.

    Raises:
        NotSparseError: a site's activation is SiLU/GELU (relufy and train first).
        UnsupportedFFNError: a gated FFN with biases, or a mixture-of-experts expert.
        PeerHooksError: the model carries training-free peer hooks (:mod:`prosparse_fx.peers`),
            which the rewritten modules would drop.
        ValueError: a site whose module layout cannot be swapped, a predictor for a path that
            is not a site, of other widths or built for another gate weight (nothing is
            changed).
    """
    check_no_peers(model, "the sparse-FFN rewrite replaces the modules they hook")
    sites = list(sites) if sites is not None else find_ffn_sites(model, example_inputs)
    check_sparse_rewritable(sites)
    from .predictors.gate import gate_weight
    from .predictors.speed import predictors_that_pay

    by_site = predictors_for_sites(predictors, sites, gates=lambda s: gate_weight(model, s))
    if only_faster:
        by_site = {p.site: p for p in predictors_that_pay(list(by_site.values()))}
    plans = [site_modules(model, site, by_site.get(site.path)) for site in sites]
    for plan in plans:
        for path, module in plan:
            _set(model, path, module.to(next(model.parameters()).device))
    return sites


def site_modules(
    model: nn.Module, site: FFNSite, predictor: Any = None
) -> list[tuple[str, nn.Module]]:
    """The modules that compute ``site`` of ``model`` on the sparse-FFN ops, as ``(path,
    module)`` to set in ``model``; the first computes the FFN. Gated: the FFN module's
    replacement (a :class:`SparseGatedFFN`, or with ``predictor`` a
    :class:`PredictedGatedFFN`). Plain: fc2's (:class:`SparsePlainFFN` /
    :class:`PredictedPlainFFN`, taking fc1's input), then ``nn.Identity`` for fc1 and the
    activation. ``model`` is not changed.

    Raises:
        ValueError: the activation is a function call, or a gated FFN module has other
            children than its linears and activation (its forward may do more than the FFN).
        UnsupportedFFNError: a gated FFN with biases.
    """
    if site.activation_module is None:
        raise ValueError(f"{site.path}: the activation is a function call; cannot rewrite")
    t = site.threshold or 0.0
    if site.kind == "gated":
        ffn = resolve_module(model, site.path)
        expected = {
            _leaf(p, site.path) for p in (site.gate, site.up, site.down, site.activation_module)
        }
        children = {name for name, _ in ffn.named_children()}
        if children != expected:
            raise ValueError(
                f"{site.path} has children {sorted(children)}, expected exactly "
                f"{sorted(expected)}; its forward may do more than the FFN"
            )
        linears = [resolve_module(model, p) for p in (site.gate or "", site.up, site.down)]
        module: nn.Module = (
            PredictedGatedFFN(*linears, t, predictor, site.gate_up_split, site.up_relu)
            if predictor is not None
            else SparseGatedFFN(*linears, t, site.gate_up_split, site.up_relu)
        )
        return [(site.path, module)]
    fc1, fc2 = resolve_module(model, site.up), resolve_module(model, site.down)
    module = (
        PredictedPlainFFN(fc1, fc2, t, predictor)
        if predictor is not None
        else SparsePlainFFN(fc1, fc2, t)
    )
    return [
        (site.down, module),
        (site.up, nn.Identity()),
        (site.activation_module, nn.Identity()),
    ]
