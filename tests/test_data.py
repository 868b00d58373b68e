"""Text loading, splitting by document, and token windows."""

import bz2
import json

import pytest
import torch

from prosparse_fx.data import load_documents, split_documents, token_windows
from prosparse_fx.errors import InputError

WIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Alpha</title><ns>0</ns><revision><text>'''Alpha''' is a [[letter|Greek letter]]
used in {{cite|x}} many places. {lorem}</text></revision></page>
<page><title>Beta</title><ns>0</ns><revision><text>#REDIRECT [[Alpha]]</text></revision></page>
<page><title>Talk:Alpha</title><ns>1</ns><revision><text>{lorem}</text></revision></page>
</mediawiki>""".replace("{lorem}", "Lorem ipsum dolor sit amet. " * 10)


def test_mediawiki_dump(tmp_path) -> None:
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(WIKI.encode()))
    docs = load_documents(path)
    assert len(docs) == 1  # the redirect and the talk page are skipped
    assert docs[0].startswith("Alpha is a Greek letter\nused in many places.")
    assert "[[" not in docs[0] and "'''" not in docs[0] and "{{" not in docs[0]


def test_default_sample_is_wikipedia() -> None:
    docs = load_documents()
    assert len(docs) > 100
    assert any(d.startswith("Anarchism") for d in docs)


def test_jsonl_and_errors(tmp_path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n\n")
    assert load_documents(good) == ["one", "two"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(InputError, match='b.jsonl:1 has no string "text"'):
        load_documents(bad)
    broken = tmp_path / "c.jsonl"
    broken.write_text("{oops\n")
    with pytest.raises(InputError, match="not valid JSON"):
        load_documents(broken)


def test_plain_text_documents(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("doc one\nstill one\n\n\ndoc two\n\n---\n\ndoc three")
    assert load_documents(path) == ["doc one\nstill one", "doc two", "doc three"]
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("a\n\nb\n\nc")
    assert load_documents(paragraphs) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "  \n", "holds no text"),
        ("data.csv", "a,b", "unknown data format"),
    ],
)
def test_bad_data_paths(tmp_path, name, content, match) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match):
        load_documents(path)


def test_split_is_by_document_and_disjoint() -> None:
    docs = [f"document {i}" for i in range(40)]
    split = split_documents(docs, held_out=0.1, calib=0.05, seed=3)
    parts = [set(split.train), set(split.calib), set(split.held_out)]
    assert sum(len(p) for p in parts) == 40 and set().union(*parts) == set(docs)
    assert len(split.held_out) == 4 and len(split.calib) == 2
    assert split_documents(docs, seed=3) == split_documents(docs, seed=3)
    with pytest.raises(InputError, match="at least 3 documents"):
        split_documents(["a", "b"])


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_token_windows() -> None:
    w = token_windows(_CharTokenizer(), ["abc", "de"], seq_len=3)
    assert w.dtype == torch.long
    assert w.tolist() == [[97, 98, 99], [0, 100, 101]]  # EOS joins documents, tail dropped
    assert token_windows(_CharTokenizer(), ["abcdefgh"] * 5, 2, max_windows=3).shape == (3, 2)
    with pytest.raises(InputError, match="shorter than one window"):
        token_windows(_CharTokenizer(), ["ab"], seq_len=8)


class _BosCharTokenizer(_CharTokenizer):
    """Puts BOS (1) first when it encodes a text with its special tokens (the default)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_token_windows_follow_the_tokenizers_bos() -> None:
    from prosparse_fx.data import bos_token_id

    assert bos_token_id(_BosCharTokenizer()) == 1 and bos_token_id(_CharTokenizer()) is None
    # BOS, then seq_len - 1 text tokens: every text token is predicted, BOS never is
    w = token_windows(_BosCharTokenizer(), ["abc", "de"], seq_len=3)
    assert w.tolist() == [[1, 97, 98], [1, 99, 0], [1, 100, 101]]
    assert token_windows(_BosCharTokenizer(), ["abc", "de"], 3, bos=False).tolist() == [
        [97, 98, 99],
        [0, 100, 101],
    ]
    with pytest.raises(InputError, match="no BOS token"):
        token_windows(_CharTokenizer(), ["abc"], 2, bos=True)
