"""Regressions of issue 12's graph-path cases that the conformance suite's cells do not cover:
FFNs inside activation-checkpointed regions under the compile backend (case 3), and the way out
of the DDP refusal (case 4)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from prosparse_fx import relufy_
from tests.models import tiny


def _loss_and_grads(model, call, ids):
    out = call(input_ids=ids, labels=ids)
    out.loss.backward()
    return float(out.loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compile_substitutes_inside_checkpointed_regions(ids) -> None:
    """Case 3: with gradient checkpointing, Dynamo puts each decoder layer in a higher-order-op
    body; the backend must substitute the FFN activations there too (it left them SiLU).
    transformers >= 5.25 with the ``kernels`` package sets a global in each attention call,
    which Dynamo traces inside a checkpointed layer only when told to skip it in the backward
    (without, the layer runs eagerly and is refused: tests/test_eager_fallback.py)."""
    model = tiny("llama").train()
    ref = copy.deepcopy(model)
    relufy_(ref)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="prosparse", options={"activation": "relu", "compiler": "eager"}
    )
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        loss, grads = _loss_and_grads(model, compiled, ids)
    want_loss, want = _loss_and_grads(ref, ref, ids)
    assert abs(loss - want_loss) < 1e-5
    for name in want:
        torch.testing.assert_close(grads[name], want[name], atol=1e-5, rtol=1e-5)


@pytest.fixture
def gloo():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


def test_ddp_refused_then_whole_graph_with_optimize_ddp_off(gloo, ids) -> None:
    """Case 4: under Dynamo's DDP optimizer the backend refuses, naming optimize_ddp; with
    optimize_ddp=False (the fix it names) the relufied DDP model matches eager."""
    model = tiny("llama").train()
    ref = copy.deepcopy(model)
    relufy_(ref)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opts = {"activation": "relu", "compiler": "eager"}
    torch._dynamo.reset()
    with pytest.raises(Exception, match="optimize_ddp"):
        torch.compile(ddp, backend="prosparse", options=opts)(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(optimize_ddp=False):
        compiled = torch.compile(ddp, backend="prosparse", options=opts)
        loss, grads = _loss_and_grads(model, compiled, ids)
    want_loss, want = _loss_and_grads(ref, ref, ids)
    assert abs(loss - want_loss) < 1e-5
    for name in want:
        torch.testing.assert_close(grads[name], want[name], atol=1e-5, rtol=1e-5)


class _FusedMLP(torch.nn.Module):
    """A gated FFN with one fused gate/up linear, split by slicing or ``split``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.gate_up = torch.nn.Linear(8, 32, bias=False)
        self.down = torch.nn.Linear(16, 8, bias=False)
        self.act = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        if self.how == "slice":
            gate, up = h[..., :16], h[..., 16:]
        else:
            gate, up = h.split(16, dim=-1)
        return self.down(self.act(gate) * up)


class _Block(torch.nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.mlp = _FusedMLP(how)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


@pytest.mark.parametrize("how", ["slice", "split"])
def test_fused_gate_up_split_or_sliced_is_a_gated_site(how) -> None:
    """Case 6 beyond Phi-3's chunk: the sparse rewrite on export, the compile backend and
    relufy_ equal a hand-made reference ``down(relu(x Wg^T) * (x Wu^T))``."""
    from prosparse_fx import find_ffn_sites
    from prosparse_fx.capture import capture_export
    from prosparse_fx.passes import SparseFFNRewritePass, SubstituteActivationPass

    model, x = _Block(how).eval(), torch.randn(2, 3, 8)
    w = model.mlp.gate_up.weight.detach()
    want = x + (torch.relu(x @ w[:16].T) * (x @ w[16:].T)) @ model.mlp.down.weight.detach().T
    (site,) = find_ffn_sites(model, (x,))
    assert (site.kind, site.gate_up_split, site.activation_module) == ("gated", (0, 16), "mlp.act")
    gm = capture_export(model, (x,))
    SubstituteActivationPass("relu")(gm)
    SparseFFNRewritePass()(gm)
    assert any("sparse_gated_ffn" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    opts = {"activation": "relu", "compiler": "eager"}
    with torch.no_grad():
        got = torch.compile(model, backend="prosparse", options=opts)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    relufy_(model, sites=[site])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_fsdp2_compile_hook_taps_exact_graph_taps_refused(gloo, ids) -> None:
    """FSDP2 + compile: the backend's activation option with hook taps gives the eager relufied
    model's loss, penalty and gradients; graph taps (which cannot match the unsharded weight
    copies) are refused naming the way out; finding sites on a sharded model is refused too."""
    from torch.distributed.fsdp import fully_shard

    from prosparse_fx import ActivationRegularizer, find_ffn_sites

    model = tiny("llama").train()
    ref = copy.deepcopy(model)
    relufy_(ref)
    ref_reg = ActivationRegularizer(ref, 0.1)
    want_loss = ref(input_ids=ids, labels=ids).loss + ref_reg.penalty(0)
    want_loss.backward()
    sites = find_ffn_sites(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with pytest.raises(ValueError, match="before sharding"):
        find_ffn_sites(model)
    with torch.no_grad():
        model(input_ids=ids)  # FSDP2 initialises lazily; torch.compile cannot trace that
    torch._dynamo.reset()
    graph_reg = ActivationRegularizer(model, 0.1, sites=sites, taps="graph")
    opts = {"activation": "relu", "regularize": True, "compiler": "eager"}
    with pytest.raises(Exception, match="hook taps"):
        torch.compile(model, backend="prosparse", options=opts)(input_ids=ids, labels=ids)
    graph_reg.remove()
    torch._dynamo.reset()
    reg = ActivationRegularizer(model, 0.1, sites=sites)
    compiled = torch.compile(
        model, backend="prosparse", options={"activation": "relu", "compiler": "eager"}
    )
    loss = compiled(input_ids=ids, labels=ids).loss + reg.penalty(0)
    loss.backward()
    assert abs(float(loss) - float(want_loss)) < 1e-5
    assert reg.last_l1 == pytest.approx(ref_reg.last_l1, abs=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
