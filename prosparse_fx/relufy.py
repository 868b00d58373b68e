"""Eager activation substitution for ``nn.Module`` users: ``relufy_`` swaps the activation
modules that the FFN sites point to, in place, and updates the Hugging Face config so that
``save_pretrained`` / ``from_pretrained`` round-trip (ProSparse Sec. 3.1, and Sec. 3.3 for
FATReLU)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from .activations import FATReLU, check_threshold
from .ffn import REPLACEABLE, FFNSite, check_no_unknown, find_ffn_sites, resolve_module

# Config attributes that name the FFN activation in Hugging Face configs.
_ACT_CONFIG_KEYS = ("hidden_act", "hidden_activation", "activation_function")


def thresholds_per_site(threshold: float | Sequence[float], n_sites: int) -> list[float]:
    """One validated FATReLU threshold per site from a scalar or a per-layer sequence.

    Raises:
        ValueError: a negative/non-finite threshold, or a sequence of the wrong length.
    """
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
    activation: Literal["relu", "fatrelu"] = "relu",
    threshold: float | Sequence[float] = 0.0,
    *,
    sites: Sequence[FFNSite] | None = None,
    example_inputs: Any = None,
) -> list[FFNSite]:
    """Replace the FFN activation (SiLU/GELU/GELU-tanh/ReLU/FATReLU) by ReLU or FATReLU, in place.

    Only the activation of each FFN changes: for gated FFNs the gate's activation (up_proj stays
    linear), for plain FFNs the activation between fc1 and fc2. The model's config gets
    ``hidden_act="relu"``, or ``"fatrelu"`` with ``hidden_act_param=t`` (the format of the
    published ProSparse checkpoints); per-layer thresholds live in each :class:`FATReLU`'s
    ``threshold`` buffer, so they are saved with the weights.

    Args:
        model: the model; changed in place (nothing is changed if any check fails).
        activation: ``"relu"`` or ``"fatrelu"``.
        threshold: FATReLU t >= 0, one float or one per site (ignored for ``"relu"``).
        sites: FFN sites from :func:`find_ffn_sites` (found by capture when ``None``).
        example_inputs: inputs for the capture when ``sites`` is ``None``.

    Returns:
        The sites with their new activation (records without graph nodes).

    Raises:
        FFNNotFoundError: the model has no FFN.
        ValueError: unknown ``activation``, bad threshold, or a site whose activation is unknown
            or is a functional call with no module to swap (the message lists all sites).
    """
    if activation not in ("relu", "fatrelu"):
        raise ValueError(f"activation must be 'relu' or 'fatrelu', got {activation!r}")
    sites = list(sites) if sites is not None else find_ffn_sites(model, example_inputs)
    check_no_unknown(sites, REPLACEABLE)
    functional = [s for s in sites if s.activation_module is None]
    if functional:
        listing = "; ".join(f"{s.path}: {s.activation}" for s in sites)
        raise ValueError(
            f"{len(functional)} FFN site(s) compute their activation as a function call inside "
            f"the FFN's forward, with no module to swap ({', '.join(s.path for s in functional)}); "
            "use SubstituteActivationPass on a captured graph instead. Sites found: " + listing
        )
    ts = thresholds_per_site(threshold, len(sites)) if activation == "fatrelu" else None
    for s in sites:  # resolve all before changing anything
        resolve_module(model, s.activation_module or "")

    new_sites = []
    for i, site in enumerate(sites):
        path = site.activation_module or ""
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        current = getattr(parent, name)
        if ts is None:
            setattr(parent, name, nn.ReLU())
            t = 0.0
        else:
            t = ts[i]
            if isinstance(current, FATReLU):
                current.set_threshold(t)
            else:
                setattr(parent, name, FATReLU(t).to(_device_of(parent)))
        new_sites.append(dataclasses.replace(site, activation=activation, threshold=t, nodes=None))
    _update_config(model, activation, ts)
    return new_sites


def _device_of(module: nn.Module) -> Any:
    for p in module.parameters():
        return p.device
    return "cpu"


def _update_config(model: nn.Module, activation: str, ts: list[float] | None) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    for key in _ACT_CONFIG_KEYS:
        if hasattr(config, key):
            setattr(config, key, activation)
    if ts is not None:
        config.hidden_act_param = ts[0] if len(set(ts)) == 1 else max(ts)
        config.prosparse_thresholds = ts
    else:
        for key in ("hidden_act_param", "prosparse_thresholds"):
            if hasattr(config, key):
                delattr(config, key)
