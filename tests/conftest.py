import os

# Triton decides at import whether it interprets: without a GPU, its kernels run on CPU tensors
# under the interpreter (small shapes only).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.models import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M model and tokenizer (converted from GGUF once, then cached)."""
    from prosparse_fx.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A tiny random LLaMA saved with SmolLM2's tokenizer: a fast model folder for the CLI."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


__all__ = ["tiny"]


@pytest.fixture(scope="session")
def word_llama(tmp_path_factory):
    """``(model_dir, text_file)``: a tiny LLaMA over the word vocabulary of
    :func:`tests.models.word_tokenizer` (64 tokens, context 64), saved with that tokenizer, and
    a JSONL text of 30 documents of those words. Saves and loads in milliseconds."""
    import json
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.models import WORDS, word_text, word_tokenizer

    root = tmp_path_factory.mktemp("word-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    docs = [word_text(rng, rng.randrange(60, 120)) for _ in range(30)]
    (root / "text.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return root / "model", root / "text.jsonl"


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A JSONL text of the first 30 articles of the Wikipedia sample (3000 characters each)."""
    import json

    from prosparse_fx.data import load_documents

    path = tmp_path_factory.mktemp("data") / "wiki.jsonl"
    docs = load_documents()[:30]
    path.write_text("\n".join(json.dumps({"text": d[:3000]}) for d in docs))
    return path


@pytest.fixture(params=["cpp", "torch"])
def cpu_path(request):
    """Run a test with the CPU kernels' C++ helper and with their pure-torch fallback."""
    from prosparse_fx.kernels import cpu_ext

    if request.param == "cpp":
        assert cpu_ext.get() is not None, "the C++ helper did not build on this machine"
        yield request.param
        return
    saved = cpu_ext._state.get("module")
    cpu_ext._state["module"] = None
    yield request.param
    cpu_ext._state["module"] = saved
