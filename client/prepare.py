"""The paper's corpus preparation (App. E): segment, filter by length, drop boilerplate, repetition, duplicates.

Each rule can be switched off in `PrepareConfig` and counts what it removes, so a run's summary says
how many records each rule dropped. Rules run cheapest first; deduplication runs last so that only
segments that survive every other rule enter its index.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

from client.dedup import Deduplicator
from humpback.contracts import Segment, Source
from humpback.settings import setting

_MD_HEADER = re.compile(r"^(#{1,6})(?:[ \t]+(.*?))?[ \t#]*$")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")

# Header words that mark navigation and boilerplate rather than content (paper App. E, extended).
NAV_WORDS = (
    "advertisement", "forum", "quick link", "newsletter", "related posts", "related articles",
    "share this", "follow us", "subscribe", "sign up", "sign in", "log in", "login", "skip to",
    "main menu", "navigation", "cookie", "privacy policy", "terms of use", "terms of service",
    "all rights reserved", "copyright", "contact us", "leave a reply", "comments",
)


class PrepareConfig(BaseModel):
    """Corpus preparation settings (paper App. E); every rule is on by default, as in the paper."""

    model_config = ConfigDict(extra="forbid")

    segment: bool = setting(True, "split documents into self-contained segments at markdown headers (a segment keeps "
                                  "its lower-level subsections while it fits max_chars; longer text is packed by "
                                  "paragraphs); off keeps documents whole")
    min_chars: int = setting(600, "shortest segment kept, in characters (paper: 600)", ge=0)
    max_chars: int = setting(3000, "longest segment kept, in characters (paper: 3,000)", ge=1)
    boilerplate: bool = setting(True, "drop segments whose header is empty, all-caps or navigation-like",
                                flag="boilerplate-filter")
    repetition: bool = setting(True, "drop segments with two sentences whose word n-gram Jaccard similarity reaches "
                                     "repetition_threshold", flag="repetition-filter")
    repetition_threshold: float = setting(0.8, "Jaccard similarity of two sentences that makes a segment repetitive",
                                          gt=0, le=1)
    repetition_ngram: int = setting(3, "word n-gram size of the repetition rule", ge=1)
    # `--no-dedup` has always meant "no duplicate removal at all": the command line derives dedup_near
    # from it unless `--near-dedup`/`--no-near-dedup` is given (see client/cli.py).
    dedup_exact: bool = setting(True, "drop exact duplicates (after case/whitespace normalisation); on the command "
                                      "line, --no-dedup also turns near-duplicate removal off", flag="dedup")
    dedup_near: bool = setting(True, "drop near duplicates (MinHash LSH at Jaccard near_threshold over word 5-grams)",
                               flag="near-dedup")
    near_threshold: float = setting(0.8, "Jaccard similarity of near duplicates", gt=0, le=1)
    num_perm: int = setting(64, "MinHash permutations", ge=1)


def _pack(text: str, max_chars: int) -> list[str]:
    """Greedy paragraph packing: chunks of whole paragraphs up to `max_chars` (a longer paragraph stays whole)."""
    out: list[str] = []
    cur = ""
    for para in (p.strip() for p in _PARAGRAPH.split(text)):
        if not para:
            continue
        if cur and len(cur) + 2 + len(para) > max_chars:
            out.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def split_segments(text: str, max_chars: int) -> list[str]:
    """Split a document at markdown headers into the largest header subtrees that fit `max_chars`."""
    lines = text.splitlines()
    headers = [(i, len(m.group(1))) for i, ln in enumerate(lines) if (m := _MD_HEADER.match(ln))]
    out: list[str] = []

    def walk(start: int, end: int) -> None:
        block = "\n".join(lines[start:end]).strip()
        if not block:
            return
        if len(block) <= max_chars:
            out.append(block)
            return
        kids = [(i, lvl) for i, lvl in headers if start < i < end]
        if not kids:
            out.extend(_pack(block, max_chars))
            return
        top = min(lvl for _, lvl in kids)
        cuts = [i for i, lvl in kids if lvl == top]
        own = "\n".join(lines[start:cuts[0]]).strip()
        if own:
            out.extend(_pack(own, max_chars))
        for a, b in zip(cuts, cuts[1:] + [end]):
            walk(a, b)

    walk(0, len(lines))
    return out


def header_of(text: str) -> str | None:
    """The segment's header: a markdown header line, or a short unpunctuated first line; None if neither."""
    first, _, rest = text.partition("\n")
    m = _MD_HEADER.match(first)
    if m:
        return (m.group(2) or "").strip()
    first = first.strip()
    if rest.strip() and 0 < len(first) <= 80 and first[-1] not in ".!?:;,\"')":
        return first
    return None


def boilerplate_reason(text: str) -> str | None:
    """Why the segment's header marks boilerplate ("empty header", "all-caps header", "navigation header")."""
    header = header_of(text)
    if header is None:
        return None
    if not header:
        return "empty_header"
    letters = [c for c in header if c.isalpha()]
    if len(letters) >= 3 and sum(c.isupper() for c in letters) / len(letters) >= 0.9:
        return "allcaps_header"
    low = header.lower()
    if any(w in low for w in NAV_WORDS):
        return "navigation_header"
    return None


def is_repetitive(text: str, threshold: float = 0.8, n: int = 3, min_words: int = 6) -> bool:
    """Whether two sentences of the text have word n-gram Jaccard similarity >= threshold.

    Sentences under `min_words` words (markup, labels, short commands) are not compared: repeating
    them is formatting, not the spam this rule is after.
    """
    grams: list[frozenset[tuple[str, ...]]] = []
    for sent in _SENTENCE.split(text):
        words = _WORD.findall(sent.lower())
        if len(words) < max(n, min_words):
            continue
        grams.append(frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1)))
    grams.sort(key=len)
    for i, a in enumerate(grams):
        for b in grams[i + 1:]:
            if len(a) < threshold * len(b):  # sorted by size: Jaccard <= |a|/|b| only shrinks from here
                break
            inter = len(a & b)
            if inter and inter / (len(a) + len(b) - inter) >= threshold:
                return True
    return False


class Preparer:
    """Turns documents into kept segments, counting each rule's removals in `counts`."""

    def __init__(self, config: PrepareConfig | None = None) -> None:
        self.config = config or PrepareConfig()
        c = self.config
        self.counts: Counter[str] = Counter()
        self._dedup = (Deduplicator(exact=c.dedup_exact, near=c.dedup_near, threshold=c.near_threshold,
                                    num_perm=c.num_perm)
                       if c.dedup_exact or c.dedup_near else None)

    def __call__(self, doc: Segment) -> Iterator[Segment]:
        c = self.config
        self.counts["documents"] += 1
        texts = split_segments(doc.text, c.max_chars) if c.segment else [doc.text.strip()]
        for index, text in enumerate(texts):
            self.counts["segments"] += 1
            reason = self._drop_reason(text)
            if reason is not None:
                self.counts[f"dropped_{reason}"] += 1
                continue
            self.counts["kept"] += 1
            yield Segment(text=text, source=Source(path=doc.source.path, line=doc.source.line, segment=index,
                                                   metadata=doc.source.metadata))

    def _drop_reason(self, text: str) -> str | None:
        c = self.config
        if not c.min_chars <= len(text) <= c.max_chars:
            return "too_short" if len(text) < c.min_chars else "too_long"
        if c.boilerplate and (reason := boilerplate_reason(text)):
            return reason
        if c.repetition and is_repetitive(text, c.repetition_threshold, c.repetition_ngram):
            return "repetitive"
        if self._dedup is not None:
            return self._dedup.check(text)
        return None
