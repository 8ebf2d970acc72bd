"""reStructuredText as Sphinx ships it in `_sources/*.rst.txt`: sections of plain text.

Titles are found by their underline (and optional overline); levels follow the order adornment
styles first appear, as in docutils. Roles and references keep their text (code-like roles become
`` `...` ``), literal blocks (`::`, code-block, doctest) become indented code, admonitions and API
directives keep their content, and everything else Sphinx-specific (toctree, index, only, tables)
is dropped.
"""

from __future__ import annotations

import re
import textwrap

from humpback.data.records import Section
from humpback.data.text import clean_inline, clean_title, code_block, join_blocks

_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_FIELD = re.compile(r"^:[\w-]+:(\s|$)")
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::\s*(.*)$")
_LIST_ITEM = re.compile(r"^(?:[*+\-•]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
_TABLE_BORDER = re.compile(r"^\s*(?:\+[-=+]+\+|=+(?:\s+=+)+)\s*$")

_CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode", "literalinclude"}
_ADMONITIONS = {"note": "Note: ", "warning": "Warning: ", "tip": "Tip: ", "important": "Important: ",
                "caution": "Caution: ", "hint": "Hint: ", "attention": "Attention: ", "danger": "Danger: ",
                "seealso": "See also: ", "impl-detail": "CPython implementation detail: ", "admonition": "",
                "topic": "", "sidebar": "", "rubric": "", "centered": "", "epigraph": "", "container": ""}
_VERSIONED = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
              "deprecated": "Deprecated since version {}:", "deprecated-removed": "Deprecated since version {}:"}
_API = {"function", "class", "method", "classmethod", "staticmethod", "attribute", "data", "exception",
        "decorator", "decoratormethod", "describe", "opcode", "cmdoption", "option", "envvar",
        "coroutinefunction", "coroutinemethod", "abstractmethod", "property", "c:function", "c:macro",
        "c:type", "c:member", "c:var", "pdbcommand", "2to3fixer", "audit-event"}

# Roles whose target reads as code; every other role keeps its text plain.
_CODE_ROLES = {"func", "class", "meth", "mod", "data", "attr", "exc", "const", "envvar", "file",
               "program", "option", "keyword", "samp", "obj", "c:func", "c:type", "c:macro", "c:data",
               "c:member", "py:func", "py:class", "py:meth", "py:mod", "py:data", "py:attr", "py:exc",
               "makevar", "opcode", "token", "code", "kbd", "mimetype", "regexp", "command", "setting",
               "ttag", "tfilter", "lookup", "fieldlookup", "djadmin", "templatetag", "templatefilter"}
_ROLE = re.compile(r":((?:[\w-]+:)*[\w-]+):`((?:[^`\\]|\\.)+)`")
_LITERAL = re.compile(r"``(.+?)``")
_REFERENCE = re.compile(r"`([^`<]*?)\s*<[^`>]+>`__?")
_NAMED_REF = re.compile(r"`([^`]+)`__?")
_INTERPRETED = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_SUBSTITUTION = re.compile(r"\|(\w[\w -]*)\|(?:__?)?")
_FOOTNOTE_REF = re.compile(r"\s*\[(?:#\w*|\*|\d+)\]_")
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")


def _role_text(role: str, target: str) -> str:
    target = target.replace("\\", "")
    if (m := re.fullmatch(r"(.*?)\s*<([^<>]+)>", target, re.DOTALL)) and m.group(1):
        return m.group(1)  # an explicit title reads as prose, whatever the role
    if m:
        target = m.group(2)
    elif target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    target = target.lstrip("!")
    name = role.rsplit(":", 1)[-1]
    if name == "pep":
        return f"PEP {target}"
    if name == "rfc":
        return f"RFC {target}"
    return f"`{target}`" if role in _CODE_ROLES or name in _CODE_ROLES else target


def strip_inline(text: str) -> str:
    """Inline reST markup resolved to its text; code-like spans as `` `...` `` (kept out of later rules)."""
    kept: list[str] = []

    def keep(s: str) -> str:
        kept.append(s)
        return f"\x00{len(kept) - 1}\x00"

    text = _LITERAL.sub(lambda m: keep(f"`{m.group(1)}`"), text)
    text = _ROLE.sub(lambda m: keep(_role_text(m.group(1), m.group(2))), text)
    text = _REFERENCE.sub(lambda m: m.group(1), text)
    text = _NAMED_REF.sub(lambda m: m.group(1), text)
    text = _INTERPRETED.sub(lambda m: m.group(1), text)
    text = _STRONG.sub(lambda m: m.group(1), text)
    text = _EMPHASIS.sub(lambda m: m.group(1), text)
    text = _SUBSTITUTION.sub(lambda m: m.group(1), text)
    text = _FOOTNOTE_REF.sub("", text)
    text = text.replace("\\ ", "").replace("\\*", "*").replace("\\`", "`").replace("\\\\", "\\")
    return _PLACEHOLDER.sub(lambda m: kept[int(m.group(1))], text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _indented_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """Lines from `start` that are blank or indented deeper than `base` (a directive's or `::`'s body)."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    return lines[start:end], end


def _without_options(body: list[str]) -> list[str]:
    # A directive's `:option: value` lines come first in its body; content starts after them.
    dedented = textwrap.dedent("\n".join(body)).splitlines()
    i = 0
    while i < len(dedented) and (_FIELD.match(dedented[i]) or (i == 0 and not dedented[i].strip())):
        i += 1
    return dedented[i:]


def _directive(name: str, arg: str, body: list[str]) -> list[str]:
    content = _without_options(body)
    if name in _CODE_DIRECTIVES:
        code = "\n".join(content).strip("\n")
        return [code_block(code)] if code else []
    if name in _ADMONITIONS or name in _VERSIONED:
        blocks = _blocks(content)
        if name in _VERSIONED:
            lead = _VERSIONED[name].format(arg.split()[0] if arg.split() else "")
            if not blocks:
                return [lead.rstrip(":") + ("" if lead.endswith(".") else ".")]
        else:
            lead = _ADMONITIONS[name] + clean_inline(strip_inline(arg))
        if blocks and not blocks[0].startswith("    "):
            blocks[0] = f"{lead.strip()} {blocks[0]}".strip()
        elif lead.strip():
            blocks.insert(0, lead.strip())
        return blocks
    if name in _API or name.startswith("py:"):
        sig = clean_inline(arg.replace("\\", ""))
        return ([f"`{sig}`"] if sig else []) + _blocks(content)
    return []  # toctree, index, only, contents, tables, images, comments, targets: not prose


def _paragraph(lines: list[str]) -> str:
    first = lines[0].lstrip()
    if first.startswith(">>>"):
        return code_block("\n".join(lines))
    if _TABLE_BORDER.match(lines[0]):
        return ""
    if _LIST_ITEM.match(first):
        items: list[list[str]] = []
        for ln in lines:
            if m := _LIST_ITEM.match(ln.lstrip()):
                items.append([ln.lstrip()[m.end():]])
            else:
                items[-1].append(ln)
        return "\n".join("- " + clean_inline(strip_inline(" ".join(it))) for it in items)
    return clean_inline(strip_inline(" ".join(ln.strip() for ln in lines)))


def _blocks(lines: list[str]) -> list[str]:
    """Body text of `lines` (no titles): one string per paragraph, list or code block."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or _FIELD.match(line):
            i += 1
            continue
        base = _indent(line)
        if m := _DIRECTIVE.match(line.strip()):
            body, i = _indented_block(lines, i + 1, base)
            out.extend(_directive(m.group(1), m.group(2), body))
            continue
        if line.strip().startswith(".."):  # comment, hyperlink target or substitution definition
            _, i = _indented_block(lines, i + 1, base)
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not _DIRECTIVE.match(lines[i].strip()):
            para.append(lines[i])
            i += 1
        last = para[-1].rstrip()
        if last.endswith("::"):
            base = _indent(para[-1])  # a list item's literal block is indented relative to its last line
            para[-1] = last[:-2].rstrip() + (":" if last[:-2].strip() and not last.endswith(" ::") else "")
            if not para[-1].strip():
                para.pop()
            code, i = _indented_block(lines, i, base)
            if para:
                out.append(_paragraph(para))
            if "\n".join(code).strip():
                out.append(code_block("\n".join(code)))
            continue
        out.append(_paragraph(para))
    return [b for b in out if b.strip()]


def parse_rst(text: str) -> list[Section]:
    """Sections of a reST document; body text before the first title is dropped."""
    lines = text.replace("\r\n", "\n").expandtabs(8).split("\n")
    styles: list[tuple[str, bool]] = []
    sections: list[Section] = []
    body: list[str] = []

    def flush() -> None:
        if sections:
            sections[-1].body = join_blocks(_blocks(body))
        body.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        title: str | None = None
        style: tuple[str, bool] | None = None
        if (_ADORNMENT.match(line) and nxt.strip() and i + 2 < len(lines)
                and lines[i + 2].strip() == line.strip()):
            title, style, step = nxt, (line.strip()[0], True), 3
        elif (line.strip() and not line[0].isspace() and _ADORNMENT.match(nxt)
              and len(nxt.strip()) >= len(line.strip()) - 1 and (i == 0 or not lines[i - 1].strip())):
            title, style, step = line, (nxt.strip()[0], False), 2
        if title is None or style is None:
            body.append(line)
            i += 1
            continue
        flush()
        if style not in styles:
            styles.append(style)
        sections.append(Section(styles.index(style) + 1, clean_title(strip_inline(title)), ""))
        i += step
    flush()
    return sections
