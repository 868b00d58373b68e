"""The ``prosparse`` backend refuses FFN activations that Dynamo runs eagerly, outside its
graphs (:mod:`prosparse_fx.eager_fallback`): they would keep SiLU while the rest is ReLU."""

from __future__ import annotations

import copy

import pytest
import torch

from prosparse_fx import relufy_
from prosparse_fx.eager_fallback import EagerFallbackError
from tests.models import tiny

OPTS = {"activation": "relu", "compiler": "eager"}


def _break_in_mlps(model: torch.nn.Module) -> None:
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda module, args, out: torch._dynamo.graph_break())


def _loss(call, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(call(input_ids=ids, labels=ids).loss)


def test_graph_break_inside_checkpointed_layer_is_refused(ids) -> None:
    """The case that was silent: the checkpointed layers ran eagerly with SiLU (the loss was
    that of the SiLU model, 5e-4 from the ReLU one)."""
    model = tiny("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _break_in_mlps(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prosparse", options=OPTS)
    with pytest.raises(EagerFallbackError, match=r"model\.layers\.0\.\S+ .*relufy_"):
        compiled(input_ids=ids, labels=ids)


def test_recompile_limit_fallback_is_refused(ids) -> None:
    """Past the recompile limit Dynamo runs the frame eagerly: refused, not SiLU."""
    model = tiny("llama").eval()
    ref = copy.deepcopy(model)
    relufy_(ref)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prosparse", options=OPTS)
    assert _loss(compiled, ids) == pytest.approx(_loss(ref, ids), abs=1e-5)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(EagerFallbackError):
        _loss(compiled, ids[:, :5])


def test_eager_calls_of_the_model_are_not_refused(ids) -> None:
    """The watch acts only inside calls of the compiled model: the model called eagerly is
    the SiLU model, as it should be."""
    model = tiny("llama").eval()
    silu = _loss(model, ids)
    ref = copy.deepcopy(model)
    relufy_(ref)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prosparse", options=OPTS)
    assert _loss(compiled, ids) == pytest.approx(_loss(ref, ids), abs=1e-5)
    assert _loss(model, ids) == silu
    assert abs(silu - _loss(ref, ids)) > 1e-5


def test_model_in_a_compiled_function_and_module_compile_are_watched(ids) -> None:
    """The compiled model is found whether the function closes over it, or Module.compile()
    compiles the model in place."""
    model = tiny("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _break_in_mlps(model)

    def step(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, labels=x).loss

    torch._dynamo.reset()
    with pytest.raises(EagerFallbackError):
        torch.compile(step, backend="prosparse", options=OPTS)(ids)
    torch._dynamo.reset()
    model.compile(backend="prosparse", options=OPTS)
    with pytest.raises(EagerFallbackError):
        model(input_ids=ids, labels=ids)


def test_no_watch_without_substitution_or_taps(ids) -> None:
    """Without activation or regularize the backend changes nothing an eager run would not
    compute, so an eager fallback is exact and not refused."""
    model = tiny("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _break_in_mlps(model)
    want = float(model(input_ids=ids, labels=ids).loss)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prosparse", options={"compiler": "eager"})
    assert float(compiled(input_ids=ids, labels=ids).loss) == pytest.approx(want, abs=1e-6)


def test_hub_kernels_under_checkpointing_refused_then_the_way_out_is_exact(ids) -> None:
    """transformers >= 5.25 with the ``kernels`` package: each attention call sets a global,
    so Dynamo runs every checkpointed layer eagerly. Refused, naming the Dynamo setting; with
    it, the compiled model matches the ReLU reference."""
    model = tiny("llama").train()
    if not any("_kernel_funcs" in vars(m) for m in model.modules()):
        pytest.skip("this transformers does not wrap layers with the kernels package")
    ref = copy.deepcopy(model)
    relufy_(ref)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prosparse", options=OPTS)
    with pytest.raises(EagerFallbackError, match="skip_fwd_side_effects_in_bwd_under_checkpoint"):
        compiled(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        got = float(compiled(input_ids=ids, labels=ids).loss)
    assert got == pytest.approx(float(ref(input_ids=ids, labels=ids).loss), abs=1e-5)


def test_functional_activation_under_checkpointing_is_refused(ids) -> None:
    """LFM2's FFN calls F.silu (no activation module): the module holding the linears is
    watched, so its eager run inside a checkpointed layer is refused, not left SiLU."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        block_auto_adjust_ff_dim=False,
        layer_types=["full_attention", "conv"],
    )
    model = Lfm2ForCausalLM(config).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prosparse", options=OPTS)
    with pytest.raises(EagerFallbackError, match="ran eagerly inside a call"):
        compiled(input_ids=ids, labels=ids)
