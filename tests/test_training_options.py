"""The trainer's options: learning-rate decay, distillation from the original model, the
training mix and the out-of-domain texts (issue 14)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from prosparse_fx.config import SparsifyConfig
from prosparse_fx.data import sample_windows, spread
from prosparse_fx.errors import InputError
from prosparse_fx.texts import OUT_OF_DOMAIN, TEXTS, TRAINABLE, load_text
from prosparse_fx.training.distill import Distillation, check_teacher, check_teacher_memory
from prosparse_fx.training.distributed import DistContext
from prosparse_fx.training.trainer import lr_factor


def _llama(vocab: int = 64, hidden: int = 16, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- learning-rate schedule


def test_lr_factor_warmup_then_constant_is_the_old_schedule() -> None:
    old = [min(1.0, (s + 1) / 11) for s in range(40)]  # the schedule before lr_decay existed
    new = [lr_factor(s, warmup=10, total=40, decay="constant", min_ratio=0.1) for s in range(40)]
    assert new == old


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_factor_decays_from_one_to_the_floor(decay: str) -> None:
    values = [lr_factor(s, warmup=4, total=24, decay=decay, min_ratio=0.2) for s in range(25)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0)
    assert values[24] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    # halfway through the decay: linear is at the midpoint, cosine too (cos(pi/2) = 0)
    assert values[14] == pytest.approx(0.6)


def test_lr_factor_refuses_an_unknown_decay() -> None:
    with pytest.raises(ValueError, match="lr decay"):
        lr_factor(0, warmup=0, total=10, decay="step", min_ratio=0.1)


# ---------------------------------------------------------------- distillation


def test_kl_term_matches_a_hand_computed_kl_at_temperature() -> None:
    teacher, student = _llama(seed=0), _llama(seed=1)
    ids = torch.randint(0, 64, (2, 7))
    t = 2.0
    d = Distillation(teacher, mix=0.25, temperature=t)
    s_logits = student(input_ids=ids).logits
    with torch.no_grad():  # by hand, in float64
        p = F.softmax(teacher(input_ids=ids).logits.double() / t, dim=-1)
        q = F.softmax(s_logits.detach().double() / t, dim=-1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean() * t * t
    kl = d.kl(s_logits, ids)
    assert float(kl) == pytest.approx(float(by_hand), rel=1e-5)
    lm = torch.tensor(3.0)
    assert float(d.combine(lm, kl)) == pytest.approx(0.75 * 3.0 + 0.25 * float(by_hand))
    # the gradient reaches the student, never the teacher
    kl.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_kl_of_the_teacher_to_itself_is_zero() -> None:
    teacher = _llama()
    ids = torch.randint(0, 64, (1, 5))
    d = Distillation(teacher, mix=1.0)
    assert float(d.kl(teacher(input_ids=ids).logits, ids)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("mix", "temperature", "match"),
    [
        (-0.1, 1.0, "distill"),
        (1.5, 1.0, "distill"),
        (math.nan, 1.0, "distill"),
        (0.5, 0.0, "distill_temperature"),
        (0.5, -1.0, "distill_temperature"),
        (0.5, math.nan, "distill_temperature"),
    ],
)
def test_bad_mix_or_temperature_is_refused(mix: float, temperature: float, match: str) -> None:
    with pytest.raises(InputError, match=match):
        Distillation(_llama(), mix=mix, temperature=temperature)
    with pytest.raises(InputError, match=match):
        SparsifyConfig(distill=mix, distill_temperature=temperature).validate()


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"vocab": 80}, "vocab_size"), ({"hidden": 24}, "hidden_size")]
)
def test_a_teacher_of_another_shape_is_refused_by_name(kwargs: dict, field: str) -> None:
    with pytest.raises(InputError, match=field):
        check_teacher(_llama(**kwargs), _llama())


def test_a_teacher_of_another_architecture_is_refused_by_name() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(InputError, match="model_type"):
        check_teacher(gpt2, _llama())


def test_a_teacher_that_does_not_fit_in_memory_is_refused_before_training(monkeypatch) -> None:
    import prosparse_fx.training.distill as distill

    teacher = _llama()
    size = sum(p.numel() * 4 for p in teacher.parameters())
    monkeypatch.setattr(distill, "available_memory", lambda device: size)  # 1 copy, not 4
    sharded = DistContext(rank=0, world_size=4, sharding="fsdp")
    with pytest.raises(InputError, match="GiB are free.*--sharding fsdp"):
        check_teacher_memory(teacher, sharded, "cpu")
    monkeypatch.setattr(distill, "available_memory", lambda device: 2 * size)
    check_teacher_memory(teacher, sharded, "cpu")  # 1 + 3/4 copies fit in 2
    with pytest.raises(InputError, match="distillation needs"):
        check_teacher_memory(teacher, DistContext(), "cpu")  # one process: 1 + 3 copies


# ---------------------------------------------------------------- texts


def test_out_of_domain_texts_are_never_trainable() -> None:
    assert set(OUT_OF_DOMAIN) <= set(TEXTS)
    assert not set(OUT_OF_DOMAIN) & set(TRAINABLE)
    with pytest.raises(InputError, match="never enter training"):
        SparsifyConfig(train_texts=["shakespeare"]).validate()
    with pytest.raises(InputError, match="not out-of-domain"):
        SparsifyConfig(eval_texts=["wikipedia"]).validate()
    with pytest.raises(InputError, match="twice"):
        SparsifyConfig(eval_texts=["shakespeare", "shakespeare"]).validate()
    with pytest.raises(InputError, match="list of text names"):
        SparsifyConfig(train_texts="news").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["news", "shakespeare", "python-docs"])
def test_each_text_loads_as_several_plain_documents(name: str) -> None:
    docs = load_text(name)
    assert len(docs) >= 30
    assert all(isinstance(d, str) and d.strip() for d in docs)
    if name == "shakespeare":
        assert not any("**" in d for d in docs)  # markdown speaker marks became "NAME:"
        assert any("HAMLET:" in d for d in docs)


def test_unknown_text_is_refused() -> None:
    with pytest.raises(InputError, match="unknown text"):
        load_text("klingon")


class _Chars:
    """A tokenizer of characters (ids 0..255), no BOS, EOS 0."""

    bos_token_id = None
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [min(ord(c), 255) for c in text]}


def test_sample_windows_spans_the_documents_without_tokenizing_all() -> None:
    docs = [chr(ord("a") + i) * 100 for i in range(20)]  # 20 documents of one letter each
    w = sample_windows(_Chars(), docs, 10, 5)
    assert w.shape == (5, 10)
    firsts = {int(row[0]) for row in w}
    assert ord("a") in firsts and ord("t") in firsts  # first and last document
    # fewer documents than windows: several windows per document
    w = sample_windows(_Chars(), docs[:2], 10, 6)
    assert w.shape == (6, 10)
    with pytest.raises(InputError, match="no window"):
        sample_windows(_Chars(), ["ab", "cd"], 10, 3)
    # a picked document shorter than one window: an unpicked one makes up for it (python-docs
    # gave 15 windows for 16)
    short = [d if i != 19 else "t" * 5 for i, d in enumerate(docs)]
    w = sample_windows(_Chars(), short, 10, 5)
    assert w.shape == (5, 10)
    assert ord("t") not in {int(row[0]) for row in w}


def test_spread_keeps_first_and_last() -> None:
    w = torch.arange(10).view(10, 1)
    assert spread(w, 4).view(-1).tolist() == [0, 3, 6, 9]
    assert spread(w, 20).shape[0] == 10


# ---------------------------------------------------------------- smooth substitution


def test_smooth_substitution_blends_silu_into_relu_then_is_the_relu_model() -> None:
    from prosparse_fx.ffn import find_ffn_sites
    from prosparse_fx.relufy import relufy_
    from prosparse_fx.training.substitution import SmoothSubstitution

    model = _llama()
    ids = torch.randint(0, 64, (2, 6))
    sites = find_ffn_sites(model)
    originals = [s.activation for s in sites]
    with torch.no_grad():
        silu_logits = model(input_ids=ids).logits
    sites = relufy_(model, "relu", sites=sites)
    with torch.no_grad():
        relu_logits = model(input_ids=ids).logits
    paths = [s.activation_module for s in sites]
    seen = []
    act = dict(model.named_modules())[paths[0]]
    blend = SmoothSubstitution(model, paths, originals, steps=4)
    with blend, torch.no_grad():
        # registered after the blend's hook, so it sees the blended output
        probe = act.register_forward_hook(
            lambda m, a, out: seen.append((a[0].clone(), out.clone()))
        )
        blend.set_step(0)
        assert torch.allclose(model(input_ids=ids).logits, silu_logits, atol=1e-6)
        blend.set_step(1)  # beta = 1/4
        model(input_ids=ids)
        x, out = seen[-1]
        assert torch.allclose(out, 0.75 * F.silu(x) + 0.25 * F.relu(x), atol=1e-6)
        blend.set_step(4)
        assert torch.equal(model(input_ids=ids).logits, relu_logits)
    probe.remove()
    state = set(model.state_dict())
    assert all("act_fn" not in k or "threshold" in k for k in state)  # no blend weights saved
    with torch.no_grad():  # hooks gone: the ReLU model
        assert torch.equal(model(input_ids=ids).logits, relu_logits)
    with pytest.raises(InputError, match="substitution"):
        SmoothSubstitution(model, paths, ["relu"] * len(paths), steps=4)


# ---------------------------------------------------------------- thresholds against a budget


@pytest.mark.parametrize("per_layer", [False, True])
def test_budget_thresholds_are_the_sparsest_within_the_budget_and_leave_the_model_alone(
    per_layer: bool,
) -> None:
    from prosparse_fx.ffn import find_ffn_sites
    from prosparse_fx.measure import evaluate
    from prosparse_fx.relufy import relufy_
    from prosparse_fx.threshold import calibrate_to_budget, shift_thresholds_

    model = _llama()
    sites = relufy_(model, "relu", sites=find_ffn_sites(model))
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    before = model(input_ids=windows).logits.detach()
    choice = calibrate_to_budget(model, windows, 1.02, sites, iterations=5, per_layer=per_layer)
    if not per_layer:  # one threshold per model
        assert len(set(choice["thresholds"])) == 1
    assert torch.equal(model(input_ids=windows).logits.detach(), before)  # left unshifted
    assert len(choice["tried"]) == 5
    assert choice["calib_perplexity"] <= 1.02 * choice["unshifted_perplexity"]
    # every tried target that fits is at most the chosen one, every one that does not is above
    for row in choice["tried"]:
        if row["fits"]:
            assert row["target_sparsity"] <= choice["target_sparsity"]
        else:
            assert row["target_sparsity"] > choice["target_sparsity"]
            assert row["perplexity"] > 1.02 * choice["unshifted_perplexity"]
    # the thresholds give what the choice says, measured again from scratch
    shifted = shift_thresholds_(model, choice["thresholds"], sites)
    again = evaluate(model, windows, sites=shifted)
    assert again.perplexity == pytest.approx(choice["calib_perplexity"], rel=1e-5)
    assert again.sparsity.sparsity == pytest.approx(choice["calib_sparsity"], abs=1e-6)
    with pytest.raises(ValueError, match="budget"):
        calibrate_to_budget(model, windows, 0.9, sites)
    with pytest.raises(InputError, match="threshold_budget"):
        SparsifyConfig(threshold_budget=0.5).validate()


# ---------------------------------------------------------------- training-throughput benchmark


def test_bench_train_step_runs_every_variant_on_a_tiny_model(tmp_path, tiny_model_dir) -> None:
    """benchmarks/bench_train_step.py end to end on a tiny model: the four variants, eager's and
    the compiled step's first losses equal (the script asserts it), finite timings."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "train_step.json"
    argv = ["x", "--model", str(tiny_model_dir), "--batch-size", "2", "--seq-len", "8"]
    argv += ["--warmup", "1", "--repeats", "1", "--precision", "fp32", "--out-json", str(out)]
    old, sys.argv = sys.argv, argv
    try:
        bench.main()
    finally:
        sys.argv = old
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {
        "eager",
        "compiled",
        "eager + distill",
        "compiled + distill",
    }
    for row in result["variants"].values():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
    assert result["variants"]["eager"]["vs_eager"] == 1.0


def test_the_default_data_cannot_join_its_own_training_mix() -> None:
    """ "wikipedia" is the default data: joined to the training split it would train on the
    held-out and calibration documents (found by a reviewer), so it is refused."""
    with pytest.raises(InputError, match="not training texts"):
        SparsifyConfig(train_texts=["wikipedia"]).validate()
    SparsifyConfig(train_texts=["news"]).validate()


def test_substitution_on_a_model_that_is_relu_already_is_refused_before_any_work() -> None:
    from prosparse_fx.ffn import find_ffn_sites
    from prosparse_fx.pipeline import _ffn_sites
    from prosparse_fx.relufy import relufy_

    model = _llama()
    relufy_(model, "relu", sites=find_ffn_sites(model))
    with pytest.raises(InputError, match="set substitution = 0"):
        _ffn_sites(model, SparsifyConfig(substitution=0.5), resumed=False)
    assert len(_ffn_sites(model, SparsifyConfig(), resumed=False)) == 2
    # a resumed run's checkpoint is ReLU by construction: no refusal there
    assert len(_ffn_sites(model, SparsifyConfig(substitution=0.5), resumed=True)) == 2


def test_a_training_text_that_is_also_the_data_is_refused(tmp_path) -> None:
    """'news' in train_texts with --data the same news file (here as plain text, one paragraph
    per document) would train on the held-out documents: refused, naming the text; other data
    with 'news' is accepted."""
    from prosparse_fx.data import load_documents, split_documents
    from prosparse_fx.models import load_tokenizer, model_folder
    from prosparse_fx.texts import load_text
    from prosparse_fx.windows import RunWindows

    tok = load_tokenizer(model_folder(None))
    config = SparsifyConfig(train_texts=["news"], seq_len=32, eval_windows=2, calib_windows=2)
    same = tmp_path / "news.txt"
    same.write_text("\n\n".join(load_text("news")), encoding="utf-8")
    split = split_documents(load_documents(same), seed=0)
    with pytest.raises(InputError, match="train_texts 'news'.*held-out or calibration split"):
        RunWindows.make(tok, split, config)
    # the same text with every document cut in two halves (at a sentence end): no whole
    # document of 'news' is in the measured split any more, but its sentences are
    firsts, seconds = [], []
    for doc in load_text("news"):
        cut = doc.find(". ", len(doc) // 2)
        cut = cut if cut > 0 else doc.rfind(". ", 0, len(doc) // 2)
        cut = cut if cut > 0 else doc.find(" ", len(doc) // 2) - 1
        firsts.append(doc[: cut + 1])
        seconds.append(doc[cut + 2 :])
    cut_file = tmp_path / "news_halves.txt"  # all first halves, then all second halves
    cut_file.write_text("\n\n".join(firsts + seconds), encoding="utf-8")
    cut_split = split_documents(load_documents(cut_file), seed=0)
    with pytest.raises(InputError, match="train_texts 'news'.*held-out or calibration split"):
        RunWindows.make(tok, cut_split, config)
    other = tmp_path / "other.txt"
    other.write_text(
        "\n\n".join(f"Document {i} is about the number {i} and nothing else." for i in range(40)),
        encoding="utf-8",
    )
    windows = RunWindows.make(tok, split_documents(load_documents(other), seed=0), config)
    news_tokens = sum(len(tok(d)["input_ids"]) for d in load_text("news"))
    assert windows.train.numel() >= news_tokens * 0.9  # the news documents joined training


def test_config_round_trips_through_its_versioned_dict() -> None:
    """to_dict carries the version; from_dict reads it back equal, reads a hand-written dict
    without a version, and refuses a newer or malformed version by name."""
    config = SparsifyConfig(distill=0.5, lr_decay="cosine", train_texts=["news"], max_steps=9)
    data = config.to_dict()
    assert data["version"] == SparsifyConfig.VERSION == 1
    assert json.loads(json.dumps(data)) == data  # plain JSON values
    assert SparsifyConfig.from_dict(data) == config
    assert SparsifyConfig.from_dict({"distill": 0.5}) == SparsifyConfig(distill=0.5)
    with pytest.raises(InputError, match="version 2 was written by a newer prosparse-fx"):
        SparsifyConfig.from_dict({**data, "version": 2})
    for bad in ("1", 0, True, 1.0):
        with pytest.raises(InputError, match="config version must be a whole number"):
            SparsifyConfig.from_dict({**data, "version": bad})


def test_a_model_wide_threshold_is_the_quantile_of_all_layers_pooled() -> None:
    """calibrate_thresholds(per_layer=False): one t, the target quantile of every layer's gate
    pre-activations taken together (tapped here by hand); per layer, each layer's own."""
    from prosparse_fx.ffn import find_ffn_sites
    from prosparse_fx.relufy import relufy_
    from prosparse_fx.taps import tap_inputs
    from prosparse_fx.threshold import calibrate_thresholds

    model = _llama()
    sites = relufy_(model, "relu", sites=find_ffn_sites(model))
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    seen: list[list[torch.Tensor]] = [[] for _ in sites]
    with tap_inputs(model, [s.activation_module for s in sites], lambda i, x: seen[i].append(x)):
        model(input_ids=windows)
    layers = [torch.cat([x.flatten() for x in v]) for v in seen]

    def quantile(v: torch.Tensor, q: float) -> float:
        k = min(max(int(round(q * v.numel())), 1), v.numel())
        return max(float(v.sort().values[k - 1]), 0.0)

    for q in (0.3, 0.9):
        pooled = calibrate_thresholds(model, windows, q, sites, batch_size=4, per_layer=False)
        assert pooled == [pytest.approx(quantile(torch.cat(layers), q))] * len(sites)
        own = calibrate_thresholds(model, windows, q, sites, batch_size=4)
        assert own == [pytest.approx(quantile(v, q)) for v in layers]
    assert SparsifyConfig().threshold_scope == "model"
    with pytest.raises(InputError, match="threshold_scope"):
        SparsifyConfig(threshold_scope="neuron").validate()
