"""Inputs the causal-LM commands used to score silently wrong (issue 12, cases 9, 10 and 12):
a model folder without a tokenizer, a tokenizer that puts BOS first, an encoder or a checkpoint
without its LM head. Each computes what it promises or exits 2 naming the problem and the fix.

Everything here is built offline: tiny random models saved with ``save_pretrained`` and
word-level tokenizers made with ``tokenizers``.
"""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertLMHeadModel,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from prosparse_fx.cli import app
from prosparse_fx.data import bos_token_id, load_documents, split_documents, spread, token_windows

runner = CliRunner()
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
BOS, EOS = 1, 2
SEQ = 16


def word_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """One token per word; with ``adds_bos`` its post-processor puts <s> first (as Gemma's
    tokenizer does), while ``add_bos_token`` stays False: only encoding shows the convention."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def bert_config(**extra) -> BertConfig:
    return BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """model: a tiny LLaMA without a tokenizer; bos_tok / plain_tok: tokenizer folders;
    text: 30 JSONL documents of 40-80 words."""
    root = tmp_path_factory.mktemp("inputs")
    llama().save_pretrained(root / "model")
    word_tokenizer(True).save_pretrained(root / "bos_tok")
    word_tokenizer(False).save_pretrained(root / "plain_tok")
    rng = random.Random(0)
    docs = [
        " ".join(f"w{rng.randrange(60)}" for _ in range(rng.randrange(40, 80))) for _ in range(30)
    ]
    (root / "text.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return {name: root / name for name in ("model", "bos_tok", "plain_tok")} | {
        "text": root / "text.jsonl"
    }


def _by_hand(docs: list[str], bos: bool) -> torch.Tensor:
    """Windows built without the library: each document's words as ids, EOS after each; with
    BOS, SEQ - 1 text tokens after a BOS, else SEQ text tokens."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    ids = [i for d in docs for i in [vocab[w] for w in d.split()] + [EOS]]
    step = SEQ - 1 if bos else SEQ
    rows = [ids[k : k + step] for k in range(0, len(ids) - step + 1, step)]
    return torch.tensor([([BOS] if bos else []) + r for r in rows])


def _perplexity_by_hand(model, windows: torch.Tensor) -> float:
    """exp(mean NLL) of every token after the first of each window, from log-softmax."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(1, w[1:, None]).sum())
            n += len(w) - 1
    return math.exp(nll / n)


def _measure(model_dir, text, *extra):
    args = ["measure", str(model_dir), "--data", str(text), "--json", "--seq-len", str(SEQ)]
    return runner.invoke(app, [*args, "--windows", "1000", *extra])


# --- case 9: a model folder without a tokenizer -------------------------------------------


def test_measure_without_a_tokenizer_names_it_and_takes_tokenizer(folders) -> None:
    result = _measure(folders["model"], folders["text"])
    assert result.exit_code == 2, result.output
    assert f"no usable tokenizer in {folders['model']}" in result.output
    assert "pass --tokenizer DIR" in result.output
    result = _measure(folders["model"], folders["text"], "--tokenizer", str(folders["plain_tok"]))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["windows"] > 1
    empty = folders["model"].parent / "empty"
    empty.mkdir(exist_ok=True)
    result = _measure(folders["model"], folders["text"], "--tokenizer", str(empty))
    assert result.exit_code == 2 and f"no usable tokenizer in {empty}" in result.output


def test_export_needs_no_tokenizer(folders, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    args = ["export", str(folders["model"]), "--out", str(out), "--dense", "--no-cache"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.stat().st_size > 0


def test_sparsify_without_a_tokenizer_refuses_then_runs_with_one(folders, tmp_path) -> None:
    """No tokenizer: exit 2 before anything is written. With --tokenizer (one that adds BOS):
    the run ends, saves that tokenizer with the model, and its baseline perplexity is the
    original model's on held-out windows that each start with BOS (case 10 in sparsify)."""
    config = tmp_path / "c.json"
    fast = {"eval_windows": 3, "calib_windows": 2, "sweep_thresholds": [0.0], "seq_len": SEQ}
    config.write_text(json.dumps({**fast, "batch_size": 2, "stages": [[0.0, 1], [0.1, 2]]}))
    out = tmp_path / "out"
    args = ["sparsify", "--model", str(folders["model"]), "--data", str(folders["text"])]
    args += ["--config", str(config), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "no usable tokenizer" in result.output and "--tokenizer DIR" in result.output
    assert not out.exists()

    result = runner.invoke(app, [*args, "--tokenizer", str(folders["bos_tok"])])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["bos"] is True and report["bos_token_id"] == BOS
    assert report["tokenizer"] == str(folders["bos_tok"].resolve())
    assert (out / "tokenizer.json").is_file()  # the output folder is complete
    held_out = split_documents(load_documents(folders["text"]), seed=0).held_out
    windows = spread(_by_hand(held_out, bos=True), 3)
    assert (windows[:, 0] == BOS).all() and report["data_split"]["held_out_windows"] == 3
    expected = _perplexity_by_hand(LlamaForCausalLM.from_pretrained(folders["model"]), windows)
    assert report["baseline_perplexity"] == pytest.approx(expected, rel=1e-4)
    # the written folder measures with its own (saved) tokenizer, BOS included
    result = _measure(out, folders["text"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bos"] is True


# --- case 10: perplexity windows follow the tokenizer's BOS convention ----------------------


@pytest.mark.parametrize("bos", [True, False])
def test_measure_windows_follow_the_tokenizers_bos(folders, bos) -> None:
    tok_dir = folders["bos_tok" if bos else "plain_tok"]
    result = _measure(folders["model"], folders["text"], "--tokenizer", str(tok_dir))
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["bos"] is bos and got["bos_token_id"] == (BOS if bos else None)
    windows = _by_hand(load_documents(folders["text"]), bos=bos)
    assert got["windows"] == windows.shape[0] and got["tokens"] == windows.numel()
    expected = _perplexity_by_hand(LlamaForCausalLM.from_pretrained(folders["model"]), windows)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)
    args = ["measure", str(folders["model"]), "--data", str(folders["text"])]
    text = runner.invoke(app, [*args, "--seq-len", str(SEQ), "--tokenizer", str(tok_dir)])
    assert text.exit_code == 0, text.output
    said = f"each starting with BOS (id {BOS}, not scored)" if bos else "no BOS"
    assert said in text.stdout


def test_bos_detection_reads_what_the_tokenizer_does() -> None:
    with_bos, without = word_tokenizer(True), word_tokenizer(False)
    assert not with_bos.add_bos_token  # the flag says no; encoding says yes
    assert bos_token_id(with_bos) == BOS and bos_token_id(without) is None
    docs = ["w1 w2 w3 w4 w5", "w6 w7"]
    windows = [[BOS, 5, 6, 7], [BOS, 8, 9, EOS], [BOS, 10, 11, EOS]]  # 3 text tokens each
    assert token_windows(with_bos, docs, 4).tolist() == windows
    assert token_windows(without, docs, 4).tolist() == [[5, 6, 7, 8], [9, EOS, 10, 11]]
    assert token_windows(with_bos, docs, 4, bos=False).tolist() == [[5, 6, 7, 8], [9, EOS, 10, 11]]


def test_smollm2_tokenizer_adds_no_bos(smollm2) -> None:
    """The main job's tokenizer: no BOS, so its windows (and numbers) are as before."""
    _, tok = smollm2
    assert tok.bos_token_id is not None and bos_token_id(tok) is None
    docs = ["The history of the world.", "Second document here, a little longer than that."]
    ids = [i for d in docs for i in tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    assert token_windows(tok, docs, 8).flatten().tolist() == ids[: len(ids) // 8 * 8]


# --- case 12: encoders and checkpoints without an LM head -----------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, folders):
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(path)
    word_tokenizer(False).save_pretrained(path)
    return path


def _all_commands(model_dir, text, tmp_path):
    return {
        "measure": ["measure", str(model_dir), "--data", str(text), "--seq-len", str(SEQ)],
        "sparsify": ["sparsify", "--model", str(model_dir), "--data", str(text)]
        + ["--out", str(tmp_path / "out")],
        "export": ["export", str(model_dir), "--out", str(tmp_path / "m.onnx"), "--dense"],
    }


def test_an_encoder_is_refused_by_every_causal_lm_command(bert_dir, folders, tmp_path) -> None:
    for name, args in _all_commands(bert_dir, folders["text"], tmp_path).items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert "holds a BertModel (model_type 'bert')" in result.output, (name, result.output)
        assert "no causal language-model head" in result.output
        assert "*ForCausalLM" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_generate_refuses_a_file_exported_from_an_encoder(bert_dir, monkeypatch) -> None:
    """An ONNX file whose metadata names an encoder (exported through the API, or by an older
    version from an encoder folder) is refused before any token is generated."""
    pytest.importorskip("onnxruntime")
    import prosparse_fx.onnx as onnx_api

    for metadata, named in (
        ({"architecture": "BertModel", "source": str(bert_dir)}, "exported from a BertModel"),
        ({"source": str(bert_dir)}, "holds a BertModel"),
    ):

        class Fake:
            meta = metadata

            def __init__(self, path):
                self.metadata = self.meta

            def generate(self, *a, **kw):
                raise AssertionError("must not generate")

        monkeypatch.setattr(onnx_api, "OnnxCausalLM", Fake)
        result = runner.invoke(app, ["generate", "x.onnx", "--prompt", "w1 w2"])
        assert result.exit_code == 2, result.output
        assert named in result.output and "causal" in result.output


def test_a_bidirectional_lm_head_model_is_refused(folders, tmp_path) -> None:
    """BertLMHeadModel is in transformers' causal-LM table, but with is_decoder false it attends
    both ways: its 'next-token' predictions see the token they predict."""
    BertLMHeadModel(bert_config()).save_pretrained(tmp_path / "m")
    word_tokenizer(False).save_pretrained(tmp_path / "m")
    result = _measure(tmp_path / "m", folders["text"])
    assert result.exit_code == 2, result.output
    assert "is_decoder: false" in result.output and "*ForCausalLM" in result.output


def test_a_checkpoint_without_its_lm_head_is_refused(folders, tmp_path) -> None:
    model_dir = tmp_path / "headless"
    llama(tie=False).save_pretrained(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    word_tokenizer(False).save_pretrained(model_dir)
    for name, args in _all_commands(model_dir, folders["text"], tmp_path).items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert "lacks weights of its LlamaForCausalLM: lm_head.weight" in result.output, name
    # a tied head is not in the checkpoint either, and that is complete
    tied = tmp_path / "tied"
    llama(tie=True).save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    result = _measure(tied, folders["text"], "--tokenizer", str(folders["plain_tok"]))
    assert result.exit_code == 0, result.output


def test_a_tokenizer_larger_than_the_embedding_is_refused(folders, tmp_path) -> None:
    """Token ids past the embedding would crash or, worse, belong to another model."""
    cfg = llama().config
    cfg.vocab_size = 32
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "small")
    result = _measure(tmp_path / "small", folders["text"], "--tokenizer", str(folders["plain_tok"]))
    assert result.exit_code == 2, result.output
    assert f"has {len(WORDS)} tokens but the model's embedding has 32 rows" in result.output
    assert "--tokenizer DIR" in result.output


def test_measure_seed_with_the_whole_text_is_refused(folders) -> None:
    """--seed chooses the held-out split; with --whole (or --data without --held-out) it would
    be ignored silently, so it is refused before the model is loaded."""
    tok = ["--tokenizer", str(folders["plain_tok"])]
    for extra in (["--whole", "--seed", "3"], ["--seed", "3"]):
        result = _measure(folders["model"], folders["text"], *tok, *extra)
        assert result.exit_code == 2, result.output
        assert "drop --seed, or add --held-out" in result.output
    ok = _measure(folders["model"], folders["text"], *tok, "--held-out", "--seed", "3")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["text"] == "held-out split (seed 3)"
