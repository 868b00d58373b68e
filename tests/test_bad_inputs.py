"""Bad input that crashed instead of exiting 2 (issue 13, problems 10, 11, 14, 15, 21 and 22):
damaged model folders and GGUF files, damaged or hostile text, a tokenizer whose ids the model
cannot embed, generation past a model's context, a text without document breaks, and an
encoder exported with the KV-cache signature. Each exits 2 (CLI) or raises ``InputError``
(library) with a message naming the problem and the fix, or, for the text without breaks, is
split by size and says so.

Everything is built offline: tiny random models saved with ``save_pretrained`` and word-level
tokenizers made with ``tokenizers``.
"""

import bz2
import json
import logging
import random
import struct

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from typer.testing import CliRunner

from prosparse_fx.cli import app
from prosparse_fx.data import load_documents, split_documents
from prosparse_fx.errors import InputError
from prosparse_fx.models import load_causal_lm
from tests.models import WORDS, tiny, word_text, word_tokenizer

runner = CliRunner()
EOS = 2
SEQ = 16
CONTEXT = 32  # the tiny models' max_position_embeddings


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """llama/: a tiny LLaMA (rotary positions, context 32) with its tokenizer; gpt2/: a tiny
    GPT-2 (learned positions, context 32) with it; text.jsonl: 20 documents."""
    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
            bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        )
    )  # fmt: skip
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(WORDS), n_embd=32, n_inner=64, n_layer=2, n_head=4,
            n_positions=CONTEXT, bos_token_id=1, eos_token_id=EOS,
        )
    )  # fmt: skip
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        word_tokenizer().save_pretrained(root / name)
    word_tokenizer(far_ids=True).save_pretrained(root / "far_tok")
    rng = random.Random(0)
    docs = [word_text(rng, rng.randrange(40, 80)) for _ in range(20)]
    (root / "text.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return root


def _damaged(root, tmp_path, damage: str):
    """A copy of the tiny LLaMA folder with one kind of damage."""
    folder = tmp_path / damage
    folder.mkdir()
    for f in (root / "llama").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    if damage == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "config_list":
        (folder / "config.json").write_text(json.dumps([config]))
    elif damage == "config_types":
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))
    elif damage == "architectures_string":
        arch = {**config, "architectures": "LlamaForCausalLM"}
        (folder / "config.json").write_text(json.dumps(arch))
    return folder


# --- problem 10: damaged model folders and GGUF files exit 2 in measure and export --------

DAMAGE = {
    "truncated": ("model.safetensors", "truncated"),
    "config_list": ("config.json", "JSON list"),
    "config_types": ("config.json", "hidden_size"),
    "architectures_string": ("config.json", "architectures"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_model_folder_exits_2_in_measure_and_export(root, tmp_path, damage) -> None:
    folder = _damaged(root, tmp_path, damage)
    file, problem = DAMAGE[damage]
    measure = ["measure", str(folder), "--data", str(root / "text.jsonl"), "--seq-len", str(SEQ)]
    export = ["export", str(folder), "--out", str(tmp_path / "m.onnx"), "--dense"]
    for args in (measure, export):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args[0], result.output, result.exception)
        assert str(folder / file) in result.output and problem in result.output, result.output
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(InputError, match=problem):
        load_causal_lm(folder)


def test_a_truncated_shard_is_named_and_other_safetensors_files_are_not_weights(
    root, tmp_path
) -> None:
    """Sharded checkpoints: the shards the index names are checked; a damaged safetensors file
    that is not a weights file (saved predictors, an adapter) does not block loading."""
    model = load_causal_lm(root / "llama")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 1
    (folder / "predictors.safetensors").write_bytes(b"not a safetensors file")
    loaded = load_causal_lm(folder)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    last = folder / sorted(set(shards.values()))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"{last}.* truncated"):
        load_causal_lm(folder)


def test_saved_model_files_are_readable_as_the_umask_allows(root, tmp_path) -> None:
    """transformers writes model.safetensors owner-only (0600); save_model gives every file of
    the folder the mode the umask gives new files (0644 under umask 022), weights included."""
    import os

    from prosparse_fx.models import save_model

    model = load_causal_lm(root / "llama")
    folder = tmp_path / "m"
    folder.mkdir()
    script = folder / "run.sh"  # not the model's: left as it is
    script.write_text("echo hi\n")
    script.chmod(0o700)
    old = os.umask(0o022)
    try:
        save_model(model, None, folder)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
    assert modes.pop("run.sh") == 0o700
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_garbage_gguf_exits_2_naming_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROSPARSE_FX_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    # a GGUF v3 header (1 tensor, 5 metadata entries) cut off inside its first key
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 1, 5, 40) + b"general.arch")
    result = runner.invoke(app, ["export", str(gguf), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"cannot load GGUF file {gguf}" in result.output
    assert "damaged or truncated" in result.output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# --- problem 11: damaged or hostile text --------------------------------------------------


def test_truncated_bz2_dump_exits_2(root, tmp_path) -> None:
    page = "<page><title>T{i}</title><ns>0</ns><revision><text>{t}</text></revision></page>"
    rng = random.Random(1)
    xml = "<mediawiki>" + "".join(page.format(i=i, t=word_text(rng, 300)) for i in range(30))
    packed = bz2.compress((xml + "</mediawiki>").encode())
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError, match="ends early"):
        load_documents(dump)
    args = ["measure", str(root / "llama"), "--data", str(dump), "--seq-len", str(SEQ)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert str(dump) in result.output and "truncated" in result.output


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
        ('{"text": "a lone \\ud800 surrogate"}', "surrogate"),
    ],
    ids=["deep", "surrogate"],
)
def test_hostile_jsonl_line_exits_2_naming_the_line(root, tmp_path, line, problem) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "w1 w2"}\n' + line + "\n")
    with pytest.raises(InputError, match=f"d.jsonl:2 .*{problem}"):
        load_documents(data)
    args = ["measure", str(root / "llama"), "--data", str(data), "--seq-len", str(SEQ)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"{data}:2" in result.output and problem in result.output


@pytest.fixture(scope="module")
def onnx_files(root, tmp_path_factory):
    """The tiny LLaMA and GPT-2 exported dense with the KV cache."""
    out = tmp_path_factory.mktemp("onnx")
    files = {}
    for name in ("llama", "gpt2"):
        files[name] = out / f"{name}.onnx"
        result = runner.invoke(
            app, ["export", str(root / name), "--out", str(files[name]), "--dense"]
        )
        assert result.exit_code == 0, (result.output, result.exception)
    return files


def test_generate_refuses_a_prompt_that_is_not_utf8(onnx_files) -> None:
    # what Python makes of the bytes b"w1 \xff" in argv (surrogateescape)
    result = runner.invoke(app, ["generate", str(onnx_files["llama"]), "--prompt", "w1 \udcff"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--prompt" in result.output and "UTF-8" in result.output


# --- problem 14: token ids past the model's embedding -------------------------------------


def test_token_ids_past_the_embedding_exit_2_in_measure(root) -> None:
    from prosparse_fx.models import check_token_ids

    args = ["measure", str(root / "llama"), "--data", str(root / "text.jsonl")]
    result = runner.invoke(
        app, [*args, "--seq-len", str(SEQ), "--tokenizer", str(root / "far_tok")]
    )
    assert result.exit_code == 2, (result.output, result.exception)
    assert "token id 10" in result.output and f"{len(WORDS)} rows" in result.output
    assert "--tokenizer DIR" in result.output
    model = tiny("llama")  # 128 rows
    check_token_ids(torch.tensor([[0, 127]]), model)
    with pytest.raises(InputError, match="token id 128, .* 128 rows"):
        check_token_ids(torch.tensor([[0, 128]]), model)
    with pytest.raises(InputError, match="token id -1"):
        check_token_ids(torch.tensor([[-1, 5]]), model)


# --- problem 15: generation past the model's context --------------------------------------

PROMPT = " ".join(f"w{i}" for i in range(10, 30))  # 20 tokens


def _generate(path, new: int):
    return runner.invoke(
        app, ["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", str(new)]
    )


def _strip_positions(src, dst) -> None:
    """``src`` as a file exported before the positions were recorded."""
    import onnx

    model = onnx.load(str(src))
    keep = [p for p in model.metadata_props if "position" not in p.key]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save(model, str(dst))


def test_generate_past_learned_positions_exits_2_naming_the_limit(onnx_files, tmp_path) -> None:
    """20 prompt tokens, context 32: the last new token is predicted from position 31, so 13
    new tokens fit and 14 do not (the 14th would be predicted from position 32)."""
    old = tmp_path / "old.onnx"
    _strip_positions(onnx_files["gpt2"], old)
    for path in (onnx_files["gpt2"], old):
        result = _generate(path, 13)
        assert result.exit_code == 0, (result.output, result.exception)
        result = _generate(path, 14)
        assert result.exit_code == 2, (result.output, result.exception)
        assert f"{CONTEXT} positions" in result.output and "--max-new-tokens 13" in result.output


def test_generate_past_rotary_positions_warns(onnx_files) -> None:
    result = _generate(onnx_files["llama"], 13)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    result = _generate(onnx_files["llama"], 20)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "warning:" in result.stderr and f"{CONTEXT} positions" in result.stderr


def test_runner_refuses_learned_positions_past_the_context(onnx_files) -> None:
    from prosparse_fx.onnx import OnnxCausalLM

    lm = OnnxCausalLM(onnx_files["gpt2"])
    ids = np.arange(4, 24)[None]
    assert lm.generate(ids, 13).shape == (1, 33)
    with pytest.raises(InputError, match="max_new_tokens=13 or less"):
        lm.generate(ids, 14)


# --- problem 21: a text without document breaks; heading underlines -----------------------


def test_rest_heading_underlines_do_not_split_documents(tmp_path) -> None:
    text = "Title\n-----\n\nbody one\n\n---\n\nSecond\n------\nbody two\n---\n\nthird"
    path = tmp_path / "t.rst.txt"
    path.write_text(text)
    assert load_documents(path) == [
        "Title\n-----\n\nbody one",
        "Second\n------\nbody two\n---\n\nthird",
    ]
    path.write_text("---\n\na\n\n---\n\nb\n\n---")  # separators at the file's edges too
    assert load_documents(path) == ["a", "b"]


def test_text_without_document_breaks_is_split_by_size(tmp_path, caplog) -> None:
    rng = random.Random(2)
    lines = [word_text(rng, rng.randrange(5, 15)) for _ in range(400)]
    path = tmp_path / "long.txt"
    path.write_text("\n".join(lines))
    docs = load_documents(path)
    assert len(docs) == 1
    with caplog.at_level(logging.WARNING, logger="prosparse_fx.data"):
        split = split_documents(docs, seed=0)
    assert split.split_by == "size"
    assert "split by size" in caplog.text
    pieces = split.train + split.calib + split.held_out
    assert len(pieces) == 20 and len(split.held_out) == 2 and len(split.calib) == 1
    # pieces are whole lines, each line in exactly one piece, in order within it
    assert sorted(line for p in pieces for line in p.split("\n")) == sorted(lines)
    sizes = [len(p) for p in pieces]
    assert max(sizes) < 2 * min(sizes)
    assert split_documents([f"doc {i}" for i in range(5)]).split_by == "documents"
    with pytest.raises(InputError, match="at least 3"):
        split_documents(["one", "two"])


# --- problem 22: an encoder exported with the KV-cache signature --------------------------


def test_kv_cache_export_of_a_model_without_cache_names_no_cache(tmp_path) -> None:
    from prosparse_fx.onnx import export_onnx

    with pytest.raises(InputError, match="returns no KV cache.*kv_cache=False \\(--no-cache\\)"):
        export_onnx(tiny("bert"), tmp_path / "b.onnx", sparse=False)
    assert not (tmp_path / "b.onnx").exists()


# --- problems 14 and 21 in sparsify ---------------------------------------------------------

_SPARSIFY_FAST = {
    "eval_windows": 2,
    "calib_windows": 1,
    "sweep_thresholds": [0.0],
    "seq_len": SEQ,
    "batch_size": 2,
    "stages": [[0.0, 1], [0.5, 2]],
}


def _sparsify(root, tmp_path, data, *extra):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_SPARSIFY_FAST))
    args = ["sparsify", "--model", str(root / "llama"), "--data", str(data)]
    return runner.invoke(
        app, [*args, "--config", str(config), "--out", str(tmp_path / "run"), *extra]
    )


def test_token_ids_past_the_embedding_exit_2_in_sparsify(root, tmp_path) -> None:
    """Problem 14 in sparsify: refused before training, nothing written."""
    result = _sparsify(root, tmp_path, root / "text.jsonl", "--tokenizer", str(root / "far_tok"))
    assert result.exit_code == 2, (result.output, result.exception)
    assert "token id" in result.output and f"{len(WORDS)} rows" in result.output
    assert not (tmp_path / "run").exists()


def test_sparsify_trains_on_a_text_without_document_breaks(root, tmp_path) -> None:
    """Problem 21 in sparsify: one long text is split by size, and the report says so."""
    rng = random.Random(3)
    path = tmp_path / "long.txt"
    path.write_text("\n".join(word_text(rng, rng.randrange(5, 15)) for _ in range(300)))
    result = _sparsify(root, tmp_path, path)
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data_split"]["split_by"] == "size"
    assert report["data_split"]["held_out_documents"] == 2
