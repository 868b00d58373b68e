"""Text for training and evaluation: documents from the embedded Wikipedia sample or the user's
files, split by document (never by windows of one article), tokenized into fixed windows."""

from __future__ import annotations

import bz2
import importlib.util
import json
import logging
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

WIKI_PACKAGE = "gensim"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TEXT_SUFFIXES = {".txt", ".md", ".text"}
log = logging.getLogger(__name__)


def default_data_path() -> Path:
    """The English Wikipedia sample (about 105 articles, CC BY-SA) in ``gensim``'s test data.

    Raises:
        InputError: ``gensim`` is not installed (``pip install --no-deps gensim==4.4.0``).
    """
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(
            "the default text (Wikipedia sample) comes with the gensim package, which is not "
            "installed: run `pip install --no-deps gensim==4.4.0`, or pass --data FILE"
        )
    return Path(spec.origin).parent / WIKI_FILE


def _strip_wikitext(text: str) -> str:
    import mwparserfromhell

    plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
    plain = re.sub(r"[ \t]+", " ", plain)
    plain = re.sub(r"\n\s*\n+", "\n\n", plain)
    return plain.strip()


def read_mediawiki(path: Path, min_chars: int = 200) -> list[str]:
    """Article texts (markup stripped) of a MediaWiki XML dump (``.xml`` or ``.xml.bz2``).

    Redirects and pages outside the main namespace are skipped.
    """
    opener = bz2.open if path.suffix == ".bz2" else open
    docs = []
    with opener(path, "rb") as fh:
        for _event, elem in ET.iterparse(fh):
            if not elem.tag.endswith("}page") and elem.tag != "page":
                continue
            ns = next((c.text for c in elem.iter() if c.tag.endswith("ns")), "0")
            text = next((c.text for c in elem.iter() if c.tag.endswith("text")), None) or ""
            elem.clear()
            if ns != "0" or text.lstrip().upper().startswith("#REDIRECT"):
                continue
            plain = _strip_wikitext(text)
            if len(plain) >= min_chars:
                docs.append(plain)
    return docs


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
            except RecursionError as exc:
                raise InputError(
                    f"{path}:{lineno} is nested deeper than the JSON reader can follow; each "
                    'JSONL line must be an object like {"text": "..."}'
                ) from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise InputError(
                    f'{path}:{lineno} has no string "text" field; each JSONL line must be '
                    'an object like {"text": "..."}'
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(text[exc.start])
                raise InputError(
                    f'{path}:{lineno} has a lone surrogate (\\u{code:04x}) in its "text", which '
                    "is no Unicode character and no tokenizer can encode; write the text as UTF-8 "
                    "or pair the surrogate escapes"
                ) from exc
            docs.append(text)
    return docs


_RULE = re.compile(r"[ \t]*-{3,}[ \t]*")


def _read_plain(path: Path) -> list[str]:
    """A text file: documents are separated by a ``---`` line standing alone between blank
    lines (or at the start or end of the file) or by 2+ blank lines; a file with neither is one
    document per paragraph. A ``---`` line under a line of text (a reST heading underline) or
    above one separates nothing."""
    lines = path.read_text(encoding="utf-8").split("\n")

    def blank(i: int) -> bool:  # outside the file counts as blank
        return not 0 <= i < len(lines) or not lines[i].strip()

    chunks: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        if _RULE.fullmatch(line) and blank(i - 1) and blank(i + 1):
            chunks.append([])
        else:
            chunks[-1].append(line)
    parts = [p for c in chunks for p in re.split(r"\n\s*\n\s*\n+", "\n".join(c)) if p.strip()]
    if len(parts) == 1:
        parts = re.split(r"\n\s*\n", parts[0])
    return [p.strip() for p in parts if p.strip()]


def load_documents(path: str | Path | None = None) -> list[str]:
    """Load documents from the default Wikipedia sample or a user path.

    Accepted: a MediaWiki dump (``.xml``/``.xml.bz2``), a text file (``.txt``/``.md``), a JSONL
    file with a ``"text"`` field per line, a folder of text files (one document each), or a
    folder saved by ``datasets.Dataset.save_to_disk`` with a ``"text"`` column.

    Raises:
        InputError: the path does not exist, cannot be read, has an unknown format, or holds no
            text.
    """
    p = default_data_path() if path is None else Path(path)
    if not p.exists():
        raise InputError(f"data path {str(p)!r} does not exist; pass an existing file or folder")
    try:
        if p.is_dir():
            docs = _read_folder(p)
        elif ".xml" in p.name:
            docs = read_mediawiki(p)
        elif p.suffix == ".jsonl":
            docs = _read_jsonl(p)
        elif p.suffix in TEXT_SUFFIXES:
            docs = _read_plain(p)
        else:
            raise InputError(
                f'unknown data format {p.name!r}: use .txt/.md, .jsonl (one {{"text": ...}} per '
                "line), a MediaWiki .xml(.bz2) dump, or a folder"
            )
    except EOFError as exc:  # bz2: the stream stops before its end marker
        raise InputError(
            f"cannot read data {str(p)!r}: the compressed file ends early (truncated? an "
            f"interrupted download or copy): {exc}; fetch or copy it again"
        ) from exc
    except (OSError, UnicodeDecodeError, ET.ParseError) as exc:
        raise InputError(f"cannot read data {str(p)!r}: {exc}") from exc
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"data {str(p)!r} holds no text")
    return docs


def _read_folder(p: Path) -> list[str]:
    if (p / "dataset_info.json").exists() or (p / "state.json").exists():
        try:
            import datasets
        except ImportError as exc:
            raise InputError(
                f"{p} is a `datasets` folder; install it with `pip install datasets`"
            ) from exc
        ds = datasets.load_from_disk(str(p))
        if "text" not in ds.column_names:
            raise InputError(f"dataset {p} has no 'text' column (columns: {ds.column_names})")
        return [str(t) for t in ds["text"]]
    files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES | {".jsonl"})
    if not files:
        raise InputError(f"folder {p} holds no .txt, .md or .jsonl files")
    docs: list[str] = []
    for f in files:
        docs.extend(_read_jsonl(f) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")])
    return docs


@dataclass
class DocumentSplit:
    """Documents split three ways by document: training, threshold calibration, held-out.

    ``split_by``: ``"documents"`` (the text's own documents), or ``"size"`` when the text gave
    fewer than 3 and was cut into :data:`SIZE_PIECES` pieces of about equal size at line (or,
    for fewer lines, word) boundaries, which then stand for documents.
    """

    train: list[str]
    calib: list[str]
    held_out: list[str]
    split_by: str = "documents"


SIZE_PIECES = 20  # pieces of a text without document breaks: 5% steps, as the calibration part


def _pieces_by_size(docs: list[str], n: int) -> list[str]:
    """Cut documents into at most ``n`` pieces of about equal length at line boundaries (at
    word boundaries when there are fewer than 3 lines), in order; every line in one piece."""
    units = [line for d in docs for line in d.split("\n") if line.strip()]
    sep = "\n"
    if len(units) < 3:
        units, sep = [w for d in docs for w in d.split()], " "
    if len(units) < 3:
        return []
    total = sum(len(u) + 1 for u in units)
    pieces: list[list[str]] = [[]]
    done = 0  # characters in closed pieces and the open one
    for u in units:
        # close the open piece once it reaches its share of the text
        if pieces[-1] and done >= total * len(pieces) / n and len(pieces) < n:
            pieces.append([])
        pieces[-1].append(u)
        done += len(u) + 1
    return [sep.join(p) for p in pieces]


def split_documents(
    docs: list[str], held_out: float = 0.1, calib: float = 0.05, seed: int = 0
) -> DocumentSplit:
    """Shuffle documents with ``seed`` and split them; each part gets at least one document.

    A text of fewer than 3 documents (one long text without document breaks) is cut by size
    into :data:`SIZE_PIECES` pieces at line boundaries first, with a logged warning and
    ``split_by="size"`` in the result.

    Raises:
        InputError: fewer than 3 documents, and too little text (fewer than 3 lines or words)
            to cut into pieces.
    """
    split_by = "documents"
    if len(docs) < 3:
        pieces = _pieces_by_size(docs, SIZE_PIECES)
        if len(pieces) < 3:
            raise InputError(
                f"need at least 3 documents to split into train/calibration/held-out, got "
                f"{len(docs)}, too short to split by size; give more text, separate documents "
                "by blank lines or use JSONL"
            )
        log.warning(
            "the text holds %d document(s), fewer than the 3 a train/calibration/held-out split "
            "needs: split by size into %d pieces at line boundaries instead (separate documents "
            "by two blank lines, a --- line between blank lines, or use JSONL, to split by "
            "document)",
            len(docs),
            len(pieces),
        )
        docs, split_by = pieces, "size"
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(held_out * len(docs)))
    n_cal = max(1, round(calib * len(docs)))
    held = [docs[i] for i in order[:n_held]]
    cal = [docs[i] for i in order[n_held : n_held + n_cal]]
    train = [docs[i] for i in order[n_held + n_cal :]]
    return DocumentSplit(train, cal, held, split_by)


_BOS_PROBE = "Hello world"


def bos_token_id(tokenizer) -> int | None:  # noqa: ANN001
    """The BOS id when ``tokenizer`` puts BOS first when it encodes text by default (Gemma,
    LLaMA-2: models trained to see BOS first), else ``None`` (SmolLM2, Qwen, GPT-2).

    Decided by what the tokenizer does, not by ``add_bos_token`` (a post-processor may add BOS
    while that flag says ``False``): ``tokenizer(text).input_ids`` must be ``[bos] + ids`` where
    ``ids`` is the encoding without special tokens.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = list(tokenizer(_BOS_PROBE)["input_ids"])
    plain = list(tokenizer(_BOS_PROBE, add_special_tokens=False)["input_ids"])
    if with_special[:1] == [bos] and with_special[1 : 1 + len(plain)] == plain:
        return int(bos)
    return None


def token_windows(
    tokenizer,  # noqa: ANN001
    docs: list[str],
    seq_len: int,
    max_windows: int | None = None,
    *,
    bos: bool | None = None,
) -> torch.Tensor:
    """Tokenize documents, join them with EOS, cut into ``[N, seq_len]`` int64 windows.

    BOS follows the tokenizer's own convention (``bos=None``, see :func:`bos_token_id`): when it
    adds BOS to a text, every window is BOS followed by ``seq_len - 1`` text tokens, so the model
    sees what it was trained on and every text token is predicted (the BOS position is never a
    target); otherwise a window is ``seq_len`` text tokens. ``bos=True``/``False`` forces it.

    Windows never straddle the split (each split is tokenized on its own); the tail shorter
    than one window is dropped.

    Raises:
        InputError: the text is shorter than one window; ``bos=True`` for a tokenizer without a
            BOS token.
    """
    if bos is None:
        bos_id = bos_token_id(tokenizer)
    elif bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise InputError("bos=True, but the tokenizer has no BOS token")
    else:
        bos_id = None
    step = seq_len - 1 if bos_id is not None else seq_len
    if step < 1:
        raise InputError(f"a window of {seq_len} tokens holds no text after BOS; use >= 2")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_windows is not None and len(ids) >= (max_windows + 1) * step:
            break
    n = len(ids) // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(
            f"the text has {len(ids)} tokens, shorter than one window of {step} text tokens; "
            "give more text or a smaller --seq-len"
        )
    windows = torch.tensor(ids[: n * step], dtype=torch.long).view(n, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def spread(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` of ``windows`` (``[N, T]``) spread evenly over all of them, first and last
    included, so they span many documents; all of them when ``N <= n``."""
    if windows.shape[0] <= n:
        return windows
    idx = torch.linspace(0, windows.shape[0] - 1, n).round().long()
    return windows[idx]


def sample_windows(
    tokenizer,  # noqa: ANN001
    docs: list[str],
    seq_len: int,
    n: int,
) -> torch.Tensor:
    """About ``n`` ``[n, seq_len]`` windows from documents spread evenly over ``docs``, the
    first windows of each, without tokenizing whole long texts (37 plays are 1.7M tokens).

    Each of up to ``n`` documents (spread evenly) gives ``ceil(n / documents)`` windows (fewer
    if it is shorter); when short documents leave fewer than ``n``, the other documents, in
    order, make up for them; the windows are then spread down to ``n``. BOS as in
    :func:`token_windows`.

    Raises:
        InputError: the documents give no window of ``seq_len`` tokens.
    """
    picked = spread(torch.arange(len(docs)).view(-1, 1), n).view(-1).tolist()
    per_doc = -(-n // len(picked))
    rest = sorted(set(range(len(docs))) - set(picked))
    parts, total = [], 0
    for i, index in enumerate(picked + rest):
        if i >= len(picked) and total >= n:
            break  # the other documents only make up for short ones
        try:
            parts.append(token_windows(tokenizer, [docs[index]], seq_len, max_windows=per_doc))
        except InputError:
            continue  # a document shorter than one window
        total += parts[-1].shape[0]
    if not parts:
        raise InputError(f"the text gives no window of {seq_len} tokens")
    return spread(torch.cat(parts), n)
