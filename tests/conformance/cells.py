"""The conformance cells: one function per path, run on one family; each returns the largest
absolute difference from the hand-made reference (:func:`tests.conformance.families.reference`)
relative to the reference's largest magnitude, or raises the library's refusal.

Paths: ``relufy_`` with ReLU and with FATReLU; the graph passes on ``torch.export``
(substitution, then the sparse-FFN rewrite); the ``prosparse`` compile backend for inference
(substitution and the sparse rewrite) and for training (``regularize=True``: loss, penalty and
gradients); ``sparsify_ffn_``; ``export_onnx`` run in ONNX Runtime. Training setups: gradient
checkpointing, a one-process DDP wrapper, bf16. The ``drelu_*`` cells run the same paths with
dReLU (TurboSparse Sec. 3: FATReLU t on the gate and ReLU on up; t = 0 in training) against
:func:`tests.conformance.families.drelu_reference`, whose gated FFN forwards are written out by
hand.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch
from torch import nn

import prosparse_fx
from prosparse_fx import ActivationRegularizer, find_ffn_sites, relufy_, sparsify_ffn_
from prosparse_fx.capture import capture_export
from prosparse_fx.passes import SparseFFNRewritePass, SubstituteActivationPass
from tests.conformance.families import (
    ENCODERS,
    RefFATReLU,
    build,
    drelu_reference,
    reference,
)

T = 0.05  # the FATReLU threshold of every FATReLU cell
LAMBDA = 0.1
# documented tolerances, relative to the reference's largest |value|
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class ThresholdFlip(AssertionError):
    """The outputs differ beyond tolerance and the reference saw gates within 1e-4 of t: two
    correct implementations rounded a gate to different sides of the threshold."""


def ids(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(1))


@functools.cache
def sites_of(family: str) -> tuple:
    return tuple(find_ffn_sites(build(family)))


def _out(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        return _out(result[0])
    for key in ("logits", "last_hidden_state"):
        if getattr(result, key, None) is not None:
            return getattr(result, key)
    raise TypeError(f"no output tensor in {type(result).__name__}")


def _forward(model: Any, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    return _out(model(input_ids=x, **kw))


def compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Relative max difference; raises AssertionError (or :class:`ThresholdFlip`) beyond TOL."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(float(want.abs().max()), 1e-6)
    err = float((got.float() - want.float()).abs().max()) / scale
    if not err <= TOL[dtype]:
        if RefFATReLU.near:
            raise ThresholdFlip(
                f"relative difference {err:.2e} with {RefFATReLU.near} near-t gates"
            )
        raise AssertionError(f"relative difference {err:.2e} > {TOL[dtype]:.0e}")
    return err


def _reference_out(
    model: nn.Module, family: str, threshold: float | None, x: torch.Tensor, drelu: bool = False
):
    ref = (drelu_reference if drelu else reference)(model, family, threshold)
    RefFATReLU.near = 0
    with torch.no_grad():
        return _forward(ref, x)


# ----------------------------------------------------------------------------- inference paths


def relufy_relu(family: str) -> float:
    model, x = build(family), ids()
    relufy_(model, "relu", sites=sites_of(family))
    want = _reference_out(model, family, None, x)
    with torch.no_grad():
        return compare(_forward(model, x), want)


def relufy_fatrelu(family: str) -> float:
    model, x = build(family), ids()
    relufy_(model, "fatrelu", T, sites=sites_of(family))
    want = _reference_out(model, family, T, x)
    with torch.no_grad():
        return compare(_forward(model, x), want)


def relufy_drelu(family: str) -> float:
    model, x = build(family), ids()
    relufy_(model, "drelu", T, sites=sites_of(family))
    want = _reference_out(model, family, T, x, drelu=True)
    with torch.no_grad():
        return compare(_forward(model, x), want)


def graph_export(family: str, activation: str = "fatrelu") -> float:
    """capture_export, SubstituteActivationPass(FATReLU t, or dReLU with t), then
    SparseFFNRewritePass."""
    model, x = build(family), ids()
    gm = capture_export(model, {"input_ids": x} | _no_cache(model))
    SubstituteActivationPass(activation, T)(gm)
    SparseFFNRewritePass()(gm)
    want = _reference_out(model, family, T, x, drelu=activation == "drelu")
    with torch.no_grad():
        return compare(_out(gm(input_ids=x, **_no_cache(model))), want)


def compile_inference(family: str, activation: str = "fatrelu") -> float:
    """torch.compile(backend="prosparse", activation=fatrelu or drelu) under no_grad:
    substitution and the sparse rewrite (sparse_ffn="auto")."""
    model, x = build(family), ids()
    torch._dynamo.reset()
    opts = {"activation": activation, "threshold": T, "compiler": "eager"}
    compiled = torch.compile(model, backend="prosparse", options=opts)
    with torch.no_grad():
        got = _forward(compiled, x)  # a refusal comes from the first call
    return compare(got, _reference_out(model, family, T, x, drelu=activation == "drelu"))


def sparsify(family: str, activation: str = "fatrelu") -> float:
    model, x = build(family), ids()
    sites = relufy_(model, activation, T, sites=sites_of(family))
    want = _reference_out(model, family, T, x, drelu=activation == "drelu")
    sparsify_ffn_(model, sites=sites)
    with torch.no_grad():
        return compare(_forward(model, x), want)


class _Logits(nn.Module):
    """``input_ids -> logits`` (or hidden states) of an HF model, for a static-shape export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _out(self.model(input_ids=input_ids, **_no_cache(self.model)))


def onnx_export(family: str, tmp: str, activation: str = "fatrelu") -> float:
    """export_onnx (sparse FFNs, the translation to standard ONNX ops) run in ONNX Runtime. The
    cell exports ``input_ids -> logits`` with static shapes (``example_inputs``), twice as fast
    as the decoder signature with dynamic shapes, which tests/test_onnx.py covers."""
    import onnxruntime as ort

    model, x = build(family), ids()
    relufy_(model, activation, T, sites=sites_of(family))
    want = _reference_out(model, family, T, x, drelu=activation == "drelu")
    path = os.path.join(tmp, f"{family}.onnx")
    prosparse_fx.export_onnx(_Logits(model), path, example_inputs=(x,))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return compare(torch.from_numpy(got), want)


# ------------------------------------------------------------------------------ training paths


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out.float() ** 2).mean()


def _train_step(model: nn.Module, reg: ActivationRegularizer, x: torch.Tensor, call=None):
    out = _forward(call if call is not None else model, x)
    loss = _loss(out) + reg.penalty(0)
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _reference_step(
    model: nn.Module, family: str, x: torch.Tensor, dtype: torch.dtype, drelu: bool = False
):
    """Loss and gradients of the reference ReLU (or dReLU) model with the penalty computed by
    hand: lambda * sum over FFN sites of mean |x1| (hooks written here, not the library's)."""
    ref = (drelu_reference if drelu else reference)(model, family, None).to(dtype).train()
    sites = sites_of(family)
    l1: list[torch.Tensor] = []
    handles = []
    for site in sites:
        if site.expert is not None:
            raise NotImplementedError  # experts: compared against the library's eager path
        down = ref.get_submodule(site.down)
        handles.append(
            down.register_forward_pre_hook(
                lambda _m, a: l1.append(a[0].abs().mean(dtype=torch.float32))
            )
        )
    out = _forward(ref, x)
    for h in handles:
        h.remove()
    loss = _loss(out) + LAMBDA * torch.stack(l1).sum()
    loss.backward()
    grads = {n: p.grad.detach() for n, p in ref.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _compare_grads(got: dict, want: dict, dtype: torch.dtype) -> float:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    return max(compare(got[k], want[k], dtype) for k in want)


def _train_reference(
    model: nn.Module, family: str, x: torch.Tensor, dtype: torch.dtype, drelu: bool = False
):
    if family in ("mixtral", "qwen2_moe"):
        # experts have no module to hook: the eager library path (itself checked against the
        # reference's forward in the relufy cells) is the reference for the compiled one
        ref = copy.deepcopy(model).train()
        reg = ActivationRegularizer(ref, LAMBDA, sites=sites_of(family))
        return _train_step(ref, reg, x)
    return _reference_step(model, family, x, dtype, drelu)


def _train_cell(family: str, setup: str, compiled: bool, activation: str = "relu") -> float:
    """One training step in ``setup`` against the reference: loss and every gradient."""
    dtype = torch.bfloat16 if setup == "bf16" else torch.float32
    model, x = build(family).to(dtype), ids()
    relufied = copy.deepcopy(model) if compiled else model
    relufy_(relufied, activation, sites=sites_of(family))
    want_loss, want = _train_reference(relufied, family, x, dtype, activation == "drelu")
    model.train()
    if setup in ("checkpointing", "checkpointing_hook"):
        _checkpointing(model)
    if setup == "checkpointing_hook":
        _graph_break_in_ffns(model, family)
    target = _ddp(model) if setup == "ddp" else model
    taps = "graph" if compiled else "hooks"
    reg = ActivationRegularizer(model, LAMBDA, sites=sites_of(family), taps=taps)
    if compiled:
        torch._dynamo.reset()
        opts = {"activation": activation, "regularize": True, "compiler": "eager"}
        target = torch.compile(target, backend="prosparse", options=opts)
    # transformers >= 5.25 with `kernels`: a global set per attention call, which Dynamo traces
    # inside a checkpointed layer only when told to skip it in the backward (without, the layer
    # runs eagerly, and the backend refuses it: tests/test_eager_fallback.py)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        loss, got = _train_step(model, reg, x, target)
    reg.remove()
    compare(torch.tensor(loss), torch.tensor(want_loss), dtype)
    return _compare_grads(got, want, dtype)


def eager_train(family: str, setup: str = "plain") -> float:
    """relufy_ + ActivationRegularizer (hook taps), one forward/backward: loss and gradients
    against the reference. ``setup``: ``plain``, ``checkpointing`` (gradient checkpointing),
    ``checkpointing_hook`` (checkpointing, and a forward hook on each FFN that breaks Dynamo's
    graph),
    ``bf16``, ``ddp`` (a one-process gloo DistributedDataParallel wrapper)."""
    return _train_cell(family, setup, compiled=False)


def compile_train(family: str, setup: str = "plain") -> float:
    """torch.compile(backend="prosparse", activation=relu, regularize=True) on the SiLU/GELU
    model with an ActivationRegularizer(taps="graph"): loss and gradients against the
    reference."""
    return _train_cell(family, setup, compiled=True)


def _checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise prosparse_fx.InputError(f"{type(model).__name__} has no gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _graph_break_in_ffns(model: nn.Module, family: str) -> None:
    """A forward hook on the module holding each FFN's activation (inside the layer) that
    breaks Dynamo's graph (a no-op eagerly): inside an activation-checkpointed layer Dynamo then
    runs the whole layer eagerly."""
    holders = (s.activation_module or s.up for s in sites_of(family))
    for path in dict.fromkeys(p.rpartition(".")[0] for p in holders):
        model.get_submodule(path).register_forward_hook(
            lambda module, args, out: torch._dynamo.graph_break()
        )


def _ddp(model: nn.Module) -> nn.Module:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
        dist.init_process_group("gloo", rank=0, world_size=1)
    # Dynamo splits a DDP module's graph at bucket boundaries (its DDP optimizer is on)
    return nn.parallel.DistributedDataParallel(model)


def _no_cache(model: nn.Module) -> dict[str, Any]:
    import inspect

    return (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )


INFERENCE = {
    "relufy_relu": relufy_relu,
    "relufy_fatrelu": relufy_fatrelu,
    "graph_export": graph_export,
    "compile_inference": compile_inference,
    "sparsify_ffn": sparsify,
    "drelu_relufy": relufy_drelu,
    "drelu_graph_export": functools.partial(graph_export, activation="drelu"),
    "drelu_compile_inference": functools.partial(compile_inference, activation="drelu"),
    "drelu_sparsify_ffn": functools.partial(sparsify, activation="drelu"),
}
TRAINING = {
    "eager_train": eager_train,
    "compile_train": compile_train,
    "drelu_eager_train": lambda f, setup="plain": _train_cell(f, setup, False, "drelu"),
    "drelu_compile_train": lambda f, setup="plain": _train_cell(f, setup, True, "drelu"),
}
SETUPS = ("checkpointing", "checkpointing_hook", "ddp", "bf16")
__all__ = ["ENCODERS", "INFERENCE", "SETUPS", "TRAINING", "ThresholdFlip", "onnx_export"]
