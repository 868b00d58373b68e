"""The ``prosparse`` torch.compile backend: options, training equivalence with the eager
regularizer, inference with the sparse-FFN op, dynamic shapes, registration."""

import copy
import logging
import subprocess
import sys

import pytest
import torch

import prosparse_fx.backend as backend
from prosparse_fx import ActivationRegularizer, ProSparseSchedule, relufy_
from prosparse_fx.backend import BackendOptions
from tests.models import tiny


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The FX graphs the backend hands to its compiler (after its passes), in order."""
    graphs = []
    original = backend._compile

    def recording(gm, example_inputs, opts, mode, freeze=False):
        graphs.append(gm)
        return original(gm, example_inputs, opts, mode, freeze)

    monkeypatch.setattr(backend, "_compile", recording)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def _ops(gm) -> set:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_options_parse_and_reject() -> None:
    assert BackendOptions.parse(None) == BackendOptions()
    opts = BackendOptions.parse({"activation": "fatrelu", "threshold": [0.1, 0.2]})
    assert opts.threshold == (0.1, 0.2)
    with pytest.raises(ValueError, match=r"unknown prosparse backend option\(s\) \['activaton'\]"):
        BackendOptions.parse({"activaton": "relu"})
    for bad in (
        {"activation": "gelu"},
        {"activation": "fatrelu", "threshold": -0.1},
        {"activation": "fatrelu", "threshold": float("nan")},
        {"threshold": 0.2},
        {"regularize": "yes"},
        {"sparse_ffn": "always"},
        {"compiler": "tvm"},
        {"freeze": 1},
        {"sparse_ffn": 1},
    ):
        with pytest.raises(ValueError, match="valid options: activation"):
            BackendOptions.parse(bad)


def test_bad_option_raised_at_first_call(ids, compiled_graphs) -> None:
    model = tiny("llama")
    compiled = torch.compile(model, backend="prosparse", options={"activation": "swish"})
    with pytest.raises(Exception, match="bad value 'swish'.*valid options"):
        compiled(input_ids=ids)


def test_default_leaves_the_model_unchanged(ids, compiled_graphs) -> None:
    model = tiny("llama")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = torch.compile(model, backend="prosparse", options={"compiler": "eager"})(
            input_ids=ids
        ).logits
    assert torch.equal(got, expected)
    ops = set().union(*(_ops(g) for g in compiled_graphs))
    assert any("silu" in op for op in ops)
    assert not any("prosparse" in op for op in ops)


def test_no_ffn_graph_compiled_unchanged_and_said_once(caplog, compiled_graphs, monkeypatch):
    monkeypatch.setattr(backend, "_said_no_sites", False)

    def f(x):
        return torch.sin(x) * 2

    def g(x):
        return torch.cos(x) + 1

    x = torch.randn(5)
    with caplog.at_level(logging.WARNING, logger="prosparse_fx.backend"):
        assert torch.allclose(torch.compile(f, backend="prosparse")(x), f(x))
        assert torch.allclose(torch.compile(g, backend="prosparse")(x), g(x))
    said = [r for r in caplog.records if "no FFN site" in r.getMessage()]
    assert len(said) == 1
    assert len(compiled_graphs) == 2


@pytest.mark.parametrize("activation", ["relu", "fatrelu"])
def test_activation_option_matches_relufy(ids, compiled_graphs, activation) -> None:
    model = tiny("llama")
    reference = copy.deepcopy(model)
    relufy_(reference, activation, threshold=0.05)
    opts = {"activation": activation, "compiler": "eager", "sparse_ffn": False}
    if activation == "fatrelu":
        opts["threshold"] = 0.05
    with torch.no_grad():
        got = torch.compile(model, backend="prosparse", options=opts)(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5


def test_training_matches_eager_regularizer(compiled_graphs) -> None:
    """10 optimizer steps, lambda changing every step: compiled (Inductor, fullgraph) and eager
    relufied models give the same losses and gradients; no recompilation after step 1."""
    eager = tiny("llama")
    relufy_(eager, "relu")
    model = tiny("llama")  # SiLU: the backend swaps in ReLU
    eager.train()
    model.train()
    schedule = ProSparseSchedule.from_stages([(0.0, 1), (0.02, 2), (0.3, 10)])
    reg_eager = ActivationRegularizer(eager, schedule)
    reg_graph = ActivationRegularizer(model, schedule, taps="graph")
    compiled = torch.compile(
        model,
        backend="prosparse",
        fullgraph=True,
        options={"activation": "relu", "regularize": True},
    )
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    lambdas, n_compiled = [], 0
    for step in range(1, 11):
        batch = torch.randint(3, 128, (2, 12), generator=gen)
        loss_e = eager(input_ids=batch, labels=batch).loss + reg_eager.penalty(step)
        loss_c = compiled(input_ids=batch, labels=batch).loss + reg_graph.penalty(step)
        assert abs(float(loss_e) - float(loss_c)) < 1e-5, step
        assert reg_graph.last_l1 == pytest.approx(reg_eager.last_l1, abs=1e-5)
        assert reg_graph.sparsity == pytest.approx(reg_eager.sparsity, abs=1e-6)
        for opt in (opt_e, opt_c):
            opt.zero_grad()
        loss_e.backward()
        loss_c.backward()
        for (name, p_e), p_c in zip(eager.named_parameters(), model.parameters()):
            assert (p_e.grad - p_c.grad).abs().max() < 1e-5, (step, name)
        opt_e.step()
        opt_c.step()
        lambdas.append(reg_graph.last_lambda)
        if step == 1:
            n_compiled = len(compiled_graphs)
    assert len(set(lambdas)) == 10  # lambda really changed every step
    assert n_compiled == 1 and len(compiled_graphs) == 1  # no recompilation
    assert reg_graph.sparsity > 0.3


def test_regularize_without_graph_regularizer_says_how(ids, compiled_graphs) -> None:
    model = tiny("llama")
    compiled = torch.compile(
        model, backend="prosparse", options={"activation": "relu", "regularize": True}
    )
    with pytest.raises(Exception, match=r"taps='graph'\) before the first call"):
        compiled(input_ids=ids)


def test_inference_rewrites_into_sparse_op_with_dynamic_shapes(compiled_graphs) -> None:
    model = tiny("llama")
    relufy_(model, "fatrelu", threshold=0.02)
    compiled = torch.compile(model, backend="prosparse", dynamic=True)
    gen = torch.Generator().manual_seed(4)
    n_after_first = 0
    with torch.no_grad():
        for length in (5, 9, 16):
            ids = torch.randint(3, 128, (1, length), generator=gen)
            got = compiled(input_ids=ids).logits
            expected = model(input_ids=ids).logits
            assert got.shape == expected.shape
            assert (got - expected).abs().max() < 1e-4
            n_after_first = n_after_first or len(compiled_graphs)
    # one dynamic-shape compile serves all three lengths (Dynamo may restart its first analysis
    # once to make float attributes such as thresholds constants, hence "after the first call")
    assert len(compiled_graphs) == n_after_first
    ops = _ops(compiled_graphs[-1])
    assert "prosparse.sparse_gated_ffn.default" in ops
    assert not any("relu" in op and "sparse" not in op for op in ops)


def test_static_cache_updates_survive_the_rewrite(compiled_graphs) -> None:
    """The rewrite must not drop the in-place KV-cache writes of a static cache: the decoding
    step after the prompt reads them."""
    from transformers import StaticCache

    model = tiny("llama")
    relufy_(model, "fatrelu", threshold=0.02)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(5))

    def run(forward):
        cache = StaticCache(config=model.config, max_cache_len=10)
        with torch.no_grad():
            first = forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(6))
            step = forward(
                input_ids=ids[:, :1], past_key_values=cache, cache_position=torch.tensor([6])
            )
        return first.logits, step.logits

    expected = run(model)
    got = run(torch.compile(model, backend="prosparse", options={"compiler": "eager"}))
    assert "prosparse.sparse_gated_ffn.default" in _ops(compiled_graphs[0])
    for g, e in zip(got, expected):
        assert (g - e).abs().max() < 1e-5


def test_training_mode_keeps_dense_ffn(ids, compiled_graphs) -> None:
    model = tiny("llama")
    relufy_(model, "relu")
    torch.compile(model, backend="prosparse", options={"compiler": "eager"})(input_ids=ids)
    assert not any("prosparse.sparse" in op for op in _ops(compiled_graphs[0]))


def test_sparse_ffn_true_with_autograd_refused(ids, compiled_graphs) -> None:
    model = tiny("llama")
    relufy_(model, "relu")
    compiled = torch.compile(
        model, backend="prosparse", options={"sparse_ffn": True, "compiler": "eager"}
    )
    with pytest.raises(Exception, match="no backward.*torch.no_grad"):
        compiled(input_ids=ids)


def test_sparse_ffn_true_on_silu_refused(ids, compiled_graphs) -> None:
    compiled = torch.compile(tiny("llama"), backend="prosparse", options={"sparse_ffn": True})
    with torch.no_grad(), pytest.raises(Exception, match="Relufy the model"):
        compiled(input_ids=ids)


def test_backend_resolves_through_entry_point_without_import() -> None:
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: x * 3, backend='prosparse')\n"
        "assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))\n"
        "print('prosparse_fx' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "True"  # torch loaded the package through the entry point


def test_register_is_idempotent() -> None:
    backend.register()
    backend.register()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("prosparse") is backend.prosparse_backend


@pytest.mark.slow
def test_smollm2_compiled_logits_equal_eager(smollm2, compiled_graphs) -> None:
    """The real model relufied: the ``prosparse`` backend (Inductor) rewrites every FFN into the
    sparse op and its logits equal eager's. (ReLU here: an untrained FATReLU model has gate
    values within float rounding of t, where the function jumps by t * up; the benchmark
    bench_compile.py measures the main job's trained FATReLU model.)"""
    base, tok = smollm2
    model = copy.deepcopy(base).eval()
    relufy_(model, "relu")
    ids = tok("The river flows through the old town and into the sea.", return_tensors="pt")
    compiled = torch.compile(model, backend="prosparse")
    with torch.no_grad():
        expected = model(input_ids=ids.input_ids, use_cache=False).logits
        got = compiled(input_ids=ids.input_ids, use_cache=False).logits
    # the untrained ReLU model's activations are large (perplexity ~5000): Inductor's frozen,
    # reordered float32 arithmetic moves its logits by up to ~2e-5 of their range through 30
    # layers, so the bound is relative (the trained model: bench_compile.py, 4.8e-5 absolute)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    ops = [str(n.target) for n in compiled_graphs[-1].graph.nodes if n.op == "call_function"]
    assert ops.count("prosparse.sparse_gated_ffn.default") == model.config.num_hidden_layers


def test_drelu_inference_with_inductor(compiled_graphs) -> None:
    """A dReLU model (relufy_ "drelu", t = 0.02) compiled with Inductor under no_grad: every FFN
    is one sparse op with up_relu=True, logits equal eager over three lengths of one
    dynamic-shape compile; the activation option "drelu" on the SiLU model gives the same."""
    model = tiny("llama")
    base = tiny("llama")
    relufy_(model, "drelu", threshold=0.02)
    compiled = torch.compile(model, backend="prosparse", dynamic=True)
    from_silu = torch.compile(
        base, backend="prosparse", options={"activation": "drelu", "threshold": 0.02}
    )
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for length in (5, 9, 16):
            ids = torch.randint(3, 128, (2, length), generator=gen)
            expected = model(input_ids=ids).logits
            assert (compiled(input_ids=ids).logits - expected).abs().max() < 1e-4
        assert (from_silu(input_ids=ids).logits - expected).abs().max() < 1e-4
    graph = next(g for g in compiled_graphs if "prosparse.sparse_gated_ffn.default" in _ops(g))
    calls = [n for n in graph.graph.nodes if "sparse_gated_ffn" in str(n.target)]
    assert len(calls) == 2 and all(n.args[5] is True for n in calls)


def test_two_compiled_instances_each_feed_their_own_regularizer() -> None:
    """Dynamo reuses one compiled graph for a second instance of the same module class; its
    graph taps must reach the second instance's regularizer, not the first's (found while
    benchmarking eager against compiled training: the second model's L1 went to the first)."""
    from prosparse_fx import find_ffn_sites

    base = tiny("llama")
    relufy_(base, "relu", sites=find_ffn_sites(base))
    a, b = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.5)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = {}
    for name, model in (("a", a), ("b", b)):  # eager hook taps: the reference
        hooks = ActivationRegularizer(model, 1.0)
        model(input_ids=ids, labels=ids)
        expected[name] = float(hooks.penalty(1))
        hooks.remove()
    assert abs(expected["a"] - expected["b"]) > 1e-4
    regs = {n: ActivationRegularizer(m, 1.0, taps="graph") for n, m in (("a", a), ("b", b))}
    opts = {"regularize": True}
    ca = torch.compile(a, backend="prosparse", fullgraph=True, options=opts)
    cb = torch.compile(b, backend="prosparse", fullgraph=True, options=opts)
    for name, compiled in (("a", ca), ("b", cb), ("a", ca)):
        compiled(input_ids=ids, labels=ids)
        assert float(regs[name].penalty(1)) == pytest.approx(expected[name], rel=1e-5), name
        other = regs["b" if name == "a" else "a"]
        with pytest.raises(RuntimeError, match="no activations recorded"):
            other.penalty(1)  # nothing leaked to the other instance's regularizer
