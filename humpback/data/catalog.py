"""Where each data source lives on a Debian system, what it is, and under which license it ships.

Paths are globs under a root (`/` on a real system, a fixture tree in tests); versioned directories
(`/usr/share/perl/5.36.0`) are globbed so another Debian release works unchanged. FAQ files feed the
seed set and are kept out of the corpus, so no seed answer is also an unlabelled document.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Format = Literal["pod", "rst", "html"]


@dataclass(frozen=True)
class DocSource:
    """One family of files from one Debian package.

    name: the `source` field of every record it yields.
    package: the Debian package that installs it (its `/usr/share/doc/<package>/copyright` is read).
    format: the parser that reads it.
    include, exclude: globs relative to the root; `**` crosses directories.
    license: SPDX-style summary written beside each record (the copyright file is authoritative).
    """

    name: str
    package: str
    format: Format
    include: tuple[str, ...]
    license: str
    exclude: tuple[str, ...] = field(default=())

    def files(self, root: Path) -> list[Path]:
        """Matching files, sorted so every build reads them in the same order; symlinks to a file
        already matched (the FAQ's `x.html -> x.en.html`) count once."""
        found: dict[Path, Path] = {}
        for pattern in self.include:
            for path in sorted(root.glob(pattern.lstrip("/"))):
                rel = "/" + path.relative_to(root).as_posix()
                if path.is_file() and not any(fnmatch.fnmatch(rel, ex) for ex in self.exclude):
                    found.setdefault(path.resolve(), path)
        return sorted(found.values())

    def copyright_file(self, root: Path) -> Path:
        return root / "usr/share/doc" / self.package / "copyright"


_PERL_LICENSE = "Artistic-1.0-Perl OR GPL-1.0-or-later"
_PYTHON_LICENSE = "PSF-2.0"
_PERL_POD = "/usr/share/perl/*/pod"
_PY_SOURCES = "/usr/share/doc/python3.11/html/_sources"
_DJANGO = "/usr/share/doc/python-django-doc/html"

SEED_SOURCES: tuple[DocSource, ...] = (
    DocSource("perlfaq", "perl-doc", "pod", (f"{_PERL_POD}/perlfaq[1-9].pod", f"{_PERL_POD}/perlunifaq.pod"),
              _PERL_LICENSE + " (perlfaq code examples: public domain)"),
    DocSource("python-faq", "python3.11-doc", "rst", (f"{_PY_SOURCES}/faq/*.rst.txt",), _PYTHON_LICENSE),
    DocSource("debian-faq", "debian-faq", "html", ("/usr/share/doc/debian/FAQ/*.en.html",),
              "Debian FAQ permission notice (verbatim and modified copies allowed under the same notice)"),
)

CORPUS_SOURCES: tuple[DocSource, ...] = (
    # perltoc is a table of contents, *delta pages are changelogs, perlfaq* is in the seed.
    DocSource("perl-doc", "perl-doc", "pod", (f"{_PERL_POD}/*.pod",), _PERL_LICENSE,
              exclude=("*/perlfaq*.pod", "*/perlunifaq.pod", "*/perltoc.pod", "*/perl5*delta.pod",
                       "*/perl[0-9]*delta.pod", "*/perldelta.pod", "*/perlhist.pod", "*/perlartistic.pod",
                       "*/perlgpl.pod", "*/perlmodlib.pod")),
    DocSource("python-doc", "python3.11-doc", "rst", (f"{_PY_SOURCES}/**/*.rst.txt",), _PYTHON_LICENSE,
              exclude=(f"{_PY_SOURCES}/faq/*", f"{_PY_SOURCES}/whatsnew/*", f"{_PY_SOURCES}/license.rst.txt",
                       f"{_PY_SOURCES}/contents.rst.txt", f"{_PY_SOURCES}/copyright.rst.txt", "*/index.rst.txt")),
    DocSource("git-doc", "git-doc", "html", ("/usr/share/doc/git-doc/**/*.html",), "GPL-2.0-only",
              exclude=("*/RelNotes/*", "*/cmds-*.html", "*/git-*--helper.html")),
    DocSource("django-doc", "python-django-doc", "html", (f"{_DJANGO}/**/*.html",), "BSD-3-Clause",
              exclude=(f"{_DJANGO}/releases/*", f"{_DJANGO}/_modules/*", f"{_DJANGO}/_static/*",
                       f"{_DJANGO}/genindex*.html", f"{_DJANGO}/py-modindex.html", f"{_DJANGO}/search.html",
                       f"{_DJANGO}/contents.html", "*/index.html")),
    DocSource("debian-handbook", "debian-handbook", "html", ("/usr/share/doc/debian-handbook/html/en-US/*.html",),
              "GPL-2.0-or-later OR CC-BY-SA-3.0", exclude=("*/index.html", "*/ix01.html")),
)
