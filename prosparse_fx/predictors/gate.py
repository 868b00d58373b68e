"""The gate a predictor approximates: the weight and bias of an FFN site's gate pre-activation,
read from the model, and their fingerprint (which model a stored predictor was built for)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..ffn import FFNSite, resolve_module


def gate_weight(model: nn.Module, site: FFNSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [d_ff, d], bias [d_ff] or None)`` of the linear whose output the activation
    thresholds: gate_proj for a gated FFN (its rows of a fused gate_up linear), fc1 for a plain
    one. ``nn.Linear`` and GPT-2's ``Conv1D`` (stored ``[d, d_ff]``, transposed here); views of
    the parameters, without gradient.

    Raises:
        LookupError: the module is not in ``model``.
        TypeError: the module is neither an ``nn.Linear`` nor a ``Conv1D``.
    """
    path = (site.gate or "") if site.kind == "gated" else site.up
    module = resolve_module(model, path)
    if isinstance(module, nn.Linear):
        weight, bias = module.weight, module.bias
    elif type(module).__name__ == "Conv1D":
        weight, bias = module.weight.T, getattr(module, "bias", None)
    else:
        raise TypeError(f"{path}: cannot read a linear weight from {type(module).__name__}")
    if site.gate_up_split is not None:
        rows = slice(site.gate_up_split[0], site.gate_up_split[0] + site.intermediate_size)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    return weight.detach(), None if bias is None else bias.detach()


def gate_fingerprint(weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """Hex sha256 of the gate's shape and float32 values (weight, then bias when present)."""
    digest = hashlib.sha256(repr((list(weight.shape), bias is not None)).encode())
    for t in (weight, bias):
        if t is not None:
            digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_gate(
    predictor: Any,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    error: type[Exception] = ValueError,
) -> None:
    """Refuse ``predictor`` (a :class:`~prosparse_fx.predictors.Predictor`) if it was built for
    another gate than ``weight`` ``[d_ff, d]`` and ``bias`` ``[d_ff]`` or ``None`` (as
    :func:`gate_weight` reads them): its ``gate_sha256`` differs from their fingerprint. A
    predictor without a fingerprint (made by hand) passes unchecked.

    The fingerprint hashes float32 values, so a bfloat16 model upcast to float32 keeps its
    predictors (the gate holds the same numbers); a float32 model cast to bfloat16 does not.

    Raises:
        error: (``ValueError`` by default) naming the site and the way out.
    """
    if predictor.gate_sha256 is None:
        return
    if gate_fingerprint(weight, bias) != predictor.gate_sha256:
        raise error(
            f"the predictor of {predictor.site} was built for another gate weight than this "
            "model's (another model of the same widths, or these weights changed since, "
            "e.g. cast to a lower precision): "
            "build the predictors for this model (prosparse-fx predictors, or "
            "build_predictors)"
        )
