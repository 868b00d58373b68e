"""Training-free peers (CATS, TEAL-style): hand-checked thresholds and outputs, measured sparsity
against the target, exact removal, refusals, the paths that cannot keep them, and a smoke run of
benchmarks/bench_frontier.py."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from prosparse_fx import evaluate, find_ffn_sites, relufy_, sparsify_ffn_
from prosparse_fx.ffn import FFNSite
from prosparse_fx.peers import (
    PeerHooksError,
    apply_cats_,
    apply_teal_,
    calibrate_peer,
    check_no_peers,
    install_peer_,
    peer_hooks,
    quantile_threshold,
    remove_peers_,
)
from prosparse_fx.taps import down_paths, tap_inputs
from tests.models import tiny

APPLY = {"cats": apply_cats_, "teal": apply_teal_}


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------- by hand


def test_quantile_threshold_by_hand() -> None:
    v = torch.tensor([0.1, -0.5, 0.3, 0.2, -0.05])  # |v| sorted: 0.05 0.1 0.2 0.3 0.5
    assert quantile_threshold(v, 0.0) == 0.0  # nothing below 0
    assert quantile_threshold(v, 0.4) == pytest.approx(0.2)  # k = 2: 0.05, 0.1 below
    assert quantile_threshold(v, 0.6) == pytest.approx(0.3)  # k = 3
    assert quantile_threshold(v, 0.95) > 0.5  # k = 5: every entry below t
    assert (v.abs() < quantile_threshold(v, 0.95)).all()
    with pytest.raises(ValueError, match="no values"):
        quantile_threshold(torch.empty(0), 0.5)


class HandFFNModel(nn.Module):
    """``input_ids -> mlp(embed(ids))``: hidden size 1, embedding of token i is ``i + 1``;
    ``gate = [e, e]``, ``act = ReLU``, ``up = [e, -e]``, so ``act(gate) = [e, e]``,
    ``x1 = [e^2, -e^2]`` and ``y = down(x1) = e^2 - 2 e^2 = -e^2``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 1)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(1, 2, bias=False)
        self.mlp.up = nn.Linear(1, 2, bias=False)
        self.mlp.down = nn.Linear(2, 1, bias=False)
        self.mlp.act = nn.ReLU()
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
            self.mlp.gate.weight.copy_(torch.tensor([[1.0], [1.0]]))
            self.mlp.up.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.mlp.down.weight.copy_(torch.tensor([[1.0, 2.0]]))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        m = self.mlp
        return m.down(m.act(m.gate(h)) * m.up(h))


HAND_SITE = FFNSite(
    path="mlp", kind="gated", gate="mlp.gate", up="mlp.up", down="mlp.down", activation="relu",
    activation_module="mlp.act", threshold=0.0, hidden_size=1, intermediate_size=2,
)  # fmt: skip
HAND_IDS = torch.tensor([[0, 1, 2, 3]])  # embeddings 1, 2, 3, 4


@pytest.mark.parametrize(
    "method, target, threshold, out",
    [
        # |act(gate)| = 1 1 2 2 3 3 4 4; k = 4 -> t = 3: tokens 1 and 2 (e = 1, 2) are zeroed
        ("cats", 0.5, 3.0, [0.0, 0.0, -9.0, -16.0]),
        # |x1| = 1 1 4 4 9 9 16 16; k = 4 -> t = 9
        ("teal", 0.5, 9.0, [0.0, 0.0, -9.0, -16.0]),
        # k = 2 -> t = 4: only e = 1 is zeroed
        ("teal", 0.25, 4.0, [0.0, -4.0, -9.0, -16.0]),
        # |act(gate)| k = 6 -> t = 4: e = 1, 2, 3 zeroed
        ("cats", 0.75, 4.0, [0.0, 0.0, 0.0, -16.0]),
    ],
)
def test_thresholds_and_outputs_by_hand(method, target, threshold, out) -> None:
    model = HandFFNModel()
    with torch.no_grad():
        assert model(HAND_IDS).flatten().tolist() == [-1.0, -4.0, -9.0, -16.0]
    ts = APPLY[method](model, HAND_IDS, target, [HAND_SITE])
    assert ts == [threshold]
    with torch.no_grad():
        assert model(HAND_IDS).flatten().tolist() == out
    report = evaluate(model, HAND_IDS, sites=[HAND_SITE], with_loss=False).sparsity
    assert report.per_layer == [pytest.approx(out.count(0.0) / 4)]
    assert peer_hooks(model) == [
        {
            "module": "mlp.act" if method == "cats" else "mlp.down",
            "site": "mlp",
            "method": method,
            "threshold": threshold,
        }
    ]
    assert remove_peers_(model) == 1
    with torch.no_grad():
        assert model(HAND_IDS).flatten().tolist() == [-1.0, -4.0, -9.0, -16.0]


def test_cats_matches_hand_computation_on_llama(calib) -> None:
    """Layer 0 of a tiny LLaMA: the threshold is the quantile of |silu(gate)| taken by sorting,
    and the MLP output is down((silu(gate) zeroed below t) * up)."""
    model = tiny("llama")
    mlp = model.model.layers[0].mlp
    seen: dict[str, torch.Tensor] = {}
    handle = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    x = seen["x"].detach()
    s = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T).detach()
    values = s.abs().flatten().sort().values
    k = round(0.7 * values.numel())
    ts = apply_cats_(model, calib, 0.7, batch_size=len(calib))
    assert ts[0] == float(values[k])
    expected = (s.masked_fill(s.abs() < ts[0], 0.0) * (x @ mlp.up_proj.weight.T)) @ (
        mlp.down_proj.weight.T
    )
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)
    remove_peers_(model)


# --------------------------------------------------------------------------- measured sparsity


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("method", ["cats", "teal"])
def test_measured_sparsity_reaches_target_on_calibration(family, method, calib) -> None:
    target = 0.8
    model = tiny(family)
    sites = find_ffn_sites(model)
    assert evaluate(model, calib, sites=sites, with_loss=False).sparsity.sparsity == 0.0
    APPLY[method](model, calib, target, sites)
    report = evaluate(model, calib, sites=sites, with_loss=False).sparsity
    n = calib.numel() * sites[0].intermediate_size
    # the first layer sees the inputs it was calibrated on: exactly k of n entries
    assert report.per_layer[0] == pytest.approx(round(target * n) / n, abs=2 / n)
    # later layers see inputs changed by the zeros above them: close to the target
    assert report.sparsity == pytest.approx(target, abs=0.02)


def test_evaluate_taps_see_the_zeros_whatever_the_hook_order(calib) -> None:
    """A tap registered before the peer (the regularizer's, a measurement's) still sees the
    peer's zeros: the TEAL hook runs first."""
    model = tiny("llama")
    sites = find_ffn_sites(model)
    ts = calibrate_peer(model, "teal", calib, 0.8, sites)
    zeros: list[float] = []
    with tap_inputs(model, down_paths(sites), lambda i, x: zeros.append(float((x == 0).mean(dtype=torch.float32)))):  # fmt: skip  # noqa: E501
        install_peer_(model, "teal", ts, sites)
        with torch.no_grad():
            model(input_ids=calib)
    assert zeros[0] == pytest.approx(0.8, abs=1e-3)


# --------------------------------------------------------------------------- removal


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["cats", "teal"])
def test_removal_restores_outputs_exactly(family, method, calib) -> None:
    model = tiny(family)
    with torch.no_grad():
        before = model(input_ids=calib).logits
    APPLY[method](model, calib, 0.7)
    with torch.no_grad():
        during = model(input_ids=calib).logits
    assert not torch.equal(before, during)
    clone = copy.deepcopy(model)
    assert remove_peers_(model) == 2 and peer_hooks(model) == []
    assert remove_peers_(model) == 0
    assert remove_peers_(clone) == 2  # a deep copy carries its own hooks; they come off too
    with torch.no_grad():
        assert torch.equal(model(input_ids=calib).logits, before)
        assert torch.equal(clone(input_ids=calib).logits, before)
    check_no_peers(model, "unused")  # nothing left


# --------------------------------------------------------------------------- refusals


def test_bad_inputs_are_refused(calib) -> None:
    model = tiny("llama")
    sites = find_ffn_sites(model)
    for target in (-0.1, 1.0, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="target sparsity"):
            apply_cats_(model, calib, target, sites)
    with pytest.raises(ValueError, match="no FFN sites"):
        apply_teal_(model, calib, 0.5, [])
    for bad in (calib[0], calib.float(), calib[:0]):
        with pytest.raises(ValueError, match="calibration windows"):
            apply_teal_(model, bad, 0.5, sites)
    with pytest.raises(ValueError, match="unknown peer method"):
        install_peer_(model, "deja-vu", 0.1, sites)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        install_peer_(model, "teal", -1.0, sites)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        install_peer_(model, "teal", [0.1, math.inf], sites)
    with pytest.raises(ValueError, match="give one per site"):
        install_peer_(model, "teal", [0.1], sites)
    functional = [s.__class__(**{**s.to_dict(), "activation_module": None}) for s in sites]
    with pytest.raises(ValueError, match="function call"):
        apply_cats_(model, calib, 0.5, functional)
    assert peer_hooks(model) == []  # nothing was installed by the refused calls
    apply_cats_(model, calib, 0.5, sites)
    with pytest.raises(PeerHooksError, match="remove_peers_"):
        apply_teal_(model, calib, 0.5, sites)  # a second peer on top of the first
    # the hooks hide the FFN pattern from capture: the refusal says so and gives the way out
    from prosparse_fx import FFNNotFoundError, evaluate

    with pytest.raises(FFNNotFoundError, match="peer hooks.*find the sites before"):
        evaluate(model, calib)
    assert evaluate(model, calib, sites=sites).sparsity.sparsity > 0.4  # sites given: measured


# --------------------------------------------------------------------------- other paths


def test_sparsify_ffn_refuses_peer_hooks(calib) -> None:
    model = tiny("llama")
    sites = relufy_(model)
    apply_teal_(model, calib, 0.8, sites)
    with pytest.raises(PeerHooksError, match="sparse-FFN rewrite"):
        sparsify_ffn_(model, sites=sites)
    remove_peers_(model)
    sparsify_ffn_(model, sites=sites)


def test_export_onnx_dense_computes_peers_and_sparse_refuses(calib, tmp_path) -> None:
    """A dense export traces the hooks (torch.export runs them): the file computes the peer. A
    sparse export would rewrite the FFNs they change: refused, naming the hooks."""
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    from prosparse_fx.onnx import export_onnx

    model = tiny("llama")
    apply_cats_(model, calib, 0.8)
    ids = calib[:2, :8]
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    path = export_onnx(model, tmp_path / "dense.onnx", sparse=False, kv_cache=False)
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    relu = tiny("llama")
    sites = relufy_(relu)
    for method in ("cats", "teal"):
        APPLY[method](relu, calib, 0.8, sites)
        with pytest.raises(PeerHooksError, match="sparse export"):
            export_onnx(relu, tmp_path / "sparse.onnx", kv_cache=False)
        remove_peers_(relu)
    assert not (tmp_path / "sparse.onnx").exists()


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_compile_backend_computes_peers(method, calib) -> None:
    """Dynamo traces the hooks: the compiled model computes the peers (its FFNs, no longer
    matched as sites, are compiled as they are)."""
    torch._dynamo.reset()
    model = tiny("llama")
    relufy_(model)
    APPLY[method](model, calib, 0.8)
    with torch.no_grad():
        expected = model(input_ids=calib).logits
        compiled = torch.compile(model, backend="prosparse", options={"compiler": "eager"})
        torch.testing.assert_close(compiled(input_ids=calib).logits, expected)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- benchmark smoke


def _bench_frontier():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_frontier.py"
    spec = importlib.util.spec_from_file_location("bench_frontier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite(value) -> bool:  # noqa: ANN001
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_bench_frontier_quick(tmp_path) -> None:
    """--quick with a tiny base model and a tiny FATReLU 'run' folder: the JSON has every curve
    and text, finite values, ratios against the base, and the PNG is written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prosparse_fx.models import load_tokenizer, model_folder

    bench = _bench_frontier()
    tok = load_tokenizer(model_folder(None))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    relufy_(base, "fatrelu", 0.05)
    base.save_pretrained(tmp_path / "run")
    tok.save_pretrained(tmp_path / "run")
    settings = {"seq_len": 32, "seed": 0, "eval_windows": 2, "calib_windows": 2, "batch_size": 2}
    report = {"status": "done", "config": settings, "data": bench.DEFAULT_DATA_LABEL}
    (tmp_path / "run" / "report.json").write_text(json.dumps(report))
    out = tmp_path / "results" / "frontier.json"
    bench.main(
        ["--quick", "--model", str(tmp_path / "base"), "--run", f"toy={tmp_path / 'run'}",
         "--targets", "0.5", "0.9", "--out-json", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert _finite(result)
    texts = ["wikipedia", "shakespeare", "python-docs"]
    assert [t for t in result["texts"] if t != "calibration"] == texts
    assert set(result["base"]) == set(texts)
    assert [c["label"] for c in result["curves"]] == ["CATS", "TEAL", "toy"]
    for curve in result["curves"]:
        targets = [p["target"] for p in curve["points"]]
        trained = curve["kind"] == "trained"
        assert targets == ([None, 0.5, 0.9, 0.5, 0.9] if trained else [0.5, 0.9])
        if trained:  # per layer, then one t per model (all layers equal)
            scopes = [p["scope"] for p in curve["points"]]
            assert scopes == ["own", "layer", "layer", "model", "model"]
            assert all(len(set(p["thresholds"])) == 1 for p in curve["points"][3:])
        for p in curve["points"]:
            assert len(p["thresholds"]) == 2
            for name in texts:
                m = p["texts"][name]
                assert 0.0 <= m["sparsity"] <= 1.0
                ratio = m["perplexity"] / result["base"][name]["perplexity"]
                assert m["perplexity_ratio"] == pytest.approx(ratio)
    cats = result["curves"][0]["points"]
    assert cats[1]["texts"]["wikipedia"]["sparsity"] > cats[0]["texts"]["wikipedia"]["sparsity"]
    toy = result["curves"][2]
    assert toy["points"][0]["thresholds"] == [pytest.approx(0.05)] * 2
    assert result["windows"]["seq_len"] == 32 and result["machine"]["cpu_count"] >= 1
