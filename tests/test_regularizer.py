"""The activation regularizer: values against a hand computation, gradients, torch.compile."""

import pytest
import torch

from prosparse_fx import ActivationRegularizer, ProSparseSchedule, find_ffn_sites, relufy_
from tests.models import tiny


def _x1_by_hand(model, ids):
    """x1 of every FFN computed from the weights, without hooks: relu(gate(h)) * up(h)."""
    captured = []
    mlps = [layer.mlp for layer in model.model.layers]
    handles = [m.register_forward_hook(lambda mod, a, o: captured.append(a[0])) for m in mlps]
    model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return [torch.relu(m.gate_proj(h)) * m.up_proj(h) for m, h in zip(mlps, captured)]


def test_penalty_is_lambda_times_sum_of_mean_abs(ids) -> None:
    model = tiny("llama")
    relufy_(model)
    schedule = ProSparseSchedule.from_stages([(0.0, 2), (0.5, 4)])
    reg = ActivationRegularizer(model, schedule)
    model(input_ids=ids, use_cache=False)
    penalty = reg.penalty(step=3)
    x1s = _x1_by_hand(model, ids)
    expected = 0.5 * sum(float(x.abs().mean()) for x in x1s)
    assert float(penalty) == pytest.approx(expected, rel=1e-5)
    assert reg.last_lambda == 0.5
    zero_frac = sum(float((x == 0).float().mean()) for x in x1s) / len(x1s)
    assert reg.sparsity == pytest.approx(zero_frac)
    # gradients reach the gate and up projections
    penalty.backward()
    assert model.model.layers[0].mlp.gate_proj.weight.grad.abs().sum() > 0
    reg.remove()
    with pytest.raises(RuntimeError, match="forward pass"):
        ActivationRegularizer(model).penalty(0)


def test_penalty_averages_forwards_and_clears(ids) -> None:
    model = tiny("llama")
    relufy_(model)
    reg = ActivationRegularizer(model, 1.0, norm="token_l1")
    model(input_ids=ids[:1], use_cache=False)
    a = float(reg.l1())
    model(input_ids=ids[1:], use_cache=False)
    b = float(reg.l1())
    model(input_ids=ids[:1], use_cache=False)
    model(input_ids=ids[1:], use_cache=False)
    assert float(reg.l1()) == pytest.approx((a + b) / 2, rel=1e-5)


def test_regularizer_under_compile_fullgraph(ids) -> None:
    eager = tiny("llama")
    relufy_(eager)
    compiled_model = tiny("llama")
    relufy_(compiled_model)
    sites = find_ffn_sites(eager)
    reg_e = ActivationRegularizer(eager, 0.3, sites=sites)
    reg_c = ActivationRegularizer(compiled_model, 0.3, sites=sites)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    loss_e = eager(input_ids=ids, labels=ids, use_cache=False).loss + reg_e.penalty(1)
    loss_c = compiled(input_ids=ids, labels=ids, use_cache=False).loss + reg_c.penalty(1)
    loss_e.backward()
    loss_c.backward()
    torch._dynamo.reset()
    assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-5)
    g_e = eager.model.layers[1].mlp.gate_proj.weight.grad
    g_c = compiled_model.model.layers[1].mlp.gate_proj.weight.grad
    assert (g_e - g_c).abs().max() < 1e-5


def test_bad_norm() -> None:
    with pytest.raises(ValueError, match="normalisation"):
        ActivationRegularizer(tiny("llama"), norm="l2")  # type: ignore[arg-type]


def test_l1_is_float32_under_bf16_autocast(ids) -> None:
    """Under autocast x1 is bfloat16; the L1 term is still summed in float32, so the penalty's
    weight against the (float32) LM loss is that of a float32 run on the same x1."""
    model = tiny("llama")
    relufy_(model)
    reg = ActivationRegularizer(model, 0.5)
    seen = []
    mlp = model.model.layers[0].mlp
    h = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    h.remove()
    penalty = reg.penalty(1)
    assert seen[0].dtype == torch.bfloat16
    assert penalty.dtype == torch.float32 and loss.dtype == torch.float32
    assert reg.last_l1[0] == pytest.approx(float(seen[0].double().abs().mean()), rel=1e-6)


def _sgd_steps(ids, checkpointing, steps: int = 3, lam: float = 2.0):
    """``steps`` SGD steps of LM loss + penalty on a relufied tiny LLaMA in train mode; returns
    each step's penalty and gradients, and the final weights."""
    model = tiny("llama")
    relufy_(model)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    reg = ActivationRegularizer(model, lam)
    penalties, grads = [], []
    for step in range(steps):
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        penalty = reg.penalty(step)
        (loss + penalty).backward()
        penalties.append(float(penalty.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    reg.remove()
    return penalties, grads, dict(model.named_parameters())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_gives_the_penalty_and_gradients_of_a_plain_run(ids) -> None:
    """Checkpointing reruns each layer's forward inside the backward; the taps must not record
    that recompute (a stale, already-backwarded L1 in the next step's penalty), and the penalty's
    gradient must still reach the FFN weights."""
    ref_pen, ref_grads, ref_weights = _sgd_steps(ids, None)
    pen, grads, weights = _sgd_steps(ids, {"use_reentrant": False})
    assert pen == pytest.approx(ref_pen, rel=1e-5)
    for step, (g, r) in enumerate(zip(grads, ref_grads)):
        for name in r:
            assert (g[name] - r[name]).abs().max() < 1e-5, (step, name)
    for name, w in ref_weights.items():
        assert (weights[name] - w).abs().max() < 1e-5, name


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reentrant_gradient_checkpointing_is_refused(ids) -> None:
    """Reentrant checkpointing runs the layer under no_grad: the L1 recorded has no gradient, so
    the penalty would silently not train; the backward's recompute refuses it by name."""
    with pytest.raises(RuntimeError, match="use_reentrant.*False"):
        _sgd_steps(ids, {"use_reentrant": True}, steps=1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_taps_see_each_forward_once_under_checkpointing(ids) -> None:
    """tap_inputs calls fn once per forward (not again in the backward's recompute); measurement
    and threshold calibration on a checkpointed model in train mode are those of a plain one."""
    from prosparse_fx.measure import measure_sparsity
    from prosparse_fx.taps import down_paths, tap_inputs
    from prosparse_fx.threshold import calibrate_thresholds

    plain = tiny("llama")
    relufy_(plain)
    model = tiny("llama")
    relufy_(model)
    model.train()
    model.gradient_checkpointing_enable()
    sites = find_ffn_sites(plain)
    seen, recomputed = [], []
    with tap_inputs(
        model,
        down_paths(sites),
        lambda i, x: seen.append(i),
        on_recompute=lambda i, x: recomputed.append(i),
    ):
        model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [0, 1] and recomputed == [1, 0]
    windows = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    assert measure_sparsity(model, windows, sites=sites) == measure_sparsity(
        plain, windows, sites=sites
    )
    assert model.training
    with torch.no_grad():
        got = calibrate_thresholds(model, windows, 0.5, sites=sites)
    assert got == calibrate_thresholds(plain, windows, 0.5, sites=sites)
