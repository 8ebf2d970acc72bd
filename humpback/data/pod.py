"""Perl's POD: sections of plain text from `=head`/`=item` paragraphs, formatting codes resolved.

perlfaq1-9 ask one question per `=head2`; the answer runs to the next `=head1`/`=head2`. Verbatim
paragraphs (indented) are kept as code. `C<...>` becomes `` `...` ``, `L<...>` its shown text,
`E<...>` its character, `X<...>` and `Z<...>` nothing; every other code keeps its text.
"""

from __future__ import annotations

import html.entities
import re

from humpback.contracts import PodError
from humpback.data.records import Section
from humpback.data.text import clean_inline, clean_title, code_block, join_blocks

_PARAGRAPHS = re.compile(r"\n[ \t]*\n")
_CODE_START = re.compile(r"([A-Z])(<+)")
_SKIP_BLOCKS = {"begin", "for", "encoding", "pod", "cut", "over", "back"}
# E<...> names POD defines beyond HTML's.
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _entity(name: str) -> str:
    if name in _POD_ENTITIES:
        return _POD_ENTITIES[name]
    if name.isdigit():
        return chr(int(name))
    if name.lower().startswith("0x"):
        return chr(int(name, 16))
    return html.entities.html5.get(name + ";", html.entities.html5.get(name, ""))


def _link(text: str) -> str:
    # L<text|target> shows text; L<page/"section">, L<page/section>, L</section> show the section/page.
    if "|" in text:
        return text.split("|", 1)[0]
    if "://" in text:
        return text
    page, _, section = text.partition("/")
    section = section.strip('"')
    if section and page:
        return f'"{section}" in {page}'
    return section or page.strip('"')


def _render(code: str, inner: str) -> str:
    if code == "C":
        return f"`{inner.strip()}`"
    if code == "L":
        return _link(inner)
    if code == "E":
        return _entity(inner.strip())
    if code in "XZ":
        return ""
    return inner  # B, I, F, S and unknown codes: the text itself


def strip_codes(text: str) -> str:
    """Resolve POD formatting codes, nested and with `<< ... >>` delimiters."""
    out: list[str] = []
    # Stack of (code letter, bracket count, collected text parts).
    stack: list[tuple[str, int, list[str]]] = []
    i = 0
    while i < len(text):
        m = _CODE_START.match(text, i)
        if m:
            # `C<< x >>` needs whitespace inside; `C<<<FOO>` is C< around the text "<<FOO".
            n = len(m.group(2)) if text[m.end():m.end() + 1].isspace() else 1
            stack.append((m.group(1), n, []))
            i = m.start(2) + n
            continue
        if stack and text[i] == ">":
            code, n, parts = stack[-1]
            closes = n == 1 or (text.startswith(">" * n, i) and text[i - 1].isspace())
            if closes:
                stack.pop()
                inner = "".join(parts)
                rendered = _render(code, inner.strip() if n > 1 else inner)
                (stack[-1][2] if stack else out).append(rendered)
                i += n
                continue
        (stack[-1][2] if stack else out).append(text[i])
        i += 1
    if stack:
        raise PodError(f"unclosed {stack[-1][0]}<...> formatting code")
    return "".join(out)


def parse_pod(text: str) -> list[Section]:
    """Sections (`=headN` is level N) of a POD document; text before the first heading is dropped."""
    sections: list[Section] = []
    blocks: list[str] = []
    skipping_until: str | None = None  # inside =begin X ... =end X
    bullet = ""

    def flush() -> None:
        if sections:
            sections[-1].body = join_blocks(blocks)
        blocks.clear()

    for para in _PARAGRAPHS.split(text.replace("\r\n", "\n")):
        para = para.lstrip("\n")  # three blank lines leave one at the start of the next paragraph
        if not para.strip():
            continue
        if skipping_until is not None:
            if para.startswith(f"=end {skipping_until}"):
                skipping_until = None
            continue
        if para.startswith("="):
            command, _, arg = para[1:].partition(" ") if " " in para.split("\n")[0] else para[1:].partition("\t")
            command, _, rest = command.partition("\n")  # "=item\nText" puts the argument on the next line
            arg = f"{rest} {arg}".strip() if rest else arg
            if command.startswith("head") and command[4:].isdigit():
                flush()
                sections.append(Section(int(command[4:]), clean_title(strip_codes(arg)), ""))
            elif command == "item":
                item = clean_inline(strip_codes(arg))
                if item and item not in {"*", "-"} and not item.rstrip(".").isdigit():
                    blocks.append(f"- {item}")
                else:
                    bullet = "- "  # `=item *`: the item's text is the next paragraph
            elif command == "begin":
                skipping_until = arg.split()[0] if arg.split() else ""
            elif command not in _SKIP_BLOCKS and command != "end":
                raise PodError(f"unknown command ={command}")
            continue
        if para[0] in " \t":
            blocks.append(code_block(para))
        else:
            blocks.append(bullet + clean_inline(strip_codes(para)))
        bullet = ""
    flush()
    return sections


_CONTRIBUTED = re.compile(r"^\((?:contributed|written|adapted|from)\b[^)]*\)\s*", re.IGNORECASE)


def perlfaq_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) for every `=head2` question of a perlfaq page, without "(contributed by ...)"."""
    sections = parse_pod(text)
    pairs: list[tuple[str, str]] = []
    current: tuple[str, list[str]] | None = None
    for s in sections:
        if s.level <= 2:
            if current:
                pairs.append((current[0], join_blocks(current[1])))
            current = (s.title, [_CONTRIBUTED.sub("", s.body)]) if s.level == 2 and s.title.endswith("?") else None
        elif current:
            current[1].extend([f"### {s.title}", s.body])
    if current:
        pairs.append((current[0], join_blocks(current[1])))
    return pairs
