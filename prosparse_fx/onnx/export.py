"""``export_onnx``: a relufied model to an ONNX file whose FFNs run sparsely in stock ONNX Runtime.

The model is captured with ``torch.export`` (through the same FFN-site analysis and
:class:`~prosparse_fx.passes.SparseFFNRewritePass` as the graph and compile paths), each
ReLU/FATReLU FFN becomes one sparse-FFN op, and ``torch.onnx.export(dynamo=True)`` lowers the
ops through :mod:`.translation` into standard ONNX operators (ProSparse App. D).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..atomic import (
    OutputWriteError,
    atomic_file,
    clean_leftovers,
    failpoint,
    fsync_path,
    remove,
    serialised,
    temp_path,
    write_error,
)
from ..capture import capture_export, example_inputs_for, module_path
from ..errors import InputError
from ..ffn import FFNNotFoundError, find_sites_in_graph
from ..moe import find_expert_sites
from ..passes import SparseFFNRewritePass
from ..peers import check_no_peers
from ..predictors.gate import gate_weight
from ..predictors.speed import predictors_that_pay
from ..sparse_modules import NotSparseError, predictors_for_sites
from .cached_decoder import CachedDecoder, check_full_attention, dynamic_shapes, example_inputs
from .translation import DEFAULT_CROSSOVER, OPSET, translation_table

# ONNX protobufs cannot exceed 2 GiB; bigger models keep their weights in a side file
PROTOBUF_LIMIT = 2**31 - 1
METADATA_PREFIX = "prosparse."


class ONNXExportError(RuntimeError):
    """The model holds an operator or module that the ONNX exporter cannot translate."""


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Check, before any long work, that an ONNX file can be written at ``path``.

    Returns:
        The resolved path.

    Raises:
        InputError: not a ``.onnx`` name, a folder, an existing file (or its ``.data`` weights
            file) without ``overwrite``, or a parent folder that is missing or not writable.
    """
    target = Path(path).expanduser().resolve()
    if target.suffix != ".onnx":
        raise InputError(f"output {str(path)!r} must be a file name ending in .onnx")
    if target.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name ending in .onnx")
    if not overwrite:
        for taken in (target, target.with_name(target.name + ".data")):
            if taken.exists():
                raise InputError(
                    f"{str(taken)!r} exists; pass overwrite=True (--overwrite) to replace it"
                )
    parent = target.parent
    if not parent.is_dir():
        raise InputError(f"the folder of {str(path)!r} does not exist; create {parent} first")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}-probe-")
    except OSError as exc:
        raise InputError(f"cannot write into {parent}: {exc.strerror}") from exc
    os.close(fd)
    os.unlink(probe)
    return target


def _unsupported_message(exc: BaseException, gm: fx.GraphModule) -> str:
    """Name the first operator the exporter could not translate, and the module it sits in."""
    text = f"{exc}\n{exc.__cause__ or ''}"
    found = re.search(
        r"(?:No ONNX function found for|Unsupported FX nodes:\s*\{?)\s*'?<?"
        r"(?:OpOverload\(op=')?([\w:.]+)",
        text,
    )
    op = found.group(1) if found else None
    where = None
    if op:
        for node in gm.graph.nodes:
            if node.op == "call_function" and op.split("::")[-1] in str(node.target):
                where = module_path(node)
                break
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if op is None:
        return f"the ONNX exporter failed: {first_line}"
    return (
        f"the ONNX exporter has no translation for operator {op}"
        f"{f' (in module {where})' if where else ''}; replace that module or register a "
        "translation for the operator"
    )


def _capture(model: nn.Module, kv_cache: bool) -> tuple[nn.Module, tuple, Any, list, list]:
    if kv_cache:
        decoder = CachedDecoder(model)
        check_full_attention(decoder)
        layout = decoder.layout
        vocab = int(model.config.get_text_config().vocab_size)
        return (
            decoder,
            example_inputs(layout, vocab),
            dynamic_shapes(layout),
            layout.input_names(),
            layout.output_names(),
        )
    # batch 2, 3 tokens: no dimension of size 1, which torch.export would specialise
    kwargs = example_inputs_for(model, seq_len=3, batch=2)
    ids = kwargs.pop("input_ids")
    config = model.config
    # learned position embeddings (BERT, GPT-2) bound the sequence length
    max_len = getattr(config, "max_position_embeddings", None)
    batch = torch.export.Dim("batch")
    seq = (
        torch.export.Dim("seq", max=max_len)
        if isinstance(max_len, int)
        else torch.export.Dim("seq")
    )
    return (
        _LogitsOnly(model, kwargs),
        (ids, torch.ones_like(ids)),
        ({0: batch, 1: seq}, {0: batch, 1: seq}),
        ["input_ids", "attention_mask"],
        ["logits"],
    )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notices that say nothing about the user's model: it is handed a
    captured graph (already in inference form, with no eval() to call), torchvision's ops are
    not installed, and torch.export's dims of one name are merged."""
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message in (
                "Exporting a model while it is in training",
                "# The axis name",
                ".*LeafSpec",
            ):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        noisy.setLevel(level)


def _flat(shapes: tuple) -> tuple:
    return tuple(x for s in shapes for x in (s if isinstance(s, tuple) else (s,)))


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits`` (or the last hidden state), no cache.

    ``extra``: the other keyword inputs of :func:`~prosparse_fx.capture.example_inputs_for`
    (``use_cache=False`` where the forward takes it)."""

    def __init__(self, model: nn.Module, extra: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.extra = extra
        self.train(model.training)  # capture restores this mode: keep the user's

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    sparse: bool = True,
    kv_cache: bool = True,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    dynamic_shapes: tuple[Any, ...] | None = None,
    crossover: float = DEFAULT_CROSSOVER,
    external_data: bool | None = None,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    predictors: Any = None,
) -> Path:
    """Export a relufied Hugging Face model to ONNX with its FFNs computed sparsely.

    The file runs in the ``onnxruntime`` package as installed from the registry: standard
    operators only (opset 18, no custom domain, no model-local functions), ``onnx.checker``
    passes. Inputs and outputs are float32 (the model's dtype) with dynamic batch and sequence
    length; see :mod:`.cached_decoder` for the names and shapes with ``kv_cache``. The user's
    model is not modified (the rewrite works on a captured copy of the graph; the transposed
    down weights are new tensors).

    Args:
        model: a Hugging Face model whose FFN activations are ReLU/FATReLU (:func:`relufy_`,
            trained with ``prosparse-fx sparsify``), in float32.
        path: output file, ``*.onnx``; its parent folder must exist.
        sparse: rewrite the FFNs to the sparse computation (``False``: a dense export of the
            same model, e.g. for comparison).
        kv_cache: export a decoder with past key/values as inputs and present ones as outputs
            (causal LMs with full-attention caches); ``False``: ``(input_ids, attention_mask)
            -> logits`` (or the last hidden state).
        example_inputs: positional inputs for any other ``nn.Module`` (not a Hugging Face
            model): it is exported as it is, ``kv_cache`` does not apply, inputs are named
            ``input_0``, ``input_1``, ...
        dynamic_shapes: ``torch.export`` dynamic shapes for ``example_inputs`` (default: static).
        crossover: active fraction in [0, 1] at or below which each FFN takes the sparse branch.
        external_data: store weights in ``<path>.data``; ``None`` decides by size (over 1 GiB
            of weights; a protobuf cannot exceed 2 GiB).
        overwrite: replace an existing file.
        metadata: extra ``metadata_props`` to store (strings).
        predictors: ``None`` (exact mode), or :class:`~prosparse_fx.predictors.Predictor` s for
            some or all FFN sites (a list, or a mapping from site path, as
            :func:`~prosparse_fx.predictors.load_predictors` gives them): those FFNs export in
            approximate mode (Deja Vu; ProSparse Sec. 4): the rank-r estimate, the predicted set,
            then gate, up and down over the predicted rows only, in the same standard operators
            and with the same crossover. As in ``sparsify_ffn_``, a site whose predictor
            measured slower than exact mode (``speedup`` below 1, timed on the torch ops) stays
            exact, so the file computes what eager approximate mode computes.

    Returns:
        The resolved output path. It appears only when complete: the model is saved into a
        temporary folder beside it and renamed into place (weights file first).

    Raises:
        InputError: a bad output path (checked before the export starts) or option, a model
            without the config the chosen export needs, predictors with ``sparse=False``, or
            predictors that are not float32, do not fit a site or were built for another gate
            weight (another model of the same widths).
        NotSparseError: ``sparse`` and an FFN's activation is SiLU/GELU (relufy and train
            first, or export with ``sparse=False``).
        PeerHooksError: ``sparse`` and the model carries training-free peer hooks
            (:mod:`prosparse_fx.peers`; a dense export computes them).
        ONNXExportError: ``torch.export`` cannot capture the model, an operator has no ONNX
            translation (the message names it and its module), or the model has
            mixture-of-experts layers (named).
    """

    target = check_output_path(path, overwrite)
    if not 0.0 <= crossover <= 1.0:
        raise InputError(f"crossover must be an active fraction in [0, 1], got {crossover}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if params and any(p.dtype != torch.float32 for p in params):
        raise InputError("export_onnx takes a float32 model; load it with dtype=torch.float32")
    if any(p.is_meta for p in params):
        raise InputError("the model has weights on the meta device; load real weights first")
    if predictors is not None and not sparse:
        raise InputError(
            "predictors run approximate mode through the sparse export; drop sparse=False "
            "(--dense), or the predictors"
        )
    if sparse:
        check_no_peers(
            model,
            "the sparse export cannot rewrite FFNs whose x1 they change (a dense export, "
            "sparse=False, computes them)",
        )
    experts = sorted({s.path.rpartition(".")[0] for s in find_expert_sites(model)})
    if experts:
        raise ONNXExportError(
            f"{type(model).__name__} has mixture-of-experts layers ({', '.join(experts[:2])}"
            f"{' ...' if len(experts) > 2 else ''}): their token routing does not export to ONNX "
            "with dynamic shapes here, dense or sparse; run the model in torch (relufy_, "
            "measure and generate work on experts)"
        )
    if example_inputs is not None:
        wrapper, inputs, shapes = model, tuple(example_inputs), dynamic_shapes
        input_names = [f"input_{i}" for i in range(len(inputs))]
        output_names = None
    else:
        wrapper, inputs, shapes, input_names, output_names = _capture(model, kv_cache)
    try:
        gm = capture_export(wrapper, inputs, shapes)
    except Exception as exc:  # torch.export reports many exception types
        raise ONNXExportError(
            f"torch.export cannot capture {type(model).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc
    sites = find_sites_in_graph(gm)
    if sparse:
        if not sites:
            raise FFNNotFoundError(
                f"no FFN site found in {type(model).__name__}; "
                "export it with sparse=False (--dense)"
            )
        # the export wraps a Hugging Face model (its sites are paths under "model.")
        prefix = "model." if example_inputs is None else ""
        model_sites = [dataclasses.replace(s, path=s.path.removeprefix(prefix)) for s in sites]
        try:
            # the sites' gate/up paths are the wrapper's (only .path lost the prefix)
            found = predictors_for_sites(
                predictors, model_sites, gates=lambda s: gate_weight(wrapper, s)
            )
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc)) from exc
        found = {p.site: p for p in predictors_that_pay(list(found.values()))}
        for p in found.values():
            if p.a.dtype != torch.float32:
                raise InputError(
                    f"the predictor of {p.site} is {p.a.dtype}; export_onnx takes float32 "
                    "predictors, as it takes a float32 model (ONNX Runtime has no "
                    f"{p.a.dtype} matrix product on the CPU): build them from the float32 "
                    "model (build_predictors, prosparse-fx predictors)"
                )
        predicted = {prefix + path: p for path, p in found.items()}
        try:
            SparseFFNRewritePass(predictors=predicted)(gm)
        except NotSparseError as exc:
            raise NotSparseError(f"{exc} Or export it dense: sparse=False (--dense).") from exc
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                gm,
                inputs,
                dynamo=True,
                # the captured graph takes its inputs flat
                dynamic_shapes=None if shapes is None else _flat(shapes),
                input_names=input_names,
                output_names=output_names,
                custom_translation_table=translation_table(crossover),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter wraps failures in several types
        raise ONNXExportError(_unsupported_message(exc, gm)) from exc
    props = {
        "sparse": str(sparse).lower(),
        "kv_cache": str(kv_cache and example_inputs is None).lower(),
        "crossover": repr(crossover),
        "ffn_sites": str(len(sites)),
        "thresholds": ",".join(f"{s.threshold or 0.0:g}" for s in sites),
        "predicted_sites": str(len(predicted) if sparse else 0),
    }
    if example_inputs is None:
        from ..models import model_positions

        # how far generation may go: learned positions end there, rotary ones were not trained
        # past it (read by OnnxCausalLM.check_length)
        kind, limit = model_positions(model)
        if kind is not None and limit is not None:
            props |= {"positions": kind, "max_positions": str(limit)}
    props |= {k.removeprefix(METADATA_PREFIX): str(v) for k, v in (metadata or {}).items()}
    for key, value in props.items():
        program.model.metadata_props[METADATA_PREFIX + key] = value
    size = sum(p.numel() * p.element_size() for p in gm.parameters())
    external = size > PROTOBUF_LIMIT // 2 if external_data is None else external_data
    _save(program, target, external, overwrite)
    return target


def _locations(proto: Any) -> list[Any]:
    """The ``location`` entries of the initializers an ONNX model keeps in external files."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [
        entry
        for tensor in _get_all_tensors(proto)
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    ]


def _data_files(model_file: Path) -> set[str]:
    """Names of the external-data files that the ONNX file ``model_file`` refers to."""
    import onnx

    if not model_file.is_file():
        return set()
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # noqa: BLE001  (not ONNX: refers to nothing)
        return set()
    return {entry.value for entry in _locations(proto)}


def _save(program: Any, target: Path, external: bool, overwrite: bool) -> None:
    """Write the exported ``program`` to ``target`` whole or not at all.

    The weights of an external-data export go to a file with a fresh name
    (``NAME.onnx.<8 hex>.data``), placed before the ``.onnx`` that refers to it is renamed into
    place, so a kill at any moment leaves either the old pair or the new one; the old weights
    file is removed after. Writers into one folder take turns (:func:`~prosparse_fx.atomic.
    serialised`); without ``overwrite`` a file made meanwhile by another export is kept, and
    this one is refused. Weights files of killed exports that no ``.onnx`` refers to are
    removed.

    Raises:
        OutputWriteError: ``target`` appeared meanwhile (without ``overwrite``), or the write
            failed (a full disk: the message says so).
    """
    import onnx

    parent = target.parent
    orphan = re.compile(rf"^{re.escape(target.name)}\.[0-9a-f]{{8}}\.data$")
    with serialised(parent):
        clean_leftovers(parent)
        before = _data_files(target)
        for entry in parent.iterdir():
            if orphan.match(entry.name) and entry.name not in before:
                entry.unlink()  # the weights of a killed export, never referred to
        tmp = temp_path(parent, target.name)
        tmp.mkdir()
        new_data = None
        try:
            staged = tmp / target.name
            program.save(staged, external_data=external)
            onnx.checker.check_model(str(staged), full_check=False)
            data = tmp / f"{target.name}.data"
            if data.exists():
                new_data = f"{target.name}.{secrets.token_hex(4)}.data"
                proto = onnx.load(str(staged), load_external_data=False)
                for entry in _locations(proto):
                    entry.value = new_data
                onnx.save(proto, str(staged))
                fsync_path(data)
                os.replace(data, parent / new_data)
                failpoint("export.data_in_place")
            with atomic_file(target, overwrite=overwrite) as final:
                os.replace(staged, final)
            failpoint("export.model_in_place")
            for name in before - {new_data}:
                (parent / name).unlink(missing_ok=True)
        except OutputWriteError:
            if new_data is not None:
                (parent / new_data).unlink(missing_ok=True)
            raise
        except OSError as exc:
            raise write_error(exc, "the ONNX file", target, "Nothing was replaced.") from exc
        finally:
            remove(tmp)
