"""Training-free peers: activation sparsity applied to an unmodified SiLU/GELU model, as baselines
for ProSparse (which trains the model to be sparse).

* **CATS** (Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity in Large
  Language Models", arXiv 2404.08763): per FFN layer a threshold ``t_l`` on ``|act(gate)|``
  (``act`` is the model's own SiLU/GELU), the ``target_sparsity`` quantile of ``|act(gate)|`` on
  calibration text; where ``|act(gate)| < t_l`` the activation is set to 0, so
  ``x1 = act(gate) * up`` is 0 there. For a plain FFN (``fc2(act(fc1(x)))``) ``x1 = act(fc1)``.
* **TEAL-style** (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models",
  arXiv 2408.14690), restricted to the FFN's x1 (the down_proj input; TEAL also sparsifies the
  inputs of the attention projections and of gate/up, which is not done here): per layer a
  threshold on ``|x1|``, the ``target_sparsity`` quantile on calibration text; where
  ``|x1| < t_l`` x1 is set to 0 before down_proj.

Neither changes a weight. Both are forward hooks (CATS: on the activation module's output; TEAL:
a forward pre-hook on down_proj, placed before every other pre-hook), so
:func:`prosparse_fx.measure.evaluate`, which taps the down_proj input, measures the zeros they
make: its reported sparsity of x1 is the true one. :func:`remove_peers_` takes them off again.

**Eager only.** These are comparison baselines, not an export path. What the other paths do with
a model carrying peer hooks (tested in ``tests/test_peers.py``):

* :func:`prosparse_fx.sparsify_ffn_` refuses it (:class:`PeerHooksError`): the sparse modules
  would replace the hooked modules and drop the peer;
* :func:`prosparse_fx.export_onnx` with ``sparse=True`` refuses it; a dense export
  (``sparse=False``) traces the hooks (torch.export runs them) and computes the peer;
* the ``prosparse`` torch.compile backend: Dynamo traces the hooks, so the compiled model
  computes the peer; the FFNs whose x1 they change no longer match as sites, so they are
  compiled dense, and an ``activation=`` substitution is refused (``UncoveredFFNError``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from .ffn import FFNSite, check_no_unknown, find_ffn_sites, resolve_module

PeerMethod = Literal["cats", "teal"]
PEER_METHODS: tuple[str, ...] = ("cats", "teal")

# values kept per layer and forward for the quantile (a random subsample beyond this)
_SAMPLES_PER_FORWARD = 1 << 18


class PeerHooksError(ValueError):
    """A model carries training-free peer hooks where they cannot be kept (a second
    :func:`apply_cats_` / :func:`apply_teal_`, or a path that would drop them)."""


class _PeerHook:
    """The zeroing hook of one FFN site: ``where(|x| < threshold, 0, x)``.

    CATS registers it as a forward hook on the activation module (``x`` is the output), TEAL as
    a forward pre-hook on down_proj (``x`` is the first input).
    """

    def __init__(self, method: str, threshold: float, site: str) -> None:
        self.method = method
        self.threshold = float(threshold)
        self.site = site

    def _zero(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(x.abs() < self.threshold, 0.0)

    def __call__(self, module: nn.Module, args: tuple, *output: torch.Tensor):  # noqa: ANN204
        if output:  # forward hook: (module, args, output)
            return self._zero(output[0])
        return (self._zero(args[0]), *args[1:])  # forward pre-hook: (module, args)


def sparsify_below(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with the entries of magnitude below ``threshold`` set to 0 (what both peers do to
    their tensor; ``threshold = 0`` changes nothing). Same shape and dtype as ``x``."""
    return x.masked_fill(x.abs() < threshold, 0.0)


def quantile_threshold(values: torch.Tensor, target_sparsity: float) -> float:
    """The threshold ``t`` below which a ``target_sparsity`` fraction of ``|values|`` lies.

    With ``|values|`` sorted ascending as ``v_0 <= ... <= v_{n-1}`` and
    ``k = round(target_sparsity * n)``: ``t = v_k``, so exactly the ``k`` smallest entries
    satisfy ``|v| < t`` when there are no ties (fewer with ties at ``v_k``); ``t = 0`` for
    ``k = 0`` (nothing is zeroed), and the float32 number after ``v_{n-1}`` for ``k = n``.

    Args:
        values: any float tensor with at least one element (flattened; magnitudes are used).
        target_sparsity: in [0, 1).

    Returns:
        ``t >= 0`` as a Python float.

    Raises:
        ValueError: ``values`` is empty, or ``target_sparsity`` outside [0, 1).
    """
    check_target(target_sparsity)
    v = values.detach().flatten().float().abs()
    if v.numel() == 0:
        raise ValueError("no values to take a quantile of (the layer saw no tokens)")
    k = min(int(round(target_sparsity * v.numel())), v.numel())
    if k == 0:
        return 0.0
    if k == v.numel():
        top = v.max()
        return float(torch.nextafter(top, torch.full_like(top, math.inf)))  # float32's next
    return float(v.kthvalue(k + 1).values)


def check_target(target_sparsity: float) -> float:
    """Return ``target_sparsity`` as a float if it is a number in [0, 1).

    Raises:
        ValueError: not a number, NaN, or outside [0, 1).
    """
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)):
        raise ValueError(f"target sparsity must be a number in [0, 1), got {target_sparsity!r}")
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity!r}")
    return float(target_sparsity)


def _check_windows(windows: torch.Tensor) -> None:
    if (
        not isinstance(windows, torch.Tensor)
        or windows.dim() != 2
        or windows.shape[0] == 0
        or windows.shape[1] == 0
        or windows.dtype not in (torch.int64, torch.int32)
    ):
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows)
        raise ValueError(
            f"calibration windows must be an integer tensor of token ids [N, T] with N, T >= 1, "
            f"got {shape}"
        )


def _check_method(method: str) -> None:
    if method not in PEER_METHODS:
        raise ValueError(f"unknown peer method {method!r}; choose one of {', '.join(PEER_METHODS)}")


def _targets(model: nn.Module, method: str, sites: Sequence[FFNSite]) -> list[nn.Module]:
    """The module each site's hook goes on (CATS: the activation module; TEAL: down_proj),
    after checking the sites can carry a peer."""
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no FFN sites: there is no x1 for a training-free peer "
            "to sparsify"
        )
    check_no_unknown(list(sites))
    experts = [s.path for s in sites if s.expert is not None]
    if experts:
        raise ValueError(
            f"{len(experts)} FFN site(s) are experts of a mixture-of-experts layer "
            f"({', '.join(experts[:2])}{' ...' if len(experts) > 2 else ''}); the training-free "
            "peers hook modules, and an expert's down_proj is a slice of a 3-D parameter"
        )
    if method == "cats":
        functional = [s.path for s in sites if s.activation_module is None]
        if functional:
            raise ValueError(
                f"CATS thresholds the activation's output, but {len(functional)} FFN site(s) "
                f"compute it as a function call with no module to hook ({', '.join(functional)})"
            )
        paths = [s.activation_module or "" for s in sites]
    else:
        paths = [s.down for s in sites]
    modules = [resolve_module(model, p) for p in paths]
    shared = {id(m) for m in modules}
    if len(shared) != len(modules):
        raise ValueError(
            f"some FFN sites share one {'activation module' if method == 'cats' else 'down_proj'}"
            f" ({', '.join(paths)}); per-layer thresholds need one module per site"
        )
    return modules


@contextmanager
def _observe(
    modules: Sequence[nn.Module], output: bool, fn: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``fn(i, x)`` with the output (``output``) or first input of ``modules[i]``."""
    handles = []
    try:
        for i, module in enumerate(modules):
            if output:
                handles.append(module.register_forward_hook(lambda _m, _a, out, _i=i: fn(_i, out)))
            else:
                handles.append(module.register_forward_pre_hook(lambda _m, a, _i=i: fn(_i, a[0])))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_peer(
    model: nn.Module,
    method: PeerMethod,
    calib_windows: torch.Tensor,
    target_sparsity: float,
    sites: Sequence[FFNSite] | None = None,
    *,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """Per-layer thresholds of a training-free peer for ``target_sparsity``, without applying
    them (:func:`apply_cats_` / :func:`apply_teal_` calibrate and apply).

    Layer l's threshold is :func:`quantile_threshold` of the magnitudes the peer thresholds
    (CATS: ``|act(gate)|``; TEAL: ``|x1|``) over all tokens of ``calib_windows``; beyond
    2^18 values per layer and forward a random subsample (``seed``) stands for them.

    Args:
        model: a causal LM whose forward takes ``input_ids`` (any dtype; quantiles in float32).
        method: ``"cats"`` or ``"teal"``.
        calib_windows: ``[N, T]`` int64 token ids (calibration text, not the evaluation text).
        target_sparsity: in [0, 1).
        sites: FFN sites of ``model`` (found by capture when ``None``).
        batch_size: windows per forward.
        seed: seed of the subsample.

    Returns:
        One threshold ``t >= 0`` per site, in site order.

    Raises:
        ValueError: unknown ``method``; ``target_sparsity`` outside [0, 1); bad windows; no FFN
            sites; a site with an unknown activation, a mixture-of-experts expert, (CATS) a
            functional activation, or modules shared between sites.
        PeerHooksError: the model already carries peer hooks (:func:`remove_peers_` first).
    """
    _check_method(method)
    check_target(target_sparsity)
    _check_windows(calib_windows)
    check_no_peers(model, "calibrating a peer on top of them would measure their zeros")
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    modules = _targets(model, method, sites)
    gen = torch.Generator().manual_seed(seed)
    samples: list[list[torch.Tensor]] = [[] for _ in sites]

    def record(i: int, x: torch.Tensor) -> None:
        flat = x.detach().flatten().float().abs().cpu()
        if flat.numel() > _SAMPLES_PER_FORWARD:
            flat = flat[torch.randint(0, flat.numel(), (_SAMPLES_PER_FORWARD,), generator=gen)]
        samples[i].append(flat)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with _observe(modules, method == "cats", record):
            for batch in calib_windows.split(batch_size):
                model(input_ids=batch.to(device))
    finally:
        model.train(was_training)
    return [
        quantile_threshold(torch.cat(v) if v else torch.empty(0), target_sparsity) for v in samples
    ]


def install_peer_(
    model: nn.Module,
    method: PeerMethod,
    thresholds: float | Sequence[float],
    sites: Sequence[FFNSite] | None = None,
) -> list[float]:
    """Put a training-free peer with given thresholds on ``model``, in place (no calibration).

    CATS: a forward hook on each site's activation module sets outputs with
    ``|act(gate)| < t_l`` to 0. TEAL: a forward pre-hook on each site's down_proj, run before
    every other pre-hook (so taps such as :func:`prosparse_fx.evaluate`'s see its zeros), sets
    ``|x1| < t_l`` to 0. Same shapes and dtypes as without the hooks. Undo with
    :func:`remove_peers_`.

    Args:
        model: the model; its weights are not changed.
        method: ``"cats"`` or ``"teal"``.
        thresholds: ``t >= 0``, one float or one per site.
        sites: FFN sites of ``model`` (found by capture when ``None``).

    Returns:
        The thresholds, one per site.

    Raises:
        ValueError: unknown ``method``, a negative/non-finite threshold or the wrong number of
            them, or sites that cannot carry a peer (see :func:`calibrate_peer`).
        PeerHooksError: the model already carries peer hooks.
    """
    _check_method(method)
    check_no_peers(model, f"a {method} peer cannot be installed on top of them")
    sites = list(sites) if sites is not None else find_ffn_sites(model)
    modules = _targets(model, method, sites)
    ts = [thresholds] * len(sites) if isinstance(thresholds, (int, float)) else list(thresholds)
    if len(ts) != len(sites):
        raise ValueError(f"got {len(ts)} thresholds for {len(sites)} FFN sites; give one per site")
    for t in ts:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"peer thresholds must be finite numbers >= 0, got {t!r}")
    for site, module, t in zip(sites, modules, ts):
        hook = _PeerHook(method, t, site.path)
        if method == "cats":
            module.register_forward_hook(hook, prepend=True)
        else:
            module.register_forward_pre_hook(hook, prepend=True)
    return [float(t) for t in ts]


def apply_cats_(
    model: nn.Module,
    calib_windows: torch.Tensor,
    target_sparsity: float,
    sites: Sequence[FFNSite] | None = None,
    *,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """CATS (Lee et al. 2024, arXiv 2404.08763), training-free, in place: per layer, zero the
    activation output where ``|act(gate)| < t_l``, with ``t_l`` the ``target_sparsity``
    quantile of ``|act(gate)|`` on ``calib_windows``.

    Eager only (a comparison baseline, not an export path). Undo with :func:`remove_peers_`.
    See :func:`calibrate_peer` for the arguments and errors and :func:`install_peer_` for the
    hooks.

    Returns:
        The per-layer thresholds, one per site.
    """
    ts = calibrate_peer(
        model, "cats", calib_windows, target_sparsity, sites, batch_size=batch_size, seed=seed
    )
    return install_peer_(model, "cats", ts, sites)


def apply_teal_(
    model: nn.Module,
    calib_windows: torch.Tensor,
    target_sparsity: float,
    sites: Sequence[FFNSite] | None = None,
    *,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """TEAL-style magnitude sparsity of x1 (Liu et al. 2024, arXiv 2408.14690, restricted to
    the down_proj input), training-free, in place: per layer, zero x1 where ``|x1| < t_l``, with
    ``t_l`` the ``target_sparsity`` quantile of ``|x1|`` on ``calib_windows``.

    Eager only (a comparison baseline, not an export path). Undo with :func:`remove_peers_`.
    See :func:`calibrate_peer` for the arguments and errors and :func:`install_peer_` for the
    hooks.

    Returns:
        The per-layer thresholds, one per site.
    """
    ts = calibrate_peer(
        model, "teal", calib_windows, target_sparsity, sites, batch_size=batch_size, seed=seed
    )
    return install_peer_(model, "teal", ts, sites)


def _peer_entries(model: nn.Module) -> Iterator[tuple[str, dict, int, _PeerHook]]:
    for path, module in model.named_modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, _PeerHook):
                    yield path, hooks, key, hook


def peer_hooks(model: nn.Module) -> list[dict[str, object]]:
    """The training-free peer hooks on ``model``: ``[{"module", "site", "method",
    "threshold"}, ...]`` in module order (empty when there are none)."""
    return [
        {"module": path, "site": h.site, "method": h.method, "threshold": h.threshold}
        for path, _, _, h in _peer_entries(model)
    ]


def remove_peers_(model: nn.Module) -> int:
    """Remove every training-free peer hook from ``model`` (also from a deep copy of a model
    that had them), in place; the model then computes exactly what it did before.

    Returns:
        The number of hooks removed (0 when there were none).
    """
    entries = list(_peer_entries(model))
    for _, hooks, key, _ in entries:
        del hooks[key]
    return len(entries)


def check_no_peers(model: nn.Module, what: str) -> None:
    """Raise :class:`PeerHooksError` when ``model`` carries training-free peer hooks.

    Args:
        model: the model to check.
        what: why they are in the way, for the message (e.g. ``"the sparse-FFN rewrite would
            drop them"``).
    """
    found = peer_hooks(model)
    if found:
        methods = sorted({str(h["method"]) for h in found})
        raise PeerHooksError(
            f"{type(model).__name__} carries {len(found)} training-free peer hook(s) "
            f"({', '.join(methods)}, e.g. on {found[0]['module']}): {what}. The peers are "
            "eager-only comparison baselines; call prosparse_fx.peers.remove_peers_(model) first"
        )
