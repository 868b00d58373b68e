"""Predictors on disk: ``predictors.safetensors`` (the tensors, keys ``"{site}.a"``,
``"{site}.b"``, ``"{site}.bias"``) and ``predictors.json`` (format version, the sha256 of the
tensors file, and per site its kind, rank, cut, measured recall/precision/sparsities, widths and
the fingerprint of the gate weight it was built for). Loading reads no pickle and refuses, by
name, a pair that does not fit the model."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..atomic import OutputWriteError, atomic_file
from ..errors import InputError
from ..ffn import FFNSite
from .gate import check_gate, gate_fingerprint, gate_weight
from .predictor import KINDS, Predictor, check_predictor
from .svd import check_rank

FORMAT = "prosparse_fx.predictors"
FORMAT_VERSION = 1
TENSORS_FILE = "predictors.safetensors"
JSON_FILE = "predictors.json"
_METRICS = ("recall", "precision", "predicted_sparsity", "true_sparsity")


class PredictorFileError(InputError):
    """Stored predictors that cannot be used with this model; the message names the problem."""


def save_predictors(
    folder: str | Path,
    predictors: Sequence[Predictor],
    model: nn.Module,
    sites: Sequence[FFNSite],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``predictors`` (one per site of ``model``, in order) to ``folder``.

    Each file is written whole or not at all (:func:`prosparse_fx.atomic.atomic_file`), the
    tensors first; the JSON records the tensors file's sha256, so a pair torn by a crash while
    replacing an earlier one is refused on loading.

    Args:
        folder: the folder (created if missing).
        predictors: from :func:`~prosparse_fx.predictors.build_predictors`.
        model: the model they were built for (its gate weights are fingerprinted).
        sites: its FFN sites, in the order of ``predictors``.
        overwrite: replace an existing ``predictors.safetensors``/``predictors.json``.

    Returns:
        The folder.

    Raises:
        ValueError: the predictors do not match ``sites`` (number, paths, shapes), a tensor
            is not floating point or not finite, or a predictor was built for another gate
            weight (:func:`~prosparse_fx.predictors.check_gate`).
        OutputWriteError: ``folder`` is a file, or a predictor file exists in it and
            ``overwrite`` is False.
    """
    if [p.site for p in predictors] != [s.path for s in sites]:
        raise ValueError(
            f"the predictors are for sites {[p.site for p in predictors]}, not "
            f"{[s.path for s in sites]}"
        )
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for p, s in zip(predictors, sites):
        weight, bias = gate_weight(model, s)
        if p.kind not in KINDS:
            raise ValueError(f"{p.site}: unknown predictor kind {p.kind!r}")
        check_rank(p.rank, s.hidden_size, s.intermediate_size)
        check_predictor(p, s.hidden_size, s.intermediate_size)
        check_gate(p, weight, bias)
        for name in ("a", "b", "bias"):
            if getattr(p, name) is not None:
                tensors[f"{p.site}.{name}"] = getattr(p, name).detach().cpu().contiguous()
        entries.append(
            {
                "site": p.site,
                "kind": p.kind,
                "rank": int(p.rank),
                "cut": float(p.cut),
                **{m: None if math.isnan(v := float(getattr(p, m))) else v for m in _METRICS},
                "d": s.hidden_size,
                "d_ff": s.intermediate_size,
                "bias": p.bias is not None,
                "gate_sha256": gate_fingerprint(weight, bias),
                "speedup": None if math.isnan(p.speedup) else float(p.speedup),
            }
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputWriteError(
            f"{folder} is a file; the predictors are written into a folder (the model's): give "
            "a folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        for name in (TENSORS_FILE, JSON_FILE):
            if (folder / name).exists():
                raise OutputWriteError(
                    f"{folder / name} exists; pass overwrite=True to replace the predictors "
                    "there, or give another folder"
                )
    data = safetensors.torch.save(tensors)
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "sites": entries,
    }
    with atomic_file(folder / TENSORS_FILE, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    with atomic_file(folder / JSON_FILE, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return folder


def _field(entry: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PredictorFileError(f"{where}: field {key!r} is missing or not a valid {key}")
    return value


def _metric(entry: dict[str, Any], key: str, where: str) -> float:
    """A measured fraction in [0, 1], or NaN where it was not measured (``null``)."""
    if entry.get(key) is None:
        return math.nan
    value = float(_field(entry, key, (int, float), where))
    if not 0.0 <= value <= 1.0:
        raise PredictorFileError(f"{where}: {key} {value!r} is not a fraction in [0, 1]")
    return value


def _speedup(entry: dict[str, Any], where: str) -> float:
    """The measured speedup over exact mode, a positive finite number, or NaN where it was not
    measured (``null`` or absent)."""
    if entry.get("speedup") is None:
        return math.nan
    value = float(_field(entry, "speedup", (int, float), where))
    if not 0.0 < value < math.inf:
        raise PredictorFileError(f"{where}: speedup {value!r} is not a positive number")
    return value


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON record and the tensors of ``folder``, checked against each other."""
    for name in (JSON_FILE, TENSORS_FILE):
        if not (folder / name).is_file():
            raise PredictorFileError(
                f"{folder / name} is missing: save_predictors writes {JSON_FILE} and "
                f"{TENSORS_FILE} into the folder"
            )
    where = str(folder / JSON_FILE)
    try:
        record = json.loads((folder / JSON_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PredictorFileError(f"{where} is not readable JSON: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise PredictorFileError(f"{where} is not a predictors file (format {FORMAT!r})")
    version = _field(record, "version", int, where)
    if version > FORMAT_VERSION:
        raise PredictorFileError(
            f"{where} has format version {version}, newer than this prosparse_fx reads "
            f"({FORMAT_VERSION}): upgrade prosparse_fx"
        )
    if version < 1:
        raise PredictorFileError(f"{where} has an invalid format version {version}")
    try:
        data = (folder / TENSORS_FILE).read_bytes()
    except OSError as exc:
        raise PredictorFileError(f"cannot read {folder / TENSORS_FILE}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != _field(record, "tensors_sha256", str, where):
        raise PredictorFileError(
            f"{folder / TENSORS_FILE} is not the tensors file that {JSON_FILE} was saved with "
            "(changed, damaged, or a save that was interrupted): save the predictors again"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise PredictorFileError(f"{folder / TENSORS_FILE} is not a safetensors file") from exc
    return record, tensors


def load_predictors(
    folder: str | Path, model: nn.Module, sites: Sequence[FFNSite]
) -> list[Predictor]:
    """Load the predictors that :func:`save_predictors` wrote into ``folder``, for ``model``.

    Args:
        folder: the folder holding ``predictors.json`` and ``predictors.safetensors``.
        model: the model to use them with.
        sites: its FFN sites, in the order they were saved in.

    Returns:
        One :class:`Predictor` per site; tensors in their stored dtype, on the device of the
        site's gate weight.

    Raises:
        PredictorFileError: a file is missing or unreadable; the JSON is malformed or from a
            newer format version; the tensors file is not the one the JSON was saved with; the
            number or paths of the sites differ; a width (d or d_ff) differs; a gate weight
            differs from the one the predictors were built for (another model); a tensor has
            the wrong shape, is not floating point or holds NaN or infinity.
    """
    folder = Path(folder)
    record, tensors = _read(folder)
    where = str(folder / JSON_FILE)
    entries = _field(record, "sites", list, where)
    if len(entries) != len(sites):
        raise PredictorFileError(
            f"{where} holds predictors for {len(entries)} FFN site(s), but {len(sites)} sites "
            "were given: they were built for another model"
        )
    for entry, s in zip(entries, sites):
        stored = _field(entry, "site", str, where)
        if stored != s.path:
            raise PredictorFileError(
                f"{where} holds a predictor for site {stored!r} where the model has {s.path!r}: "
                "they were built for another model"
            )
    predictors = []
    for entry, s in zip(entries, sites):
        here = f"{where}, site {s.path}"
        weight, bias = gate_weight(model, s)
        d, d_ff = _field(entry, "d", int, here), _field(entry, "d_ff", int, here)
        if (d, d_ff) != (s.hidden_size, s.intermediate_size) or tuple(weight.shape) != (d_ff, d):
            raise PredictorFileError(
                f"{here}: built for an FFN of d={d}, d_ff={d_ff}; the model's is "
                f"d={weight.shape[1]}, d_ff={weight.shape[0]}"
            )
        if gate_fingerprint(weight, bias) != _field(entry, "gate_sha256", str, here):
            raise PredictorFileError(
                f"{here}: the gate weight differs from the one the predictors were built for: "
                "they were built for another model (or other weights, or another dtype)"
            )
        kind = _field(entry, "kind", str, here)
        if kind not in KINDS:
            raise PredictorFileError(f"{here}: unknown predictor kind {kind!r}")
        try:
            rank = check_rank(_field(entry, "rank", int, here), d, d_ff)
        except ValueError as exc:
            raise PredictorFileError(f"{here}: {exc}") from None
        cut = float(_field(entry, "cut", (int, float), here))
        if not math.isfinite(cut):
            raise PredictorFileError(f"{here}: the cut is not finite")
        has_bias = _field(entry, "bias", bool, here)
        names = ["a", "b"] + (["bias"] if has_bias else [])
        missing = [f"{s.path}.{n}" for n in names if f"{s.path}.{n}" not in tensors]
        if missing:
            raise PredictorFileError(f"{folder / TENSORS_FILE} has no tensor {missing[0]}")
        found = {n: tensors[f"{s.path}.{n}"].to(weight.device) for n in names}
        p = Predictor(
            site=s.path,
            kind=kind,
            rank=rank,
            a=found["a"],
            b=found["b"],
            cut=cut,
            bias=found.get("bias"),
            **{m: _metric(entry, m, here) for m in _METRICS},
            speedup=_speedup(entry, here),
            gate_sha256=entry["gate_sha256"],
        )
        check_predictor(p, d, d_ff, PredictorFileError)
        predictors.append(p)
    return predictors
