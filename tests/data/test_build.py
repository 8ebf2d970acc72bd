"""The demo build: on a small fake Debian tree (bad input included), and on the installed packages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from humpback.cli import main
from humpback.contracts import CorpusDoc, SeedPair, normalize
from humpback.data.build import BuildConfig, BuildResult, build_demo
from humpback.data.catalog import CORPUS_SOURCES, SEED_SOURCES

from .test_parsers import DEBIAN_FAQ_HTML, PERLFAQ, PY_FAQ

ANSWER = " ".join(["Perl keeps floating-point numbers in binary, so some decimals cannot be exact."] * 3)


def _read(path: Path, model: type[SeedPair] | type[CorpusDoc]) -> list:
    return [model.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _fake_root(root: Path) -> None:
    pod = root / "usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    # perlfaq4 and perlfaq5 carry the same question and answer: dedup keeps one.
    faq = PERLFAQ.replace("Use B<sprintf>", ANSWER + "\n\nUse B<sprintf>")
    (pod / "perlfaq4.pod").write_text(faq)
    (pod / "perlfaq5.pod").write_text(faq)
    (pod / "perlfaq6.pod").write_text("=head1 Broken\n\n=head2 Why?\n\nC<never closed\n")
    (pod / "perlsyn.pod").write_text("=head1 NAME\n\nperlsyn - Perl syntax\n\n=head1 DESCRIPTION\n\n" + ANSWER + "\n\n=head2 Declarations\n\n" + ANSWER + "\n")
    rst = root / "usr/share/doc/python3.11/html/_sources/faq"
    rst.mkdir(parents=True)
    (rst / "programming.rst.txt").write_text(PY_FAQ.replace("Yes.", "Yes. " + ANSWER))
    html = root / "usr/share/doc/debian/FAQ"
    html.mkdir(parents=True)
    (html / "basic-defs.en.html").write_text(DEBIAN_FAQ_HTML.replace("numerous packages", ANSWER))
    (html / "basic-defs.html").symlink_to("basic-defs.en.html")
    (html / "broken.en.html").write_bytes(b"<html>\xff\xfe not utf-8</html>")
    doc = root / "usr/share/doc/perl-doc"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   "Files: *\nCopyright: Larry Wall\nLicense: GPL-1+ or Artistic\n")


def test_demo_on_fake_tree_dedups_and_reports_bad_files(tmp_path: Path):
    _fake_root(tmp_path / "root")
    result = build_demo(BuildConfig(out=tmp_path / "out", root=tmp_path / "root", heldout_fraction=0.0))
    counts = result.counts
    assert counts["seed/perlfaq"].dropped["duplicate"] == 1 and counts["seed/perlfaq"].kept == 1
    assert counts["seed/perlfaq"].failed_files == 1
    assert counts["seed/debian-faq"].files == 2  # the .html symlink is the same file as .en.html
    assert counts["seed/python-faq"].kept == 2
    failures = {(f.source, Path(f.file).name): f.reason for f in result.failures}
    assert failures[("perlfaq", "perlfaq6.pod")] == "PodError: unclosed C<...> formatting code"
    assert failures[("debian-faq", "broken.en.html")].startswith("UnicodeDecodeError")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["failures"]) == 2 and manifest["outputs"]["seed.jsonl"]["records"] == 4
    docs = _read(tmp_path / "out" / "corpus.jsonl", CorpusDoc)
    assert [(d.source, d.title) for d in docs] == [("perl-doc", "Description")]
    assert docs[0].text.startswith("# Description\n\n") and "\n## Declarations\n\n" in docs[0].text
    licenses = (tmp_path / "out" / "LICENSES.md").read_text()
    assert "| perl-doc | perl-doc | Artistic-1.0-Perl OR GPL-1.0-or-later |" in licenses
    assert "GPL-1+ or Artistic" in licenses


def test_demo_is_deterministic_and_caps_sizes(tmp_path: Path):
    _fake_root(tmp_path / "root")
    for out in ("a", "b"):
        assert main(["data", "demo", "--root", str(tmp_path / "root"), "--out", str(tmp_path / out),
                     "--max-seed", "2", "--max-corpus-docs", "1"]) == 0
    for name in ("seed.jsonl", "heldout.jsonl", "corpus.jsonl", "LICENSES.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(_read(tmp_path / "a" / "seed.jsonl", SeedPair)) == 2
    assert main(["data", "demo", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "all"),
                 "--heldout-fraction", "0.5"]) == 0
    assert main(["data", "demo", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "capped"),
                 "--heldout-fraction", "0.5", "--max-seed", "1"]) == 0
    held = (tmp_path / "all" / "heldout.jsonl").read_bytes()
    assert held and (tmp_path / "capped" / "heldout.jsonl").read_bytes() == held  # max_seed leaves it alone
    assert len(_read(tmp_path / "capped" / "seed.jsonl", SeedPair)) == 1
    # The pairs past the cap are kept aside, never held-out ones: together they are the uncapped seed.
    rest = _read(tmp_path / "capped" / "seed_rest.jsonl", SeedPair)
    everything = _read(tmp_path / "all" / "seed.jsonl", SeedPair)
    assert sorted(p.id for p in [*_read(tmp_path / "capped" / "seed.jsonl", SeedPair), *rest]) == sorted(
        p.id for p in everything) and len(rest) == len(everything) - 1
    assert (tmp_path / "all" / "seed_rest.jsonl").read_text() == ""


# --- the real thing: the Debian documentation packages the setup installs ---------------------------

_PACKAGES = sorted({s.package for s in (*SEED_SOURCES, *CORPUS_SOURCES)})
_MISSING = [s.name for s in (*SEED_SOURCES, *CORPUS_SOURCES) if not s.files(Path("/"))]
# Markup each format must not leave in prose. Pages about POD itself (perlpod*, perldocstyle) quote it.
_MARKUP = {"pod": ("C<", "L<", "B<", "I<", "E<", "=head", "=item", "=over"),
           "rst": (":ref:`", ":func:`", ":class:`", ":mod:`", ":meth:`", ".. code-block::", ".. note::", "``"),
           "html": ("<p>", "</p>", "<div", "<a href", "&amp;", "&lt;", "¶")}
_FORMAT = {s.name: s.format for s in (*SEED_SOURCES, *CORPUS_SOURCES)}
_ABOUT_POD = re.compile(r"/perl(pod|docstyle)[a-z]*\.pod$")
_CODE_SPAN = re.compile(r"`[^`\n]*`")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    if _MISSING:
        pytest.skip(f"Debian documentation not installed for {_MISSING} (packages: {' '.join(_PACKAGES)}; "
                    "`make setup` installs them)")
    return build_demo(BuildConfig(out=tmp_path_factory.mktemp("demo")))


def _markup_left(text: str, source: str) -> list[str]:
    """Markup of the source's format found outside code blocks and `code` spans (where it is content)."""
    prose = _CODE_SPAN.sub("", "\n".join(ln for ln in text.splitlines() if not ln.startswith("    ")))
    return [m for m in _MARKUP[_FORMAT[source]] if m in prose]


def test_installed_seed(installed: BuildResult):
    seed = _read(installed.out / "seed.jsonl", SeedPair)
    heldout = _read(installed.out / "heldout.jsonl", SeedPair)
    for src in SEED_SOURCES:
        assert installed.counts[f"seed/{src.name}"].seed > 0, src.name
    assert len(seed) > 300 and len(heldout) > 20
    assert not {p.id for p in seed} & {p.id for p in heldout}
    everything = seed + heldout
    assert len({normalize(p.instruction) for p in everything}) == len(everything)
    assert len({normalize(p.response) for p in everything}) == len(everything)
    for p in everything:
        assert p.instruction.strip() and p.license and 100 <= len(p.response) <= 3000
        assert not _markup_left(p.instruction + "\n" + p.response, p.source), (p.source, p.instruction)
    assert installed.failures == []


def test_installed_corpus(installed: BuildResult):
    docs = _read(installed.out / "corpus.jsonl", CorpusDoc)
    for src in CORPUS_SOURCES:
        assert installed.counts[f"corpus/{src.name}"].kept > 0, src.name
    assert len(docs) > 1000
    assert len({normalize(d.text) for d in docs}) == len(docs)
    bad = [(d.path, _markup_left(d.text, d.source)) for d in docs if not _ABOUT_POD.search(d.path)]
    assert not [b for b in bad if b[1]]
    for d in docs:
        assert d.text.startswith("# ") and d.title and d.license and len(d.text) >= 200
    manifest = json.loads((installed.out / "manifest.json").read_text())
    assert manifest["outputs"]["corpus.jsonl"]["records"] == len(docs)
