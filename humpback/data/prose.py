"""The unlabelled corpus: one document per top-level section of each documentation page.

A document keeps its section header and subsections as markdown headers, so the client's segmenter
(`client.prepare`) can cut 600-3,000-character self-contained segments at header boundaries.
"""

from __future__ import annotations

from humpback.data.htmltext import parse_html
from humpback.data.pod import parse_pod
from humpback.data.records import Section
from humpback.data.rst import parse_rst
from humpback.data.text import to_documents

# Man-page and colophon sections that are not prose.
_SKIP_TITLES = {"name", "synopsis", "see also", "author", "authors", "copyright", "license", "git",
                "reporting bugs", "bugs", "documentation", "availability", "author and copyright",
                "copyright and license", "licence", "footnotes", "table of contents", "contents",
                "indices and tables"}


def parse(text: str, fmt: str) -> list[Section]:
    """Sections of one file in `fmt` ("pod", "rst" or "html")."""
    if fmt == "pod":
        return parse_pod(text)
    if fmt == "rst":
        return parse_rst(text)
    if fmt == "html":
        return parse_html(text)
    raise ValueError(f"unknown format {fmt!r}")


def _skip(title: str) -> bool:
    return title.strip().lower().rstrip(":") in _SKIP_TITLES


def documents(text: str, fmt: str) -> list[tuple[str, str]]:
    """(title, markdown text) for each top-level section of a page, man-page boilerplate dropped."""
    return to_documents(parse(text, fmt), _skip)
