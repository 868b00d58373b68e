"""Closed-form reconstruction of each FFN's down_proj for an activation change (issue 14).

Swapping SiLU/GELU for ReLU (ProSparse Sec. 3.1) drops the negative part of ``act(gate)``, and
every layer's FFN output moves: SmolLM2-135M goes from perplexity 23.4 to 4888 before any
training, and most of a short run is spent winning that back. Shifting ReLU to FATReLU_t (Sec.
3.3) moves it again. Before the change, :func:`fit_down_proj` measures, on calibration tokens run
through the model as it is, what each FFN's down_proj receives after the change
(``x1_new = FATReLU_t(gate(x)) * up(x)``, t = 0 for ReLU; dReLU: ``* ReLU(up(x))``; plain:
``FATReLU_t(fc1(x))``) and what it should give (today's output without down's bias,
``y = x1_old W_down^T``), and solves per site the ridge least-squares problem

    W' = argmin_W  mean_tokens ||x1_new W^T - y||^2 + lam ||W - W_down||^2,
    lam = ridge * mean(diag(A)),   A = mean_tokens x1_new^T x1_new,

that is ``W'^T = (A + lam I)^-1 (B + lam W_down^T)`` with ``B = mean_tokens x1_new^T y``. The
inputs are the unchanged model's (teacher forcing: one forward pass for all layers). After
:func:`~prosparse_fx.relufy_`, :meth:`DownProjRefit.apply_` writes ``W'`` into each down_proj;
gate and up, biases included, are not changed. This is the layer-wise reconstruction of
post-training pruning (OBS/SparseGPT's least-squares view) applied to the activation swap; the
ProSparse paper does not use it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .activations import fatrelu
from .ffn import FFNSite, resolve_module
from .predictors.calibrate import check_token_windows
from .relufy import thresholds_per_site
from .sparse_modules import linear_weight
from .taps import run_tapped

RefitActivation = Literal["relu", "drelu"]


@dataclasses.dataclass
class SiteRefit:
    """The reconstruction of one site's down_proj.

    Attributes:
        path: the site's module path.
        weight: ``[d, d_ff]`` float32 on the CPU, the new down_proj weight (``nn.Linear``
            layout).
        error_before: ``mean ||x1_new W_down^T - y||^2 / mean ||y||^2`` on the calibration
            tokens: the relative error of the swap alone.
        error_after: the same with ``W'``.
    """

    path: str
    weight: torch.Tensor
    error_before: float
    error_after: float


@dataclasses.dataclass
class DownProjRefit:
    """What :func:`fit_down_proj` measured and solved; :meth:`apply_` writes it."""

    sites: list[SiteRefit]
    tokens: int
    ridge: float
    seconds: float
    activation: RefitActivation = "relu"
    thresholds: list[float] = dataclasses.field(default_factory=list)

    def apply_(self, model: nn.Module, sites: Sequence[FFNSite]) -> None:
        """Write each new down_proj weight into ``model`` (the model :func:`fit_down_proj`
        measured, after :func:`~prosparse_fx.relufy_`), in its dtype and on its device.

        Raises:
            ValueError: ``sites`` are not the fitted ones, a weight's shape differs, or a site
                does not compute the activation and threshold the refit was fitted for (apply
                it after ``relufy_`` with the same ones).
        """
        paths = [s.path for s in sites]
        if paths != [r.path for r in self.sites]:
            raise ValueError(
                f"the refit is for sites {[r.path for r in self.sites][:3]}..., not "
                f"{paths[:3]}...; apply it to the model it was fitted on"
            )
        kinds = ("drelu",) if self.activation == "drelu" else ("relu", "fatrelu")
        for site, t in zip(sites, self.thresholds):
            if site.activation not in kinds or (site.threshold or 0.0) != t:
                raise ValueError(
                    f"{site.path} computes {site.activation} at t = {site.threshold}, and the "
                    f"refit is for {self.activation} at t = {t:g}; apply it after relufy_ with "
                    "the activation and threshold it was fitted for"
                )
        for site, refit in zip(sites, self.sites):
            weight, _ = linear_weight(resolve_module(model, site.down))
            if weight.shape != refit.weight.shape:
                raise ValueError(
                    f"{site.down}: weight {tuple(weight.shape)}, refit "
                    f"{tuple(refit.weight.shape)}; apply it to the model it was fitted on"
                )
            with torch.no_grad():
                weight.copy_(refit.weight.to(weight.device, weight.dtype))

    def to_dict(self) -> dict:
        """The report's record: tokens, ridge, seconds, and per site the two errors."""
        return {
            "tokens": self.tokens,
            "ridge": self.ridge,
            "seconds": self.seconds,
            "per_layer": [
                {"path": r.path, "error_before": r.error_before, "error_after": r.error_after}
                for r in self.sites
            ],
        }


def check_refit_sites(
    sites: Sequence[FFNSite],
    activation: RefitActivation = "relu",
    threshold: float | Sequence[float] = 0.0,
) -> None:
    """Refuse sites :func:`fit_down_proj` cannot reconstruct, naming them and the way out.

    Raises:
        ValueError: a mixture-of-experts expert (its down_proj is a slice of a 3-D parameter,
            and its tokens are routed), an activation that is a function call (no module to
            compute today's ``act(gate)``), an FFN that computes the new activation already
            (ReLU-family with the same threshold: nothing changes), or a dReLU FFN refitted for
            ReLU.
    """
    problems = []
    ts = thresholds_per_site(threshold, len(sites))
    for s, t in zip(sites, ts):
        if s.expert is not None:
            problems.append(f"{s.path} expert {s.expert}: a mixture-of-experts expert")
        elif s.activation_module is None:
            problems.append(f"{s.path}: its activation is a function call")
        elif s.up_relu and activation != "drelu":
            problems.append(f"{s.path}: it is dReLU; refit it with activation 'drelu'")
        elif s.activation in ("relu", "fatrelu", "drelu") and (s.threshold or 0.0) == t:
            problems.append(f"{s.path}: it computes {s.activation} at t = {t:g} already")
    if problems:
        raise ValueError(
            "cannot reconstruct down_proj for the ReLU substitution at "
            f"{len(problems)} site(s): {'; '.join(problems[:3])}"
            f"{' ...' if len(problems) > 3 else ''}. Set refit_windows = 0 (train without it)"
        )


def fit_down_proj(
    model: nn.Module,
    sites: Sequence[FFNSite],
    windows: torch.Tensor,
    *,
    activation: RefitActivation = "relu",
    threshold: float | Sequence[float] = 0.0,
    ridge: float = 1e-2,
    batch_size: int = 4,
    memory_bytes: int = 2 << 30,
) -> DownProjRefit:
    """Solve each site's down_proj for the model after its activation becomes ``activation``
    with FATReLU ``threshold`` on the gate (see the module docstring). ``model`` is the model
    before the change (SiLU/GELU before the swap, ReLU before the threshold shift) and is not
    changed.

    Args:
        model: the model before the change.
        sites: its FFN sites (:func:`~prosparse_fx.find_ffn_sites`), gated or plain.
        windows: ``[N, T]`` int64 token ids (training text, not held-out text).
        activation: ``"relu"`` (FATReLU_t on the gate) or ``"drelu"`` (gated sites only: also
            ReLU on up), what the FFNs compute after the change.
        threshold: the FATReLU t >= 0 after the change, one or one per site (0: ReLU).
        ridge: the ridge weight relative to the mean diagonal of ``A``; > 0 (a neuron that
            ReLU never fires keeps its weights).
        batch_size: windows per forward.
        memory_bytes: the statistics (float32, ``d_ff^2 + d_ff d`` per site) of at most this
            many bytes are gathered in one pass; more sites take more passes.

    Returns:
        The new weights and the relative errors before and after, per site.

    Raises:
        ValueError: sites :func:`check_refit_sites` refuses, ``"drelu"`` with a plain site, an
            unknown ``activation``, a bad threshold, a ridge that is not positive and finite,
            no tokens, or a solution that is not finite.
    """
    ts = thresholds_per_site(threshold, len(sites))
    check_refit_sites(sites, activation, ts)
    if activation not in ("relu", "drelu"):
        raise ValueError(f"activation must be 'relu' or 'drelu', got {activation!r}")
    if activation == "drelu" and any(s.kind != "gated" for s in sites):
        raise ValueError("dReLU puts a ReLU on up_proj, and plain FFNs have none; use 'relu'")
    finite_ridge = isinstance(ridge, (int, float)) and 0 < ridge < float("inf")
    if isinstance(ridge, bool) or not finite_ridge:
        raise ValueError(f"ridge must be a finite number > 0, got {ridge!r}")
    check_token_windows(model, windows, "windows")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device (no weights); load its weights first")
    started = time.time()
    results: list[SiteRefit] = []
    for group in _groups(list(zip(sites, ts)), memory_bytes):
        stats = [_Stats(model, s, activation, t) for s, t in group]
        with torch.no_grad():
            run_tapped(
                model,
                windows,
                [s.up for s, _ in group],
                lambda i, x, stats=stats: stats[i].add(x),
                batch_size,
            )
        results.extend(st.solve(ridge) for st in stats)
    return DownProjRefit(
        results,
        int(windows.numel()),
        float(ridge),
        round(time.time() - started, 3),
        activation,
        ts,
    )


def _groups(
    sites: Sequence[tuple[FFNSite, float]], memory_bytes: int
) -> list[list[tuple[FFNSite, float]]]:
    """Consecutive sites whose statistics fit in ``memory_bytes`` together (one each at least)."""
    groups: list[list[tuple[FFNSite, float]]] = [[]]
    used = 0
    for s, t in sites:
        need = 4 * (s.intermediate_size**2 + s.intermediate_size * s.hidden_size)
        if groups[-1] and used + need > memory_bytes:
            groups.append([])
            used = 0
        groups[-1].append((s, t))
        used += need
    return groups


class _Stats:
    """Running sums of one site: ``A = sum x1_new^T x1_new``, ``B = sum x1_new^T y``,
    ``sum ||y||^2`` and the count of tokens (float32, on the model's device)."""

    def __init__(
        self, model: nn.Module, site: FFNSite, activation: RefitActivation, threshold: float
    ) -> None:
        self.site = site
        self.up_relu = activation == "drelu"
        self.threshold = threshold
        self.act = resolve_module(model, site.activation_module or "")
        self.up_w, self.up_b = linear_weight(resolve_module(model, site.up))
        self.gate_w, self.gate_b = (
            linear_weight(resolve_module(model, site.gate)) if site.gate else (None, None)
        )
        self.down_w, _ = linear_weight(resolve_module(model, site.down))
        d_ff, d = site.intermediate_size, site.hidden_size
        if tuple(self.down_w.shape) != (d, d_ff):
            raise ValueError(
                f"{site.down}: weight {tuple(self.down_w.shape)}, and the site says d = {d}, "
                f"d_ff = {d_ff}; were the sites found on a different model?"
            )
        # one precision for every product (a bf16 model with an fp32 linear mixes dtypes)
        self.up_w, self.down_w = self.up_w.float(), self.down_w.float()
        self.up_b = None if self.up_b is None else self.up_b.float()
        if self.gate_w is not None:
            self.gate_w = self.gate_w.float()
            self.gate_b = None if self.gate_b is None else self.gate_b.float()
        device = self.down_w.device
        self.a = torch.zeros(d_ff, d_ff, device=device)
        self.b = torch.zeros(d_ff, d, device=device)
        self.y2 = 0.0
        self.n = 0

    def _pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gate pre-activation (fc1's output for a plain site) and up's output."""
        s = self.site
        if s.kind == "plain":
            return F.linear(x, self.up_w, self.up_b), None
        if s.gate_up_split is not None:  # one fused linear: gate rows, then up rows
            both = F.linear(x, self.up_w, self.up_b)
            (g0, u0), n = s.gate_up_split, s.intermediate_size
            return both[..., g0 : g0 + n], both[..., u0 : u0 + n]
        return F.linear(x, self.gate_w, self.gate_b), F.linear(x, self.up_w, self.up_b)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        g, u = self._pre(x)
        new_g = fatrelu(g, self.threshold)
        if u is None:
            old, new = self.act(g), new_g
        else:  # a dReLU site's up linear applies its ReLU itself: not seen by F.linear
            old = self.act(g).float() * (torch.relu(u) if self.site.up_relu else u)
            new = new_g * (torch.relu(u) if self.up_relu else u)
        y = F.linear(old.float(), self.down_w)
        new = new.float()
        self.a += new.T @ new
        self.b += new.T @ y
        self.y2 += float((y.double() * y.double()).sum())
        self.n += new.shape[0]

    def solve(self, ridge: float) -> SiteRefit:
        w0 = self.down_w.detach().double().cpu()  # [d, d_ff]
        a = self.a.double().cpu() / max(self.n, 1)
        b = self.b.double().cpu() / max(self.n, 1)
        y2 = self.y2 / max(self.n, 1)
        if not (math.isfinite(y2) and bool(torch.isfinite(a).all() and torch.isfinite(b).all())):
            raise ValueError(
                f"{self.site.down}: the FFN's outputs overflow float32 on these windows; set "
                "refit_windows = 0"
            )
        lam = ridge * float(a.diagonal().mean())
        if lam <= 0:  # ReLU never fired on these tokens: keep the weights
            lam = ridge
        eye = torch.eye(a.shape[0], dtype=a.dtype)
        w_t = torch.linalg.solve(a + lam * eye, b + lam * w0.T)  # [d_ff, d]
        if not bool(torch.isfinite(w_t).all()):
            raise ValueError(
                f"{self.site.down}: the reconstructed weight is not finite (NaN or inf in the "
                "FFN's inputs or weights); set refit_windows = 0"
            )

        def error(w: torch.Tensor) -> float:  # mean ||x1 w - y||^2 / mean ||y||^2, float32 sums
            sq = (w.T @ a @ w).trace() - 2 * (w.T @ b).trace() + y2
            return max(float(sq / y2), 0.0) if y2 > 0 else 0.0

        return SiteRefit(self.site.path, w_t.T.float().contiguous(), error(w0.T), error(w_t))
