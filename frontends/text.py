"""Offline English text for calibration and evaluation.

The corpus is built, without any download, from two sources that ship with the
environment:

* scikit-learn's bundled dataset descriptions (``load_*().DESCR`` and the files in
  ``sklearn/datasets/descr/*.rst``), when scikit-learn is installed;
* docstrings (``inspect.getdoc``) of a fixed list of Python standard-library modules,
  of their public functions and classes, and of those classes' public methods.

Markup is stripped, the text is cut into sentences, sentences of 5..60 words that
look like prose are kept, and duplicates are dropped (first occurrence wins). Each
sentence is assigned to the ``calib`` or the ``eval`` split by a stable hash of its
text, so the splits are disjoint and do not depend on ``PYTHONHASHSEED``. The
corpus is deterministic for a given Python and scikit-learn version.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.errors import CalibrationError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "english_sentences", "english_text"]

SPLITS = ("calib", "eval")
MIN_WORDS = 5
MAX_WORDS = 60

_SKLEARN_LOADERS = (
    "load_iris",
    "load_digits",
    "load_diabetes",
    "load_breast_cancer",
    "load_wine",
    "load_linnerud",
)

# Modules importable without side effects on every CPython build we support.
_STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar",
    "cmath", "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "doctest", "email", "email.message", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math",
    "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os",
    "os.path", "pathlib", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "profile", "pstats", "queue", "quopri", "random", "re", "reprlib",
    "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "site",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string",
    "struct", "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback",
    "tracemalloc", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zipimport", "zlib", "zoneinfo",
)  # fmt: skip

_ABBREVIATIONS = (
    "e.g.", "i.e.", "etc.", "et al.", "vs.", "cf.", "Dr.", "Fig.", "No.", "pp.", "Vol.", "vol.",
    "Proc.", "Inc.", "Jr.", "Mr.", "Ms.", "St.",
)  # fmt: skip
# A sentence ends at . ! ? followed by a capital, except after a one-letter initial ("M. Smith").
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[A-Z]\.)\s+(?=[A-Z\"'(])")
_BAD_CHARS = re.compile(r"[=<>{}\[\]|\\$#@^~_*`%/]|\.\.\.|::|https?:|\w\.\w+\(")
_WORD = re.compile(r"^\(?[A-Za-z][A-Za-z'-]*[.,;:!?)\"']*$")
_MIN_WORD_SHARE = 0.8


@dataclass(frozen=True)
class _Corpus:
    """Clean sentences grouped by source document, plus each sentence's split."""

    documents: tuple[tuple[str, ...], ...]
    splits: dict[str, tuple[str, ...]]


# --------------------------------------------------------------------------- sources


def _sklearn_documents() -> list[str]:
    """Dataset descriptions bundled with scikit-learn (empty when it is not installed)."""
    try:
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError:
        logger.warning("scikit-learn is not installed; the English corpus uses docstrings only")
        return []
    docs = [str(getattr(datasets, name)().DESCR) for name in _SKLEARN_LOADERS]
    descr = Path(str(datasets.__file__)).parent / "descr"
    docs.extend(p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst")))
    return docs


def _public_members(module: Any) -> Iterator[Any]:
    """Public functions and classes defined in ``module`` (not re-exported), sorted by name."""
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) == module.__name__:
            yield obj


def _class_methods(cls: type) -> Iterator[Any]:
    """Public methods defined directly on ``cls``, sorted by name."""
    for name in sorted(vars(cls)):
        obj = vars(cls)[name]
        if not name.startswith("_") and inspect.isfunction(obj):
            yield obj


def _module_documents(name: str) -> list[str]:
    """Docstrings of one stdlib module, its public members and their public methods."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        logger.debug("stdlib module %s is not available; skipped", name)
        return []
    objects: list[Any] = [module]
    for member in _public_members(module):
        objects.append(member)
        if inspect.isclass(member):
            objects.extend(_class_methods(member))
    docs = (inspect.getdoc(obj) for obj in objects)
    return [doc for doc in docs if doc]


def _stdlib_documents() -> list[str]:
    """Docstrings of the fixed list of standard-library modules, in list order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # e.g. typing.io, typing.re
        return [doc for name in _STDLIB_MODULES for doc in _module_documents(name)]


# ------------------------------------------------------------------------- cleaning


def _strip_inline_markup(text: str) -> str:
    """Remove RST inline markup: roles, links, literals, emphasis, footnote references."""
    text = re.sub(r":[\w:.-]+:`~?([^`<]*?)\s*(<[^>]*>)?`", r"\1", text)
    text = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_*", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), text)
    text = re.sub(r"\[\d+\]_|\[#\w*\]_", "", text)
    return text


def _is_markup_line(line: str) -> bool:
    """True for RST directives, section underlines, table borders, field lists and doctests."""
    stripped = line.strip()
    return bool(
        stripped.startswith((".. ", ">>>", "... ", "$ ", "+-", "|"))
        or re.fullmatch(r"([=\-~^*+#\"'`:.])\1{2,}[=\- ]*", stripped)
        or re.match(r":[^:\s][^:]*:(\s|$)", stripped)
    )


def _paragraphs(doc: str) -> Iterator[str]:
    """Split a document into paragraphs (blank lines and list bullets separate them)."""
    current: list[str] = []
    for raw in doc.splitlines():
        line = raw.strip()
        bullet = re.match(r"^([-*\u2022]|\d+[.)])\s+", line)
        if not line or _is_markup_line(raw) or bullet:
            if current:
                yield " ".join(current)
            current = [line[bullet.end() :]] if bullet else []
            continue
        current.append(line)
    if current:
        yield " ".join(current)


def _split_sentences(paragraph: str) -> list[str]:
    """Cut a paragraph at sentence ends, not after common abbreviations."""
    protected = paragraph
    for abbr in _ABBREVIATIONS:
        protected = protected.replace(abbr, abbr.replace(".", "\0"))
    return [s.replace("\0", ".").strip() for s in _SENTENCE_END.split(protected)]


def _is_prose(sentence: str) -> bool:
    """Keep 5..60-word sentences that start with a capital, end with . ! ? and read as words."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not (sentence[0].isupper() and sentence[-1] in ".!?") or _BAD_CHARS.search(sentence):
        return False
    share = sum(bool(_WORD.match(w)) for w in words) / len(words)
    return share >= _MIN_WORD_SHARE


def _clean_document(doc: str) -> tuple[str, ...]:
    """Return the prose sentences of one document, in order."""
    text = _strip_inline_markup(doc)
    sentences = (re.sub(r"\s+", " ", s) for p in _paragraphs(text) for s in _split_sentences(p))
    return tuple(s for s in sentences if _is_prose(s))


# --------------------------------------------------------------------------- corpus


def _split_of(sentence: str) -> str:
    """Stable split assignment from a BLAKE2b hash of the sentence."""
    digest = hashlib.blake2b(sentence.encode("utf-8"), digest_size=8).digest()
    return SPLITS[digest[-1] & 1]


def _dedupe(documents: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Drop repeated sentences (first occurrence wins) and documents left empty."""
    seen: set[str] = set()
    kept: list[tuple[str, ...]] = []
    for doc in documents:
        fresh = tuple(dict.fromkeys(s for s in doc if s not in seen))
        seen.update(fresh)
        if fresh:
            kept.append(fresh)
    return kept


@functools.lru_cache(maxsize=1)
def _corpus() -> _Corpus:
    """Build (once per process) the cleaned, deduplicated corpus and its splits."""
    raw = _sklearn_documents() + _stdlib_documents()
    documents = tuple(_dedupe([_clean_document(doc) for doc in raw]))
    splits = {
        name: tuple(s for doc in documents for s in doc if _split_of(s) == name) for name in SPLITS
    }
    logger.debug("English corpus: %s", {k: len(v) for k, v in splits.items()})
    return _Corpus(documents=documents, splits=splits)


def _check_split(split: str) -> None:
    """Raise ``UsageError`` for an unknown split name."""
    if split not in SPLITS:
        raise UsageError(f"unknown text split {split!r}; expected one of {', '.join(SPLITS)}")


def _mixed_order(sentences: tuple[str, ...]) -> list[str]:
    """Order sentences by a stable hash so that any prefix mixes all sources."""
    return sorted(
        sentences, key=lambda s: hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest()
    )


def english_sentences(n: int, split: str = "calib") -> list[str]:
    """Return ``n`` distinct English sentences from the ``calib`` or ``eval`` split.

    The order is fixed (a stable hash order that mixes all sources), so
    ``english_sentences(k)`` is a prefix of ``english_sentences(k + 1)``.

    Raises:
        UsageError: for an unknown split or a negative ``n``.
        CalibrationError: when ``n`` exceeds the sentences available in the split.
    """
    _check_split(split)
    if n < 0:
        raise UsageError(f"english_sentences: n must be >= 0, got {n}")
    available = _corpus().splits[split]
    if n > len(available):
        raise CalibrationError(
            f"english_sentences: asked for {n} {split!r} sentences, only {len(available)} available"
        )
    return _mixed_order(available)[:n]


def english_text(split: str = "calib") -> str:
    """Return the ``split``'s sentences as running text, in source order.

    Sentences of one document are joined by spaces and documents by blank lines.
    """
    _check_split(split)
    docs = (" ".join(s for s in doc if _split_of(s) == split) for doc in _corpus().documents)
    return "\n\n".join(d for d in docs if d)
