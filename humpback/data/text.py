"""Shared text helpers: clean titles, render code, group parsed sections into documents and Q/A pairs.

Every parser (POD, reST, HTML) produces a flat list of `Section`s; what counts as a question and what
counts as a document is decided here once, so the sources agree.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable

from humpback.data.records import Section

# "1.2. ", "Chapter 3. ", "Appendix A. ", "6.2.1 " numbering that DocBook puts before titles.
_NUMBERING = re.compile(r"^(?:(?:chapter|appendix|part|section)\s+)?(?:[0-9A-Z]+\.)*[0-9]+\.?\s+", re.IGNORECASE)
_SPACE = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")


def clean_title(title: str) -> str:
    """One-line title without numbering; all-caps titles (POD's DESCRIPTION) become sentence case,
    since the corpus filter drops all-caps headers as boilerplate."""
    title = _SPACE.sub(" ", title.replace("\n", " ")).strip()
    title = _NUMBERING.sub("", title).strip()
    if title.isupper():
        title = title.capitalize()
    return title


def code_block(text: str) -> str:
    """A verbatim block as indented code: markdown-readable, and a `# comment` line can't pass for a header."""
    lines = textwrap.dedent(text.expandtabs(8)).strip("\n").splitlines()
    return "\n".join("    " + ln if ln.strip() else "" for ln in lines)


def clean_inline(text: str) -> str:
    """Collapse runs of spaces inside a prose paragraph (line breaks become spaces)."""
    return _SPACE.sub(" ", text.replace("\n", " ")).strip()


def join_blocks(blocks: Iterable[str]) -> str:
    """Paragraphs separated by one blank line."""
    text = "\n\n".join(b.strip("\n") for b in blocks if b.strip())
    return _BLANKS.sub("\n\n", text).strip("\n")


def _unit_level(sections: list[Section]) -> int:
    # A document title that occurs once is not a unit; its children are (one record per chapter section).
    levels = [s.level for s in sections]
    top = min(levels)
    deeper = [lv for lv in levels if lv > top]
    return min(deeper) if levels.count(top) == 1 and deeper else top


def to_documents(sections: list[Section], skip: Callable[[str], bool] = lambda _: False,
                 ) -> list[tuple[str, str]]:
    """(title, text) per top section with its subsections, headers as markdown (`#` for the section).

    The client's segmenter splits at markdown headers, so header subtrees stay intact. Sections whose
    title `skip` accepts (NAME, SEE ALSO, AUTHOR...) are dropped with their subsections.
    """
    if not sections:
        return []
    unit = _unit_level(sections)
    docs: list[tuple[str, list[str]]] = []
    base = unit
    skipping = False
    for s in sections:
        if s.level <= unit:
            skipping = skip(s.title)
            if skipping:
                continue
            base = s.level
            docs.append((s.title, [f"# {s.title}", s.body]))
        elif docs and not skipping:
            depth = min(6, s.level - base + 1)
            docs[-1][1].extend([f"{'#' * depth} {s.title}", s.body])
    return [(title, join_blocks(parts)) for title, parts in docs]


def is_question(title: str) -> bool:
    return "?" in title  # "what is Linux?!", "... `unstable'? I thought ...!"


def qa_pairs(sections: list[Section], question: Callable[[str], bool] = is_question) -> list[tuple[str, str]]:
    """(question, answer) per question section: its body plus deeper sections that are not questions
    themselves (a sub-question is its own pair)."""
    pairs: list[tuple[str, list[str]]] = []
    open_level: int | None = None
    for s in sections:
        if open_level is not None and s.level > open_level and not question(s.title):
            pairs[-1][1].extend([f"### {s.title}", s.body])
            continue
        open_level = None
        if question(s.title):
            pairs.append((s.title, [s.body]))
            open_level = s.level
    return [(q, join_blocks(parts)) for q, parts in pairs]
