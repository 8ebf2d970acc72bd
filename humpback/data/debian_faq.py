"""The Debian FAQ (package debian-faq): DocBook HTML chapters, one question per `<h2>`/`<h3>` title.

The package also ships a plain-text rendering, but its hard-wrapped lines and inline URL copies make
worse answers than the HTML.
"""

from __future__ import annotations

from humpback.data.htmltext import parse_html
from humpback.data.text import qa_pairs


def debian_faq_pairs(html: str) -> list[tuple[str, str]]:
    """(question, answer) for each question-titled section of one chapter page (`*.en.html`)."""
    return qa_pairs(parse_html(html))
