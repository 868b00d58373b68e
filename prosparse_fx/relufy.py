"""Eager activation substitution for ``nn.Module`` users: ``relufy_`` swaps the activation
modules that the FFN sites point to, in place (ProSparse Sec. 3.1, and Sec. 3.3 for FATReLU), and
records the change in the Hugging Face config so that ``save_pretrained`` / ``from_pretrained``
round-trip exactly, without remote code.

The config record (written by :func:`relufy_`, applied by transformers hooks installed on import):

* when only FFN sites read it, the activation key (``hidden_act``, ``hidden_activation`` or
  ``activation_function``) becomes the activation's name, and for FATReLU and dReLU
  ``hidden_act_param = t``: the format of the published ProSparse / MiniCPM-S checkpoints,
  which plain transformers reads for ReLU;
* ``prosparse_thresholds``: ``{activation module path: t}`` per FFN site (FATReLU, dReLU);
* ``prosparse_up_relu``: the module paths whose output gets dReLU's up ReLU (TurboSparse Sec. 3):
  up linears (a fused gate_up linear) become :class:`~prosparse_fx.activations.ReLULinear`,
  mixture-of-experts experts modules compute ``act_fn(gate) * relu(up)``
  (:func:`prosparse_fx.moe.set_experts_up_relu`);
* ``prosparse_ffn_activations``: ``{activation module path: name}`` per FFN site, applied on
  load, so models that build their FFN activation without the config key (BLOOM, MPT) and models
  whose key other modules also read keep their FFN activations;
* when modules that are not FFN sites read the same key (BERT's masked-LM head transform,
  Jamba's Mamba mixer, which also keeps it as a string), the key is left as it was, so they keep
  their activation; the FFN sites get theirs from ``prosparse_ffn_activations``.

Paths drop the model's ``base_model_prefix`` (``model.layers.0.mlp.act_fn`` is stored as
``layers.0.mlp.act_fn``), so a checkpoint saved from ``LlamaForCausalLM`` also loads into
``LlamaModel``.

On ``from_pretrained`` (and ``from_config`` or plain construction), after ``import prosparse_fx``:
the FFN sites get their recorded activation (and dReLU's up ReLU); a FATReLU threshold missing
from the
weights is taken from ``prosparse_thresholds``, else from ``hidden_act_param`` (so the published
checkpoints, which ship no threshold tensor, load exactly), and neither is a ``ValueError``; a
threshold in the weights that disagrees with the config is kept, with a ``UserWarning`` naming both.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN

from .activations import ACTIVATIONS, FATReLU, ReLULinear, check_threshold, get_activation
from .ffn import REPLACEABLE, FFNSite, check_no_unknown, find_ffn_sites, resolve_module

# Config attributes that name the FFN activation in Hugging Face configs.
_ACT_CONFIG_KEYS = ("hidden_act", "hidden_activation", "activation_function")
_THRESHOLDS_KEY = "prosparse_thresholds"
_KEPT_KEY = "prosparse_kept_activations"
_FFN_KEY = "prosparse_ffn_activations"
_UP_RELU_KEY = "prosparse_up_relu"


def thresholds_per_site(threshold: float | Sequence[float], n_sites: int) -> list[float]:
    """One validated FATReLU threshold per site from a scalar or a per-layer sequence.

    A 0-dim tensor counts as one float.

    Raises:
        ValueError: a negative/non-finite threshold, a string, or a sequence of the wrong
            length.
    """
    if isinstance(threshold, torch.Tensor) and threshold.dim() == 0:
        threshold = float(threshold)
    if isinstance(threshold, str):
        raise ValueError(f"threshold must be a number or one per site, got {threshold!r}")
    if isinstance(threshold, (int, float)):
        return [check_threshold(threshold)] * n_sites
    values = [check_threshold(t) for t in threshold]
    if len(values) != n_sites:
        raise ValueError(
            f"got {len(values)} per-layer thresholds for {n_sites} FFN sites; pass one per site "
            "or a single float"
        )
    return values


def relufy_(
    model: nn.Module,
    activation: Literal["relu", "fatrelu", "drelu"] = "relu",
    threshold: float | Sequence[float] = 0.0,
    *,
    sites: Sequence[FFNSite] | None = None,
    example_inputs: Any = None,
) -> list[FFNSite]:
    """Replace the FFN activation (SiLU/GELU/GELU-tanh/ReLU/FATReLU/dReLU) by ReLU, FATReLU or
    dReLU, in place.

    ReLU and FATReLU change only the activation of each FFN: for gated FFNs the gate's
    activation (up_proj stays linear; a dReLU site's up ReLU is removed), for plain FFNs the
    activation between fc1 and fc2. dReLU (TurboSparse, Song et al. 2024, Sec. 3) also puts a
    ReLU on up_proj's output, ``x1 = FATReLU_t(gate(x)) * ReLU(up(x))`` (``t = 0``: the paper's
    ``ReLU(gate) * ReLU(up)``): the up linear becomes a
    :class:`~prosparse_fx.activations.ReLULinear` (same parameters and state-dict keys), or the
    experts of a mixture-of-experts layer compute ``act_fn(gate) * relu(up)``. Other modules that
    read the same config key (BERT's masked-LM head) keep theirs, also after ``save_pretrained``
    and ``from_pretrained`` (see the module docstring for the config record). Per-layer
    thresholds live in each :class:`FATReLU`'s buffer, so they are saved with the weights, and
    in the config.

    Args:
        model: the model; changed in place (nothing is changed if any check fails).
        activation: a name in :data:`~prosparse_fx.activations.ACTIVATIONS`: ``"relu"``,
            ``"fatrelu"`` or ``"drelu"``.
        threshold: FATReLU t >= 0 of the gate, one float or one per site (ignored for
            ``"relu"``; for ``"drelu"`` default 0, the paper's dReLU).
        sites: FFN sites from :func:`find_ffn_sites` (found by capture when ``None``).
        example_inputs: inputs for the capture when ``sites`` is ``None``.

    Returns:
        The sites with their new activation (records without graph nodes).

    Raises:
        FFNNotFoundError: the model has no FFN.
        ValueError: unknown ``activation``, bad threshold, or a site whose activation is unknown
            or is a functional call with no module to swap (the message lists all sites), or
            different thresholds for sites that share one activation module (MoE experts);
            ``"drelu"`` on a plain FFN (no up projection: the message names the site and says to
            use ``"relu"``) or on a gated FFN whose up projection is not an ``nn.Linear`` or a
            transformers experts module with the default gate.
    """
    act = get_activation(activation)
    sites = list(sites) if sites is not None else find_ffn_sites(model, example_inputs)
    check_no_unknown(sites, REPLACEABLE)
    if act.up_relu:
        check_gated_for_up_relu(sites, act.name)
    functional = [s for s in sites if s.activation_module is None]
    if functional:
        listing = "; ".join(f"{s.path}: {s.activation}" for s in sites)
        raise ValueError(
            f"{len(functional)} FFN site(s) compute their activation as a function call inside "
            f"the FFN's forward, with no module to swap ({', '.join(s.path for s in functional)}); "
            "use SubstituteActivationPass on a captured graph instead. Sites found: " + listing
        )
    ts = thresholds_per_site(threshold, len(sites)) if act.takes_threshold else [0.0] * len(sites)
    for s in sites:  # resolve all before changing anything
        resolve_module(model, s.activation_module or "")
    ups = _up_relu_plan(model, sites, act.up_relu)
    shared: dict[str, set[float]] = {}
    for s, t in zip(sites, ts):
        shared.setdefault(s.activation_module or "", set()).add(t)
    differing = {path: sorted(v) for path, v in shared.items() if len(v) > 1}
    if differing:
        path, values = next(iter(differing.items()))
        raise ValueError(
            f"sites that share one activation module were given different thresholds ({path}: "
            f"{values}); the experts of a mixture-of-experts layer share one act_fn, so give "
            "them one threshold"
        )

    kept = _kept_activations(model, {s.activation_module or "" for s in sites})
    for module, on in ups:
        set_up_relu(module, on)
    new_sites = []
    for site, t in zip(sites, ts):
        parent, name = _parent_and_name(model, site.activation_module or "")
        current = getattr(parent, name)
        if isinstance(current, FATReLU) and act.module_type is FATReLU:
            current.set_threshold(t)
        else:
            setattr(parent, name, act.make_module(t).to(_device_of(parent)))
        new_sites.append(dataclasses.replace(site, activation=act.name, threshold=t, nodes=None))
    _record_in_config(model, act.name, sites, ts if act.takes_threshold else None, kept)
    _record_up_relu(model, ups)
    return new_sites


def check_gated_for_up_relu(sites: Sequence[FFNSite], name: str = "drelu") -> None:
    """Raise unless every site is a gated FFN: dReLU's second ReLU goes on the up projection,
    which a plain FFN does not have.

    Raises:
        ValueError: naming the plain sites and the way out (``"relu"``).
    """
    plain = [s.path for s in sites if s.kind != "gated"]
    if plain:
        shown = ", ".join(plain[:4]) + (" ..." if len(plain) > 4 else "")
        raise ValueError(
            f"activation {name!r} (dReLU, TurboSparse: ReLU on gate and up) needs a gated FFN, "
            f"but {len(plain)} FFN site(s) are plain (fc1 -> act -> fc2, no up projection): "
            f"{shown}. Use activation 'relu' (or 'fatrelu') for these models"
        )


def _up_relu_target(model: nn.Module, site: FFNSite) -> tuple[str, nn.Module]:
    """The module whose output gets dReLU's up ReLU: the up linear (or the fused gate_up
    linear), or the experts module of an expert site."""
    if site.expert is not None:
        from .moe import experts_path

        path = experts_path(site)
        return path, resolve_module(model, path)
    return site.up, resolve_module(model, site.up)


def _up_relu_plan(
    model: nn.Module, sites: Sequence[FFNSite], on: bool
) -> list[tuple[nn.Module, bool]]:
    """``(module, up ReLU on?)`` for each gated site's up module, checked before any change.

    Raises:
        ValueError: ``on`` and an up module that cannot take the ReLU.
    """
    from .moe import check_experts_up_relu, is_experts_module

    plan: dict[int, tuple[nn.Module, bool]] = {}
    for site in sites:
        if site.kind != "gated":
            continue
        path, module = _up_relu_target(model, site)
        if on:
            if is_experts_module(module):
                check_experts_up_relu(module, path)
            elif not isinstance(module, nn.Linear) or type(module) not in (nn.Linear, ReLULinear):
                raise ValueError(
                    f"dReLU needs the up projection of {site.path} to be an nn.Linear (or a "
                    f"transformers experts module), got {type(module).__name__} at {path}; use "
                    "activation 'relu' or 'fatrelu' for this model"
                )
        plan[id(module)] = (module, on)
    return list(plan.values())


def has_up_relu(module: nn.Module) -> bool:
    """True if ``module``'s output gets dReLU's up ReLU (a :class:`ReLULinear` or dReLU
    experts)."""
    from .moe import experts_up_relu

    return isinstance(module, ReLULinear) or experts_up_relu(module)


def set_up_relu(module: nn.Module, on: bool) -> None:
    """Put dReLU's up ReLU on ``module``'s output (``on``) or take it off, in place: an
    ``nn.Linear`` <-> :class:`ReLULinear` (its class changes; parameters stay), an experts
    module through :func:`prosparse_fx.moe.set_experts_up_relu`."""
    from .moe import is_experts_module, set_experts_up_relu

    if is_experts_module(module):
        set_experts_up_relu(module, on)
    elif type(module) in (nn.Linear, ReLULinear):
        module.__class__ = ReLULinear if on else nn.Linear
    elif on:
        raise ValueError(
            f"dReLU's up ReLU needs an nn.Linear or a transformers experts module, got "
            f"{type(module).__name__}"
        )


def _record_up_relu(model: nn.Module, ups: list[tuple[nn.Module, bool]]) -> None:
    """Keep ``prosparse_up_relu`` (canonical paths of the modules with the up ReLU) in step."""
    config = getattr(model, "config", None)
    if config is None:
        return
    paths = {id(m): p for p, m in model.named_modules()}
    record = set(getattr(config, _UP_RELU_KEY, None) or ())
    for module, on in ups:
        path = _canonical(model, paths[id(module)])
        if on:
            record.add(path)
        else:
            record.discard(path)
    if record:
        setattr(config, _UP_RELU_KEY, sorted(record))
    elif hasattr(config, _UP_RELU_KEY):
        delattr(config, _UP_RELU_KEY)


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _device_of(module: nn.Module) -> Any:
    for p in module.parameters():
        return p.device
    return "cpu"


def _canonical(model: nn.Module, path: str) -> str:
    """``path`` without the model's ``base_model_prefix`` (``model.layers.0`` -> ``layers.0``)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return path[len(prefix) + 1 :] if prefix and path.startswith(prefix + ".") else path


def _hf_class(name: Any) -> type | None:
    """The module class that transformers' ``ACT2FN[name]`` builds, or ``None``."""
    entry = ACT2CLS.get(name) if isinstance(name, str) else None
    return entry[0] if isinstance(entry, tuple) else entry


def _kept_activations(model: nn.Module, ffn_paths: set[str]) -> dict[str, str]:
    """``{canonical path: name}`` of the modules that are not FFN sites but that reloading would
    build from the activation config key: those of the class ``ACT2FN[key value]`` builds, plus
    those already recorded by an earlier ``relufy_``. Read before the config changes."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    kept = dict(getattr(config, _KEPT_KEY, None) or {})
    ffn = {_canonical(model, p) for p in ffn_paths}
    by_class = {}
    for key in _ACT_CONFIG_KEYS:
        value = getattr(config, key, None)
        cls = _hf_class(value)
        if cls is not None:
            by_class.setdefault(cls, value)
    for path, module in model.named_modules():
        name = by_class.get(type(module))
        if name is not None:
            kept.setdefault(_canonical(model, path), name)
    return {p: n for p, n in kept.items() if p not in ffn}


def _record_in_config(
    model: nn.Module,
    activation: str,
    sites: Sequence[FFNSite],
    ts: list[float] | None,
    kept: dict[str, str],
) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    ffn = dict(getattr(config, _FFN_KEY, None) or {})
    ffn |= {_canonical(model, s.activation_module or ""): activation for s in sites}
    if not kept:
        # every module built from the key is an FFN site: the published format
        for key in _ACT_CONFIG_KEYS:
            if hasattr(config, key):
                setattr(config, key, activation)
    # else the key stays: other modules read it (BERT's head), some as a plain string (Jamba's
    # Mamba mixer), and the FFN sites get their activation back from prosparse_ffn_activations
    for key in ("hidden_act_param", _THRESHOLDS_KEY, _KEPT_KEY):
        if hasattr(config, key):
            delattr(config, key)
    setattr(config, _FFN_KEY, ffn)
    if ts is not None:
        config.hidden_act_param = ts[0] if len(set(ts)) == 1 else max(ts)
        setattr(
            config,
            _THRESHOLDS_KEY,
            {_canonical(model, s.activation_module or ""): t for s, t in zip(sites, ts)},
        )


# --- Loading: transformers hooks -------------------------------------------------------------
#
# transformers builds ``ACT2FN[config.hidden_act]`` with no arguments, so a FATReLU cannot see
# ``hidden_act_param`` when it is made, and every module that reads the key gets the same class.
# In ``from_pretrained`` the model is built on the meta device; a buffer missing from the
# checkpoint is then replaced by ``torch.empty_like`` (uninitialised memory) and left to the
# model's ``_init_weights``, which knows no FATReLU; a loaded tensor is marked
# ``_is_hf_initialized``. Two hooks on ``PreTrainedModel`` close this, for ``from_pretrained``,
# ``from_config`` and plain construction alike:
#
# * before ``post_init`` (the module tree exists, no weights yet): the modules recorded in
#   ``prosparse_kept_activations`` get their own activation back, and each FATReLU is told the
#   threshold its config gives it (``prosparse_thresholds[path]``, else ``hidden_act_param``);
# * before ``_initialize_weights(module)`` (transformers' per-module "initialise what was not
#   loaded" step): a FATReLU whose buffer was not loaded takes that threshold (none: ValueError),
#   and one whose loaded buffer disagrees with it keeps the loaded value with a warning.


def _apply_config_record(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    ffn = getattr(config, _FFN_KEY, None) or {}
    up_relu = set(getattr(config, _UP_RELU_KEY, None) or ())
    for path, module in list(model.named_modules()):
        cpath = _canonical(model, path)
        name = ffn.get(cpath)
        if name in ACTIVATIONS and type(module) is not ACTIVATIONS[name].module_type:
            parent, child = _parent_and_name(model, path)
            setattr(parent, child, ACTIVATIONS[name].make_module(0.0))
        if cpath in up_relu:
            set_up_relu(module, True)
            up_relu.discard(cpath)
    if up_relu:
        raise ValueError(
            f"the config's {_UP_RELU_KEY} names {sorted(up_relu)}, which are not modules of "
            f"{type(model).__name__}: the checkpoint's dReLU FFNs would lose their up ReLU. Load "
            "it into the model class it was saved from"
        )
    kept = getattr(config, _KEPT_KEY, None) or {}  # written by earlier versions
    if kept:
        types = tuple(a.module_type for a in ACTIVATIONS.values())
        for path, module in list(model.named_modules()):
            name = kept.get(_canonical(model, path))
            if name is None or not isinstance(module, types) or _hf_class(name) is type(module):
                continue
            parent, child = _parent_and_name(model, path)
            setattr(parent, child, ACT2FN[name])
    fatrelus = [(p, m) for p, m in model.named_modules() if isinstance(m, FATReLU)]
    if not fatrelus:
        return
    per_site = getattr(config, _THRESHOLDS_KEY, None)
    if isinstance(per_site, (list, tuple)):  # written before paths were recorded: site order
        per_site = (
            {_canonical(model, p): t for (p, _), t in zip(fatrelus, per_site)}
            if len(per_site) == len(fatrelus)
            else None
        )
    per_site = per_site if isinstance(per_site, dict) else {}
    param_key = ACTIVATIONS["fatrelu"].hf_param
    param = getattr(config, param_key, None)
    for path, module in fatrelus:
        cpath = _canonical(model, path)
        if cpath in per_site:
            expected, source = per_site[cpath], f"{_THRESHOLDS_KEY}[{cpath!r}]"
        elif param is not None:
            expected, source = param, param_key
        else:
            expected, source = None, None
        if expected is not None:
            expected = check_threshold(expected)
        module._config_threshold = (cpath, expected, source)


def _init_threshold(module: FATReLU) -> None:
    record = getattr(module, "_config_threshold", None)
    if record is None:  # not built from a config (inserted by relufy_): its value is its own
        return
    path, expected, source = record
    if getattr(module.threshold_bits, "_is_hf_initialized", False):  # loaded from the weights
        module._sync()
        if expected is not None and module.t != expected:
            warnings.warn(
                f"FATReLU at {path!r}: the checkpoint's threshold {module.t!r} disagrees with the "
                f"config's {source} = {expected!r}; keeping the checkpoint's {module.t!r}",
                stacklevel=2,
            )
        return
    if expected is None:
        raise ValueError(
            f"FATReLU at {path!r} has no threshold: none in the weights and no "
            f"{ACTIVATIONS['fatrelu'].hf_param} in the config"
        )
    module.set_threshold(expected)


def _install_transformers_hooks() -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if getattr(PreTrainedModel.post_init, "_prosparse_hook", False):
        return
    post_init = PreTrainedModel.post_init
    initialize_weights = PreTrainedModel._initialize_weights

    @functools.wraps(post_init)
    def post_init_hook(self, *args: Any, **kwargs: Any) -> Any:
        _apply_config_record(self)
        out = post_init(self, *args, **kwargs)
        if any(
            getattr(m, "_config_threshold", (None, None))[1] is not None
            for m in self.modules()
            if isinstance(m, FATReLU)
        ):  # a missing threshold is set from the config: not "newly initialised" in the report
            self._keys_to_ignore_on_load_missing = set(
                self._keys_to_ignore_on_load_missing or ()
            ) | {r"\.threshold_bits$"}
        return out

    @functools.wraps(initialize_weights)
    def initialize_weights_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if isinstance(module, FATReLU) and not getattr(module, "_is_hf_initialized", False):
            with torch.no_grad():
                _init_threshold(module)
        return initialize_weights(self, module, *args, **kwargs)

    post_init_hook._prosparse_hook = True  # type: ignore[attr-defined]
    PreTrainedModel.post_init = post_init_hook
    PreTrainedModel._initialize_weights = initialize_weights_hook


_install_transformers_hooks()
