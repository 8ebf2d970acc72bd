"""HTML (DocBook, Sphinx and AsciiDoc output) to sections of plain text, with the standard library parser.

Navigation, tables of contents, sidebars of site chrome and header links are skipped by class or id;
`<pre>` becomes indented code, `<code>` becomes `` `...` ``, list items become "- " lines.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from humpback.data.records import Section
from humpback.data.text import clean_inline, clean_title, code_block, join_blocks

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
         "track", "wbr"}
_BLOCK = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "blockquote", "section",
          "article", "br", "hr", "figure", "figcaption", "caption", "main", "body"}
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_SKIP_TAGS = {"head", "script", "style", "nav", "noscript", "form", "button", "select", "textarea", "svg"}
# Site chrome in DocBook (navheader, toc, docnav), Sphinx (sphinxsidebar, related, headerlink,
# Django's hd/ft/global-nav) and AsciiDoc (header, footer) output.
_SKIP_CLASSES = {"navheader", "navfooter", "toc", "docnav", "sphinxsidebar", "related", "headerlink",
                 "footer", "navigation", "breadcrumbs", "nav", "list-of-tables", "list-of-figures",
                 "list-of-examples", "toc-backref", "skip-link", "rellinks"}
_SKIP_IDS = {"hd", "ft", "header", "footer", "global-nav", "sidebar", "breadcrumbs", "footnotes", "toc",
             "searchbox", "navbar"}
_CODE_TAGS = {"code", "tt", "kbd", "samp"}


class _SectionParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.blocks: list[str] = []
        self.inline: list[str] = []
        self.stack: list[str] = []
        self.skip_at: int | None = None  # stack depth of the skipped element we are inside
        self.pre_depth = 0
        self.code_depth = 0
        self.heading: tuple[int, list[str]] | None = None
        self.prefix = ""

    def _skipped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in _SKIP_TAGS:
            return True
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        return bool(classes & _SKIP_CLASSES) or (a.get("id") or "") in _SKIP_IDS or a.get("role") == "navigation"

    def _flush_inline(self) -> None:
        text = clean_inline("".join(self.inline))
        self.inline.clear()
        if text and text != "``":
            self.blocks.append(self.prefix + text)
            self.prefix = ""

    def _flush_section(self) -> None:
        self._flush_inline()
        if self.sections:
            self.sections[-1].body = join_blocks([self.sections[-1].body, *self.blocks])
        self.blocks.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_at is not None:
            if tag not in _VOID:
                self.stack.append(tag)
            return
        if self._skipped(tag, attrs):
            if tag not in _VOID:
                self.stack.append(tag)
                self.skip_at = len(self.stack)
            return
        if tag not in _VOID:
            self.stack.append(tag)
        if tag in _HEADINGS:
            self._flush_section()
            self.heading = (_HEADINGS[tag], [])
        elif tag == "pre":
            self._flush_inline()
            self.pre_depth += 1
        elif tag in _CODE_TAGS and not self.pre_depth:
            self.code_depth += 1
            if self.code_depth == 1:
                self._text("`")
        elif tag in _BLOCK:
            self._flush_inline()
            if tag == "li":
                self.prefix = "- "
        elif tag in {"td", "th"}:
            self._text(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_at is None and tag in _BLOCK:
            self._flush_inline()

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.stack:
            return  # a stray end tag
        while self.stack:
            open_tag = self.stack.pop()
            if self.skip_at is not None and len(self.stack) < self.skip_at:
                self.skip_at = None
            elif self.skip_at is None:
                self._close(open_tag)
            if open_tag == tag:
                break

    def _close(self, tag: str) -> None:
        if tag in _HEADINGS and self.heading is not None:
            level, parts = self.heading
            self.heading = None
            self.sections.append(Section(level, clean_title("".join(parts)), ""))
        elif tag == "pre":
            self.pre_depth -= 1
            if not self.pre_depth:
                code = "".join(self.inline)
                self.inline.clear()
                if code.strip():
                    self.blocks.append(code_block(code))
        elif tag in _CODE_TAGS and not self.pre_depth and self.code_depth:
            self.code_depth -= 1
            if not self.code_depth:
                self._text("`")
        elif tag in _BLOCK:
            self._flush_inline()

    def _text(self, data: str) -> None:
        if self.heading is not None:
            self.heading[1].append(data)
        else:
            self.inline.append(data)

    def handle_data(self, data: str) -> None:
        if self.skip_at is None:
            self._text(data)

    def close(self) -> None:
        super().close()
        self._flush_section()


_EMPTY_CODE = re.compile(r"``")


def parse_html(text: str) -> list[Section]:
    """Sections of an HTML page (`<hN>` is level N); text before the first heading is dropped."""
    parser = _SectionParser()
    parser.feed(text)
    parser.close()
    for s in parser.sections:
        s.body = _EMPTY_CODE.sub("", s.body)
    return [s for s in parser.sections if s.title]
