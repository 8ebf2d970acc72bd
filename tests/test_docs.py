"""Docs stay true: the settings table of docs/contracts.md and the list of settings models behind it
(`humpback settings`) are current, every command line the docs quote parses with the real CLI, and every
repository path they name exists."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import shlex
from pathlib import Path

from pydantic import BaseModel

from humpback.cli import (
    SETTINGS, TABLE_END, TABLE_START, build_parser, run_defaults, settings_markdown, settings_models,
)

REPO = Path(__file__).resolve().parent.parent


def _declares_settings(cls: type[BaseModel]) -> bool:
    """Whether the class itself (not a parent) declares a field with `humpback.settings.setting`."""
    own = inspect.get_annotations(cls)
    return any(name in own and isinstance(f.json_schema_extra, dict) and "cli" in f.json_schema_extra
               for name, f in cls.model_fields.items())


def test_every_settings_model_is_listed() -> None:
    found = set()
    for package in ("services", "client", "trainer", "humpback"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__
                        and _declares_settings(obj)):
                    found.add(f"{module.__name__}:{name}")
    assert found == set(SETTINGS)


def test_the_settings_table_in_the_docs_is_current() -> None:
    text = (REPO / "docs" / "contracts.md").read_text(encoding="utf-8")
    block = text[text.index("\n", text.index(TABLE_START)) + 1:text.index(TABLE_END)]
    assert block == settings_markdown(), "run `humpback settings --write docs/contracts.md`"


def test_the_settings_table_shows_the_defaults_a_run_uses() -> None:
    """A class default that `humpback run` replaces (the demo's) is shown with the value a run gets."""
    defaults = run_defaults()
    assert defaults["client.augment.AugmentConfig.max_tokens"] == 96
    assert defaults["humpback.loop.config.CurateSection.top_fraction"] == 0.25
    assert "humpback.loop.config.CurateSection.min_score" not in defaults  # the same in both
    row = next(line for line in settings_markdown().splitlines()
               if line.startswith("| `humpback.loop.config.CurateSection.top_fraction`"))
    assert "None (`humpback run`: `0.25`)" in row


# --- what README.md and docs/*.md tell a reader to type, and the files they name ----------------------

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# A command line: `humpback ...`, `.venv/bin/humpback ...`, `python -m humpback ...`, up to a shell comment.
COMMAND = re.compile(r"^(?:\$ )?(?:\S*python3? -m |\S*/)?humpback ([^#]*)")
# A path of the repository as the docs write it (top-level folders and files; globs allowed).
REPO_PATH = re.compile(r"^(?:(?:services|client|trainer|humpback|tests|bench|docs|examples|\.ci)/[\w.*/-]*"
                       r"|compose\.yaml|compose\.env\.example|Makefile|pyproject\.toml|LICENSE|README\.md)$")


def _code(text: str) -> list[str]:
    """Every line of a fenced block and every inline code span of a Markdown text."""
    blocks = FENCE.findall(text)
    lines = [line.strip() for block in blocks for line in block.splitlines()[1:-1]]
    for block in blocks:
        text = text.replace(block, "")
    return lines + [span.strip() for span in CODE_SPAN.findall(text)]


def _commands(line: str) -> list[list[str]]:
    """The `humpback` command lines a code line shows, as words: a synopsis's `[--opt X]` brackets
    dropped, and each `a|b` alternative of a subcommand a command of its own."""
    found = COMMAND.match(line)
    if not found:
        return []
    shown = found.group(1).replace("[", " ").replace("]", " ").replace("...", " ")
    try:
        words = shlex.split(shown)
    except ValueError:  # an unbalanced quote in a synopsis: its words as written
        words = shown.split()
    commands = [[]]
    for word in words:
        options = word.split("|") if "|" in word and not word.startswith("-") and "=" not in word else [word]
        commands = [c + [o] for c in commands for o in options]
    return commands


def _unknown(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """Why `humpback WORDS` would not parse (an unknown subcommand or flag), or None. Only what the
    words name is checked: placeholders stand for the values, and a synopsis may leave required ones out."""
    flags = {o for a in parser._actions for o in a.option_strings}
    current, chain = parser, []
    for word in words:
        if word.startswith("-"):
            break
        subparsers = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            break
        if word not in subparsers[0].choices:
            return f"unknown subcommand {' '.join([*chain, word])!r}"
        chain.append(word)
        current = subparsers[0].choices[word]
    flags |= {o for a in current._actions for o in a.option_strings}
    for word in words:
        if word.startswith("-") and word.split("=")[0] not in flags:
            return f"`humpback {' '.join(chain)}` has no flag {word.split('=')[0]}"
    return None


def test_every_command_line_in_the_docs_parses() -> None:
    """Every `humpback ...` the README and the docs quote names subcommands and flags the real CLI has."""
    parser = build_parser()
    problems, checked = [], 0
    for doc in DOCS:
        for line in _code(doc.read_text(encoding="utf-8")):
            for words in _commands(line):
                checked += 1
                why = _unknown(parser, words)
                if why:
                    problems.append(f"{doc.relative_to(REPO)}: `{line}`: {why}")
    assert checked > 40 and not problems, "\n".join(problems)


def test_every_path_the_docs_name_exists() -> None:
    """Every repository path in a code span or a link of the README and the docs exists."""
    problems = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (doc.parent / target).exists():
                problems.append(f"{doc.relative_to(REPO)}: link {target}")
        for span in _code(text):
            for word in span.split():
                path = word.strip("`,;:()'\"").rstrip(".")
                if REPO_PATH.match(path) and not any(REPO.glob(path.rstrip("/"))):
                    problems.append(f"{doc.relative_to(REPO)}: {path}")
    assert not problems, "\n".join(problems)


def test_every_make_target_the_docs_name_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))
    named = {(doc.relative_to(REPO), target) for doc in DOCS for line in _code(doc.read_text(encoding="utf-8"))
             for target in re.findall(r"(?:^|[;&(]\s*)make ([\w-]+)", line)}
    assert named and not [f"{doc}: make {t}" for doc, t in sorted(named) if t not in targets]


def test_every_test_the_docs_cite_exists() -> None:
    """The docs cite tests as evidence (docs/reliability.md's table): each is a test function or file."""
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("*.py"))
    files = {p.stem for p in (REPO / "tests").rglob("test_*.py")}
    cited = {name for doc in DOCS for name in re.findall(r"\btest_\w+", doc.read_text(encoding="utf-8"))}
    assert cited and not sorted(n for n in cited if n not in files and f"def {n}(" not in sources)


def _make_recipe(target: str) -> str:
    """The first line of a Makefile target's recipe, its $(VARIABLES) expanded from the Makefile's `:=` lines."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    variables = dict(re.findall(r"^(\w+) :?= (.*)$", text, re.M))
    line = re.search(rf"^{re.escape(target)}:.*\n\t(.*)$", text, re.M).group(1)
    while (ref := re.search(r"\$\((\w+)\)", line)) and ref.group(1) in variables:
        line = line.replace(ref.group(0), variables[ref.group(1)])
    return line


def test_make_demo_leaves_the_ablation_arms_to_make_demo_ablations() -> None:
    """`make demo` runs the loop with both ablation arms off, through the loop's own settings;
    `make demo-ablations` runs the same run folder with the defaults, which add them."""
    from humpback.loop.cli import RunArgs
    from humpback.loop.config import load_config
    from humpback.settings import from_args

    parser = build_parser()
    runs = {}
    for target in ("demo", "demo-ablations"):
        words = shlex.split(_make_recipe(target))
        opts = from_args(RunArgs, parser.parse_args(words[words.index("run"):]))
        runs[target] = (opts.out, load_config(opts.config, quick=opts.quick, overrides=opts.overrides))
    (demo_out, demo), (ablations_out, ablations) = runs["demo"], runs["demo-ablations"]
    assert demo_out == ablations_out
    assert (demo.rewrite.enabled, demo.eval.ablation) == (False, False)
    assert (ablations.rewrite.enabled, ablations.eval.ablation) == (True, True)
