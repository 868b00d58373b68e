"""``prosparse-fx predictors``: builds, measures and saves approximate mode's predictors into a
relufied model folder; bad input exits 2 and loses nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prosparse_fx import find_ffn_sites, relufy_
from prosparse_fx.cli import app
from prosparse_fx.models import load_model
from prosparse_fx.predictors import load_predictors
from tests.test_cli_inputs import SEQ, llama, word_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """relu: the tiny LLaMA relufied (ReLU) with a tokenizer; silu: the same, not relufied;
    text: 30 JSONL documents."""
    import random

    root = tmp_path_factory.mktemp("predictors")
    for name, relu in (("relu", True), ("silu", False)):
        model = llama()
        if relu:
            relufy_(model, "relu")
        model.save_pretrained(root / name)
        word_tokenizer(False).save_pretrained(root / name)
    rng = random.Random(0)
    docs = [
        " ".join(f"w{rng.randrange(60)}" for _ in range(rng.randrange(40, 80))) for _ in range(30)
    ]
    (root / "text.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return root


@pytest.fixture(autouse=True)
def _every_predictor_pays(request, monkeypatch):
    """The job times each predicted op against the exact one, and on these tiny FFNs either
    may win: the tests below fix the measured speedup at 2 (approximate mode everywhere), except
    the one that checks the timing itself."""
    if "real_timing" in request.keywords:
        return
    import dataclasses

    import prosparse_fx.predictors.speed as speed

    monkeypatch.setattr(
        speed,
        "time_predictors",
        lambda model, predictors, *a, **k: [
            dataclasses.replace(p, speedup=2.0) for p in predictors
        ],
    )


@pytest.mark.real_timing
def test_sites_where_the_predictor_measured_slower_stay_exact(folders, tmp_path) -> None:
    """The job times each site; the report's perplexity is approximate mode as deployed: the
    sites measured slower than exact stay exact (their list is reported), and a folder whose
    predictors all measured slower measures as the exact model."""
    import shutil

    model_dir, text = tmp_path / "relu", folders / "text.jsonl"
    shutil.copytree(folders / "relu", model_dir)
    for name in ("predictors.json", "predictors.safetensors"):
        (model_dir / name).unlink(missing_ok=True)
    done = _run(model_dir, text, "--rank", "2", "--recall", "0.8")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    speedups = [e["speedup"] for e in report["sites"]]
    assert all(v > 0 for v in speedups)
    assert report["exact_sites"] == [e["site"] for e in report["sites"] if e["speedup"] < 1]
    lm, _ = load_model(model_dir)
    loaded = load_predictors(model_dir, lm, find_ffn_sites(lm))
    assert [p.speedup for p in loaded] == speedups
    # every predictor slower: approximate mode is the exact model
    record = json.loads((model_dir / "predictors.json").read_text())
    for e in record["sites"]:
        e["speedup"] = 0.5
    (model_dir / "predictors.json").write_text(json.dumps(record))
    slow = json.loads(_measure(model_dir, text).stdout)["approximate_mode"]
    assert slow["exact_sites"] == [e["site"] for e in record["sites"]]
    assert slow["perplexity_predicted"] == pytest.approx(slow["perplexity_exact"], rel=1e-5)


def _run(folder, text, *extra):
    args = ["predictors", str(folder), "--data", str(text), "--seq-len", str(SEQ), "--json"]
    return runner.invoke(app, [*args, *extra])


def test_full_rank_is_exact_then_low_rank_is_measured_and_saved(folders) -> None:
    model_dir, text = folders / "relu", folders / "text.jsonl"
    full = _run(model_dir, text, "--rank", "32", "--recall", "1.0")
    assert full.exit_code == 0, full.output
    report = json.loads(full.stdout)
    assert all(e["recall"] == 1.0 for e in report["sites"])
    assert report["perplexity_predicted"] == pytest.approx(report["perplexity_exact"], rel=1e-5)
    saved = (model_dir / "predictors.json").read_bytes()

    again = _run(model_dir, text, "--rank", "4", "--recall", "0.9")
    assert again.exit_code == 2 and "already holds predictors" in again.output
    assert (model_dir / "predictors.json").read_bytes() == saved

    low = _run(model_dir, text, "--rank", "4", "--recall", "0.9", "--overwrite")
    assert low.exit_code == 0, low.output
    report = json.loads(low.stdout)
    assert report["perplexity_predicted"] != report["perplexity_exact"]
    lm, _ = load_model(model_dir)
    loaded = load_predictors(model_dir, lm, find_ffn_sites(lm))
    assert [p.rank for p in loaded] == [4, 4]
    assert [p.cut for p in loaded] == [e["cut"] for e in report["sites"]]


def test_trained_kind_is_built_measured_and_saved(folders, tmp_path) -> None:
    import shutil

    model_dir = tmp_path / "relu"
    shutil.copytree(folders / "relu", model_dir)
    for name in ("predictors.json", "predictors.safetensors"):
        (model_dir / name).unlink(missing_ok=True)
    args = ("--rank", "4", "--recall", "0.9", "--kind", "trained", "--epochs", "3")
    result = _run(model_dir, folders / "text.jsonl", *args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "trained" and report["epochs"] == 3
    assert all(e["recall"] >= 0.9 for e in report["sites"])
    lm, _ = load_model(model_dir)
    loaded = load_predictors(model_dir, lm, find_ffn_sites(lm))
    assert [p.kind for p in loaded] == ["trained", "trained"]
    assert [p.cut for p in loaded] == [e["cut"] for e in report["sites"]]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--rank", "4", "--recall", "1.5"], "recall"),
        (["--rank", "4", "--recall", "0"], "recall"),
        (["--rank", "1000"], "--rank 1000 is above min(d, d_ff) = 32"),
        (["--rank", "0"], "--rank must be an integer >= 1"),
        (["--rank", "4", "--kind", "dejavu"], "kind"),
        (["--rank", "4", "--kind", "trained", "--epochs", "0"], "--epochs"),
        (["--rank", "4", "--windows", "0"], "--windows"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(
    folders, tmp_path, monkeypatch, extra, words
) -> None:
    """Refused before the model is loaded (the widths from its config.json)."""
    import shutil

    import prosparse_fx.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(prosparse_fx.models, "load_model", no_load)

    model_dir = tmp_path / "relu"
    shutil.copytree(folders / "relu", model_dir)
    for name in ("predictors.json", "predictors.safetensors"):
        (model_dir / name).unlink(missing_ok=True)
    result = _run(model_dir, folders / "text.jsonl", *extra)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (model_dir / "predictors.json").exists()


def test_silu_model_and_a_file_are_refused(folders) -> None:
    silu = _run(folders / "silu", folders / "text.jsonl", "--rank", "4")
    assert silu.exit_code == 2 and "relufy" in silu.output.lower()
    weights = folders / "silu" / "model.safetensors"
    as_file = _run(weights, folders / "text.jsonl", "--rank", "4")
    assert as_file.exit_code == 2


def test_unwritable_folder_exits_2_before_any_work(folders, tmp_path, monkeypatch) -> None:
    """A folder the predictors cannot be saved into is refused up front (it failed with a raw
    PermissionError after building and measuring)."""
    import os

    real_access = os.access
    target = folders / "relu"
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode: (
            False if str(p) == str(target) and mode == os.W_OK else real_access(p, mode)
        ),
    )
    result = _run(target, folders / "text.jsonl", "--rank", "4", "--overwrite")
    assert result.exit_code == 2 and "is not writable" in result.output


def _measure(folder, text, *extra):
    args = ["measure", str(folder), "--data", str(text), "--seq-len", str(SEQ), "--json"]
    return runner.invoke(app, [*args, *extra])


def test_measure_reports_approximate_mode_when_the_folder_holds_predictors(
    folders, tmp_path
) -> None:
    import shutil

    model_dir, text = tmp_path / "relu", folders / "text.jsonl"
    shutil.copytree(folders / "relu", model_dir)
    for name in ("predictors.json", "predictors.safetensors"):
        (model_dir / name).unlink(missing_ok=True)
    plain = _measure(model_dir, text)
    assert plain.exit_code == 0, plain.output
    assert "approximate_mode" not in json.loads(plain.stdout)
    missing = _measure(model_dir, text, "--predictors")
    assert missing.exit_code == 2 and "holds no predictors" in missing.output

    # full rank, recall 1: approximate mode is the exact model
    assert _run(model_dir, text, "--rank", "32", "--recall", "1.0").exit_code == 0
    full = json.loads(_measure(model_dir, text).stdout)
    approx = full["approximate_mode"]
    assert approx["perplexity_exact"] == full["perplexity"]
    assert approx["perplexity_predicted"] == pytest.approx(full["perplexity"], rel=1e-5)
    for e in approx["sites"]:  # the cut came from other windows: a near-zero gate may slip
        assert e["recall"] > 0.999
        assert e["true_sparsity"] == pytest.approx(full["per_layer_sparsity"][e["site"]])

    # low rank: measured on the same windows as the exact model, on its own x and x1
    build = _run(model_dir, text, "--rank", "2", "--recall", "0.8", "--overwrite")
    assert build.exit_code == 0, build.output
    low = json.loads(_measure(model_dir, text).stdout)["approximate_mode"]
    lm, _ = load_model(model_dir)
    sites = find_ffn_sites(lm)
    loaded = load_predictors(model_dir, lm, sites)
    from prosparse_fx.data import load_documents, spread, token_windows
    from prosparse_fx.predictors import measure_predictors

    tok = word_tokenizer(False)
    win = spread(token_windows(tok, load_documents(text), SEQ), 16)
    expected = measure_predictors(lm, loaded, win, sites)
    assert [e["recall"] for e in low["sites"]] == [q.recall for q in expected]
    assert [e["predicted_sparsity"] for e in low["sites"]] == [
        q.predicted_sparsity for q in expected
    ]
    assert low["perplexity_predicted"] != low["perplexity_exact"]
    assert "approximate_mode" not in json.loads(_measure(model_dir, text, "--no-predictors").stdout)

    text_out = runner.invoke(
        app, ["measure", str(model_dir), "--data", str(text), "--seq-len", str(SEQ)]
    )
    assert text_out.exit_code == 0
    assert "approximate mode (the folder's predictors: kind svd, rank 2)" in text_out.output
    assert low["kinds"] == ["svd"] and low["ranks"] == [2]

    # a damaged predictors file: exit 2 naming the way out
    (model_dir / "predictors.safetensors").write_bytes(b"damaged")
    damaged = _measure(model_dir, text)
    assert damaged.exit_code == 2 and "--no-predictors" in damaged.output
    assert _measure(model_dir, text, "--no-predictors").exit_code == 0


def test_rank_above_the_widths_of_a_gpt2_config_is_refused_before_loading(
    tmp_path, monkeypatch
) -> None:
    """GPT-2's config names d_ff n_inner (None: 4 d); OPT's ffn_dim."""
    import prosparse_fx.models
    from tests.models import tiny

    model = tiny("gpt2")
    relufy_(model, "fatrelu", 0.05)
    model.save_pretrained(tmp_path / "g")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(prosparse_fx.models, "load_model", no_load)
    result = runner.invoke(app, ["predictors", str(tmp_path / "g"), "--rank", "1000"])
    assert result.exit_code == 2 and "--rank 1000 is above min(d, d_ff) = 32" in result.output
