"""Approximate mode in ONNX: the translations of ``predicted_gated_ffn`` / ``predicted_plain_ffn``
(standard operators) against their torch references over the shapes of the exact translations'
table and the three crossovers, NaN propagation, and ``export_onnx(..., predictors=...)`` of
whole models against eager approximate mode."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from prosparse_fx import relufy_, sparsify_ffn_
from prosparse_fx.errors import InputError
from prosparse_fx.onnx import DEFAULT_CROSSOVER, OnnxCausalLM, export_onnx
from prosparse_fx.predictors import (
    build_predictors,
    predicted_gated_ffn_reference,
    predicted_plain_ffn_reference,
)
from tests.models import VOCAB, tiny
from tests.test_onnx import INPUTS, _export_ffn


class _Predicted(nn.Module):
    """One predicted FFN op with random weights (d = 8, d_ff = 24) and a rank-3 predictor whose
    cut keeps about 40% of the neurons of random inputs."""

    def __init__(self, kind: str, threshold: float, bias: bool, up_relu: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kind, self.threshold, self.up_relu = kind, threshold, up_relu
        self.w1 = nn.Parameter(torch.randn(24, 8, generator=g) * 0.5)
        self.w_up = nn.Parameter(torch.randn(24, 8, generator=g) * 0.5)
        self.w2_t = nn.Parameter(torch.randn(24, 8, generator=g) * 0.3)
        self.b1 = nn.Parameter(torch.randn(24, generator=g) * 0.1) if bias else None
        self.b2 = nn.Parameter(torch.randn(8, generator=g) * 0.1) if bias else None
        self.a = nn.Parameter(torch.randn(3, 8, generator=g))
        self.b = nn.Parameter(torch.randn(24, 3, generator=g))
        self.pred_bias = nn.Parameter(torch.randn(24, generator=g)) if bias else None
        self.cut = 0.7

    def _args(self, x):
        if self.kind == "gated":
            return (x, self.a, self.b, self.cut, self.w1, self.w_up, self.w2_t, self.threshold,
                    self.up_relu)  # fmt: skip
        return (x, self.a, self.b, self.pred_bias, self.cut, self.w1, self.b1, self.w2_t,
                self.b2, self.threshold)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return torch.ops.prosparse.predicted_gated_ffn(*self._args(x))
        return torch.ops.prosparse.predicted_plain_ffn(*self._args(x))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return predicted_gated_ffn_reference(*self._args(x))
        return predicted_plain_ffn_reference(*self._args(x))


@pytest.mark.parametrize("crossover", [0.0, DEFAULT_CROSSOVER, 1.0])
@pytest.mark.parametrize(
    ("kind", "threshold", "bias", "up_relu"),
    [("gated", 0.0, False, False), ("gated", 0.3, False, True), ("plain", 0.2, True, False),
     ("plain", 0.0, False, False)],
)  # fmt: skip
def test_predicted_translation_matches_reference(
    tmp_path, kind, threshold, bias, up_relu, crossover
) -> None:
    module = _Predicted(kind, threshold, bias, up_relu)
    session = _export_ffn(module, tmp_path / "ffn.onnx", crossover)
    name = session.get_inputs()[0].name
    for label, make in INPUTS.items():
        x = make()
        (y,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            expected = module.reference(x).numpy()
        assert y.shape == expected.shape, label
        atol = 1e-5 * max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=atol, err_msg=label)


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_predicted_translation_propagates_nan(tmp_path, kind) -> None:
    """A NaN input gives a NaN estimate, which counts as predicted: the token's output is NaN,
    as in the dense model, even where the cut would predict nothing."""
    module = _Predicted(kind, 0.0, kind == "plain")
    module.cut = 1e9  # nothing predicted for a finite input
    session = _export_ffn(module, tmp_path / "ffn.onnx", 1.0)
    x = torch.randn(1, 3, 8)
    x[0, 1, 2] = float("nan")
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.isnan(y[0, 1]).all() and not np.isnan(y[0, [0, 2]]).any()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_exports_in_approximate_mode(tmp_path, family) -> None:
    model = tiny(family)
    sites = relufy_(model, "fatrelu", 0.05)
    model.eval()
    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    eager = copy.deepcopy(model)
    sparsify_ffn_(eager, sites=sites, predictors=predictors)
    path = export_onnx(model, tmp_path / "m.onnx", kv_cache=False, predictors=predictors)
    proto = onnx.load(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["prosparse.predicted_sites"] == str(len(sites))
    # as sparsify_ffn_: a predictor measured slower than exact mode is not exported
    slower = [dataclasses.replace(predictors[0], speedup=0.5), *predictors[1:]]
    path2 = export_onnx(model, tmp_path / "m2.onnx", kv_cache=False, predictors=slower)
    meta2 = {p.key: p.value for p in onnx.load(path2).metadata_props}
    assert meta2["prosparse.predicted_sites"] == str(len(sites) - 1)
    lm = OnnxCausalLM(path)
    ids = windows[:2, :8]
    logits, _ = lm.forward(ids.numpy(), np.ones(ids.shape, np.int64))
    with torch.no_grad():
        want = eager(input_ids=ids).logits.numpy()
        exact = model(input_ids=ids).logits.numpy()
    # each FFN is its reference (the op-level tests above); ONNX Runtime rounds the FFN inputs
    # differently from torch, so a neuron whose estimate is that close to the cut may flip (as at
    # a FATReLU threshold), changing its token and the later ones: compare the loss
    assert _loss(logits, ids) == pytest.approx(_loss(want, ids), rel=1e-2)
    assert abs(_loss(want, ids) - _loss(exact, ids)) > 1e-4  # not the exact model
    same = np.abs(logits - want).max(-1) < 1e-4
    assert same[:, :4].all()  # the first tokens, before any flip, match


def _loss(logits: np.ndarray, ids: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cross_entropy(
            torch.from_numpy(logits)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        )
    )


def test_export_refuses_predictors_that_do_not_fit(tmp_path) -> None:
    model = tiny("llama")
    sites = relufy_(model, "fatrelu", 0.05)
    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    predictors = build_predictors(model, windows, sites, rank=4, recall=0.9)
    with pytest.raises(InputError, match="sparse=False"):
        export_onnx(model, tmp_path / "a.onnx", sparse=False, predictors=predictors)
    renamed = [dataclasses.replace(predictors[0], site="model.layers.7.mlp")]
    with pytest.raises(InputError, match=r"not FFN sites of this model \(its sites: \['model"):
        export_onnx(model, tmp_path / "b.onnx", predictors=renamed)
    narrow = [dataclasses.replace(predictors[0], a=predictors[0].a[:, :8])]
    with pytest.raises(InputError, match="is for d=8"):
        export_onnx(model, tmp_path / "c.onnx", predictors=narrow)
    other = tiny("llama", seed=1)
    theirs = build_predictors(other, windows, relufy_(other, "fatrelu", 0.05), rank=4)
    with pytest.raises(InputError, match=r"layers\.0\.mlp was built for another gate weight"):
        export_onnx(model, tmp_path / "d.onnx", predictors=theirs)
    half = [dataclasses.replace(p, a=p.a.bfloat16(), b=p.b.bfloat16()) for p in predictors]
    with pytest.raises(InputError, match="is torch.bfloat16; export_onnx takes float32"):
        export_onnx(model, tmp_path / "e.onnx", predictors=half)
    assert not list(tmp_path.iterdir())


def test_cli_export_predictors(tmp_path) -> None:
    from typer.testing import CliRunner

    from prosparse_fx.cli import app
    from prosparse_fx.predictors import save_predictors

    model = tiny("llama")
    sites = relufy_(model, "fatrelu", 0.05)
    model.save_pretrained(tmp_path / "m")
    runner = CliRunner()
    args = ["export", str(tmp_path / "m"), "--no-cache", "--predictors"]
    missing = runner.invoke(app, [*args, "--out", str(tmp_path / "a.onnx")])
    assert missing.exit_code == 2 and "holds no predictors" in missing.output
    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    save_predictors(tmp_path / "m", build_predictors(model, windows, sites, rank=4), model, sites)
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "b.onnx")])
    assert done.exit_code == 0, done.output
    meta = {p.key: p.value for p in onnx.load(tmp_path / "b.onnx").metadata_props}
    assert meta["prosparse.predicted_sites"] == "2"
    dense = runner.invoke(app, [*args, "--dense", "--out", str(tmp_path / "c.onnx")])
    assert dense.exit_code == 2 and "sparse=False" in dense.output
