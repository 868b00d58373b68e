"""ONNX export: the sparse-FFN translation against the dense reference in ONNX Runtime, the
KV-cache decoder against the torch model, the runner, the CLI and bad input."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from prosparse_fx import relufy_
from prosparse_fx.cli import app
from prosparse_fx.errors import InputError
from prosparse_fx.kernels.reference import gated_ffn_reference, plain_ffn_reference
from prosparse_fx.onnx import (
    DEFAULT_CROSSOVER,
    CacheLayout,
    OnnxCausalLM,
    ONNXExportError,
    export_onnx,
    translation_table,
)
from prosparse_fx.sparse_modules import NotSparseError
from tests.models import tiny

runner = CliRunner()


class _FFN(nn.Module):
    """One sparse-FFN op with random weights (d=8, d_ff=24)."""

    def __init__(self, kind: str, threshold: float, bias: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kind, self.threshold = kind, threshold
        self.w1 = nn.Parameter(torch.randn(24, 8, generator=g) / 3)
        self.w_up = nn.Parameter(torch.randn(24, 8, generator=g) / 3)
        self.w2_t = nn.Parameter(torch.randn(24, 8, generator=g) / 5)
        self.b1 = nn.Parameter(torch.randn(24, generator=g)) if bias else None
        self.b2 = nn.Parameter(torch.randn(8, generator=g)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return torch.ops.prosparse.sparse_gated_ffn(
                x, self.w1, self.w_up, self.w2_t, self.threshold
            )
        return torch.ops.prosparse.sparse_plain_ffn(
            x, self.w1, self.b1, self.w2_t, self.b2, self.threshold
        )

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return gated_ffn_reference(x, self.w1, self.w_up, self.w2_t, self.threshold)
        return plain_ffn_reference(x, self.w1, self.b1, self.w2_t, self.b2, self.threshold)


def _export_ffn(module: nn.Module, path, crossover: float) -> ort.InferenceSession:
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.onnx.export(
        module,
        (torch.randn(2, 3, 8),),
        dynamo=True,
        dynamic_shapes=(dims,),
        custom_translation_table=translation_table(crossover),
        verbose=False,
    )
    program.save(path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
    assert {"If", "NonZero", "Gather"} <= _op_types(proto.graph)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _op_types(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and of its subgraphs (If branches)."""
    types = set()
    for node in graph.node:
        types.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                types |= _op_types(attr.g)
    return types


INPUTS = {
    "one token": lambda: torch.randn(1, 1, 8),
    "batch of sequences": lambda: torch.randn(2, 3, 8),
    "odd shape": lambda: torch.randn(5, 7, 8),
    # empty inputs keep their shape, as in torch (Reshape's default reads a 0 in the target
    # shape as "copy the input's dim": [2, 0, 8] failed, [0, 0, 8] came back as [0, 8, 8])
    "zero-length sequence": lambda: torch.randn(2, 0, 8),
    "zero-size batch": lambda: torch.randn(0, 3, 8),
    "empty batch and sequence": lambda: torch.randn(0, 0, 8),
    "all zero x1": lambda: -50 * torch.ones(1, 2, 8) - torch.rand(1, 2, 8),
}


@pytest.mark.parametrize("crossover", [0.0, DEFAULT_CROSSOVER, 1.0])  # dense, default, sparse
@pytest.mark.parametrize(
    "kind,threshold,bias",
    [("gated", 0.0, True), ("gated", 0.3, True), ("plain", 0.2, True), ("plain", 0.0, False)],
)
def test_translation_matches_reference(tmp_path, kind, threshold, bias, crossover) -> None:
    module = _FFN(kind, threshold, bias)
    session = _export_ffn(module, tmp_path / "ffn.onnx", crossover)
    name = session.get_inputs()[0].name
    for label, make in INPUTS.items():
        x = make()
        if label == "all zero x1" and kind == "plain":
            x = x * 0  # x1 = FATReLU(b1) then: make the bias drop everything instead
            with torch.no_grad():
                module.b1 = None if module.b1 is None else nn.Parameter(-torch.ones(24) - 1)
            session = _export_ffn(module, tmp_path / "ffn0.onnx", crossover)
        (y,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = module.reference(x).numpy()
            assert module(x).shape == expected.shape, label  # the op itself, in torch
        assert y.shape == expected.shape, label
        # float32 rounding scales with the magnitudes summed ("all zero x1" has |x| ~ 50 and
        # outputs ~ 2500, where one ulp is 2.4e-4)
        atol = 1e-5 * max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=atol, err_msg=label)


def test_chunked_translation_matches_reference(tmp_path, monkeypatch) -> None:
    """Large FFNs gather their active rows in 4 chunks: exactly 0, 1, 2, 3, 5, 13 and all 24
    neurons active (uneven and empty chunks)."""
    import prosparse_fx.onnx.translation as translation

    monkeypatch.setattr(translation, "CHUNKED_ABOVE", 0)  # chunk even this small FFN
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(5))
    module = _FFN("gated", 0.0)
    with torch.no_grad():  # flip gate rows so that every gate value is positive
        module.w1.mul_(torch.sign(x @ module.w1.T).reshape(24, 1))
    gate = (x @ module.w1.T).flatten().sort(descending=True).values
    for active in (0, 1, 2, 3, 5, 13, 24):
        # a threshold between the active-th and the next gate value keeps exactly `active`
        if active == 0:
            module.threshold = float(gate[0]) + 1.0
        elif active == 24:
            module.threshold = 0.0
        else:
            module.threshold = float(gate[active - 1] + gate[active]) / 2
        session = _export_ffn(module, tmp_path / f"ffn{active}.onnx", crossover=1.0)
        assert _op_types(onnx.load(tmp_path / f"ffn{active}.onnx").graph) >= {"Slice", "Sum"}
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            kept = int((x @ module.w1.T >= module.threshold).sum())
            expected = module.reference(x).numpy()
        assert kept == active
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6, err_msg=str(active))
        for empty in ((2, 0, 8), (0, 3, 8)):  # no tokens: every chunk is empty
            (y,) = session.run(None, {session.get_inputs()[0].name: np.zeros(empty, np.float32)})
            assert y.shape == empty, (active, empty)


@pytest.mark.parametrize("crossover", [0.0, 1.0])
def test_translation_propagates_nan(tmp_path, crossover) -> None:
    module = _FFN("gated", 0.1)
    session = _export_ffn(module, tmp_path / "ffn.onnx", crossover)
    x = torch.randn(1, 2, 8)
    x[0, 1, 3] = float("nan")
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, 0]).all()


def _hand_drelu(x: torch.Tensor, module: _FFN) -> torch.Tensor:
    """dReLU FFN written out (TurboSparse Sec. 3): (FATReLU_t(gate) * ReLU(up)) @ w_down_t."""
    g, u = x @ module.w1.T, x @ module.w_up.T
    return (g * (g >= module.threshold) * (u * (u > 0))) @ module.w2_t


class _DReLU(_FFN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.prosparse.sparse_gated_ffn(
            x, self.w1, self.w_up, self.w2_t, self.threshold, True
        )


@pytest.mark.parametrize("crossover", [0.0, DEFAULT_CROSSOVER, 1.0])  # dense, default, sparse
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_drelu_translation_matches_hand_reference(tmp_path, threshold, crossover) -> None:
    """The dReLU op in ONNX Runtime against the dense dReLU FFN written out, every input of the
    gated tests (one token, batches, zero-length, all-zero x1); the sparse branch gathers the
    down rows of the neurons whose x1 is nonzero (a second NonZero)."""
    module = _DReLU("gated", threshold)
    session = _export_ffn(module, tmp_path / "drelu.onnx", crossover)
    name = session.get_inputs()[0].name
    for label, make in INPUTS.items():
        x = make()
        (y,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = _hand_drelu(x, module).numpy()
        assert y.shape == expected.shape, label
        atol = 1e-5 * max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=atol, err_msg=label)
    x = torch.randn(1, 2, 8)
    x[0, 1, 3] = float("nan")
    (y,) = session.run(None, {name: x.numpy()})
    assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, 0]).all()


def test_drelu_model_exports_and_matches_torch(tmp_path) -> None:
    """A tiny LLaMA relufied with dReLU (t = 0.05), exported sparse with its KV cache: every
    FFN is one op with up_relu, and ONNX Runtime's logits equal torch's."""
    model = tiny("llama")
    relufy_(model, "drelu", 0.05)
    path = export_onnx(model, tmp_path / "drelu.onnx", crossover=1.0)
    graph = onnx.load(path).graph
    assert sum(n.op_type == "NonZero" for n in _all_nodes(graph)) >= 4  # two per FFN
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    logits, _ = OnnxCausalLM(path).forward(ids.numpy(), np.ones((2, 5), np.int64))
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-5)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


def test_translation_rejects_bad_crossover() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        translation_table(1.5)


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    """A tiny FATReLU LLaMA exported with its KV cache (always-sparse FFNs)."""
    model = tiny("llama")
    relufy_(model, "fatrelu", 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "llama.onnx", crossover=1.0)
    after = model.state_dict()
    assert before.keys() == after.keys()  # the user's model keeps its down_proj weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training  # still in the mode it was given in
    return model, path


def test_exported_file_is_standard_onnx(llama_onnx) -> None:
    model, path = llama_onnx
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
    assert "If" in _op_types(proto.graph)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["prosparse.sparse"] == "true" and meta["prosparse.thresholds"] == "0.05,0.05"
    layout = CacheLayout.of(model)
    assert [i.name for i in proto.graph.input] == layout.input_names()
    assert [o.name for o in proto.graph.output] == layout.output_names()
    dims = proto.graph.input[3].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 2, "past", 8]


def test_cached_decoding_matches_torch(llama_onnx) -> None:
    model, path = llama_onnx
    lm = OnnxCausalLM(path)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    out = lm.generate(ids.numpy(), max_new_tokens=6)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        full = model(input_ids=torch.from_numpy(out)).logits.numpy()
    np.testing.assert_array_equal(out, expected.numpy())
    # prompt, then one token per call with the cache: every step's logits against torch
    mask = np.ones((2, 5), np.int64)
    logits, past = lm.forward(out[:, :5], mask)
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-5)
    for i in range(5, out.shape[1] - 1):
        mask = np.ones((2, i + 1), np.int64)
        logits, past = lm.forward(out[:, i : i + 1], mask, past=past)
        assert past[0].shape == (2, 2, i + 1, 8)
        np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5)


def test_left_padded_batch_matches_unpadded_rows(llama_onnx) -> None:
    _, path = llama_onnx
    lm = OnnxCausalLM(path)
    short = np.array([[5, 9, 17]])
    long = np.array([[40, 41, 42, 43, 44]])
    batch = np.array([[0, 0, 5, 9, 17], [40, 41, 42, 43, 44]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = lm.generate(batch, 4, attention_mask=mask)
    np.testing.assert_array_equal(out[0, 2:], lm.generate(short, 4)[0])
    np.testing.assert_array_equal(out[1], lm.generate(long, 4)[0])


def test_generate_stops_at_eos_and_checks_input(llama_onnx) -> None:
    _, path = llama_onnx
    lm = OnnxCausalLM(path)
    prompt = np.array([[5, 9, 17]])
    free = lm.generate(prompt, 5)
    eos = int(free[0, 4])  # the second generated token
    stopped = lm.generate(prompt, 5, eos_token_id=eos)
    np.testing.assert_array_equal(stopped, free[:, :5])
    np.testing.assert_array_equal(lm.generate(prompt, 0), prompt)
    with pytest.raises(InputError, match="max_new_tokens"):
        lm.generate(prompt, -1)
    with pytest.raises(InputError, match=r"\[batch, prompt\]"):
        lm.generate(np.array([1, 2]), 2)
    with pytest.raises(InputError, match="whole number"):
        lm.generate(prompt, 2.5)
    with pytest.raises(InputError, match=r"shape of input_ids \[1, 3\]"):
        lm.generate(prompt, 2, attention_mask=np.ones((1, 5)))
    with pytest.raises(InputError, match="at least one 1"):
        lm.generate(prompt, 2, attention_mask=np.zeros((1, 3)))
    with pytest.raises(InputError, match="integer token ids"):
        lm.generate(np.array([[1.7, 2.2]]), 2)
    with pytest.raises(InputError, match="pad on the left"):
        lm.generate(np.array([[5, 9, 0]]), 2, attention_mask=np.array([[1, 1, 0]]))
    for bad in (-5, 128):  # the tiny model's vocabulary is 128
        with pytest.raises(InputError, match=r"\[0, 128\)"):
            lm.generate(np.array([[5, bad]]), 2)


def test_dense_export_and_external_data_agree(llama_onnx, tmp_path) -> None:
    model, sparse_path = llama_onnx
    path = export_onnx(model, tmp_path / "dense.onnx", sparse=False, external_data=True)
    # the weights file has a fresh name each export, so a kill never pairs old and new
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "dense.onnx", names
    assert re.fullmatch(r"dense\.onnx\.[0-9a-f]{8}\.data", names[1])
    assert (tmp_path / names[1]).stat().st_size > 10_000
    assert "If" not in _op_types(onnx.load(path, load_external_data=False).graph)
    prompt = np.array([[5, 9, 17, 3]])
    np.testing.assert_array_equal(
        OnnxCausalLM(path).generate(prompt, 5), OnnxCausalLM(sparse_path).generate(prompt, 5)
    )
    # re-exported inline over it: the old weights file goes with the old model
    export_onnx(model, tmp_path / "dense.onnx", sparse=False, overwrite=True, external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx"]
    np.testing.assert_array_equal(
        OnnxCausalLM(tmp_path / "dense.onnx").generate(prompt, 5),
        OnnxCausalLM(sparse_path).generate(prompt, 5),
    )


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_decoders_export_with_cache(tmp_path, family) -> None:
    model = tiny(family)
    relufy_(model, "fatrelu", 0.02)
    lm = OnnxCausalLM(export_onnx(model, tmp_path / "m.onnx", crossover=1.0))
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    np.testing.assert_array_equal(lm.generate(ids.numpy(), 5), expected.numpy())


def test_encoder_exports_without_cache(tmp_path) -> None:
    model = tiny("bert")
    relufy_(model, "relu")
    path = export_onnx(model, tmp_path / "bert.onnx", kv_cache=False, crossover=1.0)
    assert not model.training
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    (hidden,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    np.testing.assert_allclose(hidden, expected.numpy(), atol=1e-5)


def test_zero_length_inputs_of_a_whole_model(tmp_path, llama_onnx) -> None:
    """The FFN ops take empty inputs (above), but a whole Hugging Face model does not, in torch
    itself: its attention reshapes with an inferred dim that 0 elements leave ambiguous. The
    exported file fails the same way for a zero-length sequence (not a silent wrong shape), an
    empty batch gives empty logits, and the runner refuses both by name."""
    model = tiny("llama")
    relufy_(model, "fatrelu", 0.05)
    path = export_onnx(model, tmp_path / "nocache.onnx", kv_cache=False, crossover=1.0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(6))
    for shape in ((2, 0), (0, 3)):  # torch, with the inputs the export takes
        empty = ids[: shape[0], : shape[1]]
        with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
            with torch.no_grad():
                model(input_ids=empty, attention_mask=torch.ones_like(empty), use_cache=False)
    with pytest.raises(Exception, match="Reshape"):
        session.run(None, {"input_ids": ids[:, :0].numpy(), "attention_mask": ids[:, :0].numpy()})
    empty = ids[:0].numpy()
    (logits,) = session.run(None, {"input_ids": empty, "attention_mask": np.ones_like(empty)})
    assert logits.shape == (0, 3, 128)
    mask = np.ones((2, 3), np.int64)
    (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask})
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    for lm in (OnnxCausalLM(path), OnnxCausalLM(llama_onnx[1])):
        for bad in (ids[:, :0], ids[:0]):
            with pytest.raises(InputError, match="at least one row and one token"):
                lm.forward(bad.numpy(), np.ones(bad.shape, np.int64))
            with pytest.raises(InputError, match="at least one row and one token"):
                lm.generate(bad.numpy(), 3)


def test_sliding_window_cache_is_refused(tmp_path) -> None:
    model = tiny("gemma3")
    relufy_(model, "relu")
    with pytest.raises(InputError, match="kv_cache=False"):
        export_onnx(model, tmp_path / "g.onnx")
    assert list(tmp_path.iterdir()) == []


def test_silu_model_is_refused_with_the_fix(tmp_path) -> None:
    with pytest.raises(NotSparseError, match=r"relufy.*sparse=False"):
        export_onnx(tiny("llama"), tmp_path / "silu.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths_are_refused_before_export(tmp_path, monkeypatch) -> None:
    model = tiny("llama")
    relufy_(model)

    def no_export(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr("prosparse_fx.onnx.export.capture_export", no_export)
    (tmp_path / "taken.onnx").write_bytes(b"user data")
    (tmp_path / "weights.onnx.data").write_bytes(b"user weights")
    (tmp_path / "folder.onnx").mkdir()
    cases = [
        (tmp_path / "model.txt", "ending in .onnx"),
        (tmp_path / "folder.onnx", "is a folder"),
        (tmp_path / "taken.onnx", "overwrite"),
        (tmp_path / "weights.onnx", r"weights\.onnx\.data' exists.*overwrite"),
        (tmp_path / "missing" / "m.onnx", "does not exist"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            export_onnx(model, path)
    with pytest.raises(InputError, match="crossover"):
        export_onnx(model, tmp_path / "ok.onnx", crossover=2.0)
    with pytest.raises(InputError, match="float32"):
        export_onnx(tiny("llama").to(torch.bfloat16), tmp_path / "ok.onnx")
    with pytest.raises(InputError, match="meta device"):
        export_onnx(tiny("llama").to("meta"), tmp_path / "ok.onnx")
    assert (tmp_path / "taken.onnx").read_bytes() == b"user data"
    assert (tmp_path / "weights.onnx.data").read_bytes() == b"user weights"


@torch.library.custom_op("prosparse_test::wobble", mutates_args=())
def _wobble(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


@_wobble.register_fake
def _(x):
    return torch.empty_like(x)


class _Wobble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _wobble(x)


def test_unsupported_operator_is_named_and_nothing_is_left(tmp_path) -> None:
    model = tiny("llama")
    relufy_(model)
    model.model.layers[1].post_attention_layernorm = nn.Sequential(
        model.model.layers[1].post_attention_layernorm, _Wobble()
    )
    with pytest.raises(ONNXExportError, match=r"prosparse_test.*wobble.*layers\.1"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    model = tiny("llama")
    relufy_(model)
    (tmp_path / "m.onnx").write_bytes(b"previous export")

    def broken_save(self, path, **kwargs):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", broken_save)
    from prosparse_fx.atomic import OutputWriteError

    with pytest.raises(OutputWriteError, match="no space left on the device.*Nothing was replaced"):
        export_onnx(model, tmp_path / "m.onnx", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"previous export"


def test_runner_refuses_bad_files(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        OnnxCausalLM(tmp_path / "none.onnx")
    with pytest.raises(InputError, match="is not a file"):
        OnnxCausalLM(tmp_path)
    # inputs named like a causal LM's, but no logits [batch, seq, vocab]
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "foreign",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "foreign.onnx")
    with pytest.raises(InputError, match=r"logits \[batch, seq, vocab\]"):
        OnnxCausalLM(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot load"):
        OnnxCausalLM(tmp_path / "junk.onnx")


@pytest.fixture(scope="module")
def relu_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny CLI model relufied (FATReLU) and saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    relufy_(model, "fatrelu", 0.01)
    path = tmp_path_factory.mktemp("relu-model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_cli_export_then_generate(tmp_path, relu_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(relu_model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    result = runner.invoke(
        app, ["generate", str(out), "--prompt", "The history of", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(relu_model_dir)
    model = AutoModelForCausalLM.from_pretrained(relu_model_dir)
    ids = tok("The history of", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert result.output.strip() == tok.decode(expected[0], skip_special_tokens=True).strip()
    again = runner.invoke(app, ["export", str(relu_model_dir), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_cli_bad_inputs_exit_2(tmp_path, tiny_model_dir, llama_onnx) -> None:
    cases = [
        (["export", str(tiny_model_dir), "--out", str(tmp_path / "m.onnx")], "--dense"),
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")], "does not exist"),
        (["export", str(tiny_model_dir), "--out", str(tmp_path / "m.bin")], ".onnx"),
        (["generate", str(tmp_path / "none.onnx"), "--prompt", "hi"], "does not exist"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(
        (["generate", str(llama_onnx[1]), "--prompt", "hi", "--tokenizer", str(empty)],
         "no usable tokenizer"),
    )  # fmt: skip
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert list(tmp_path.iterdir()) == [empty]


@pytest.mark.slow
def test_real_model_onnx_matches_torch(tmp_path, smollm2) -> None:
    """SmolLM2's first 8 of 30 layers (real weights and tokenizer), relufied (ReLU, untrained):
    32 greedy tokens in ONNX Runtime equal torch's, and logits agree to 1e-4 of their range for
    the prompt and every cached step. The whole trained main-job model, which takes minutes to
    export, is checked by benchmarks/bench_onnx.py (1e-4 absolute)."""
    import copy

    model, tok = smollm2
    model = copy.deepcopy(model)
    model.model.layers = model.model.layers[:8]
    model.config.num_hidden_layers = 8
    relufy_(model, "relu")
    lm = OnnxCausalLM(export_onnx(model, tmp_path / "smol.onnx"))
    ids = tok("The history of Wikipedia", return_tensors="pt").input_ids
    out = lm.generate(ids.numpy(), 32)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        full = model(input_ids=torch.from_numpy(out)).logits.numpy()
    np.testing.assert_array_equal(out, expected.numpy())
    n = ids.shape[1]
    logits, past = lm.forward(out[:, :n], np.ones((1, n), np.int64))
    diffs = [np.abs(logits - full[:, :n]).max()]
    for i in range(n, out.shape[1] - 1):
        logits, past = lm.forward(out[:, i : i + 1], np.ones((1, i + 1), np.int64), past=past)
        diffs.append(np.abs(logits[:, 0] - full[:, i]).max())
    span = full.max() - full.min()
    assert max(diffs) < 1e-4 * span, (max(diffs), span)
