"""Each parser on a short excerpt shaped like its real source (no installed files needed)."""

from __future__ import annotations

import pytest

from humpback.contracts import PodError
from humpback.data.debian_faq import debian_faq_pairs
from humpback.data.htmltext import parse_html
from humpback.data.pod import parse_pod, perlfaq_pairs, strip_codes
from humpback.data.prose import documents
from humpback.data.rst import parse_rst, strip_inline
from humpback.data.text import qa_pairs

PERLFAQ = """\
=head1 NAME

perlfaq4 - Data Manipulation

=head1 DESCRIPTION

This section of the FAQ answers questions related to manipulating
numbers, dates, strings, arrays, hashes, and miscellaneous data issues.

=head1 Data: Numbers

=head2 Why am I getting long decimals (eg, 19.9499999999999) instead of the numbers I should be getting (eg, 19.95)?

(contributed by brian d foy)

For the long explanation, see David Goldberg's "What Every Computer
Scientist Should Know About Floating-Point Arithmetic"
(L<http://web.cse.msu.edu/~cse320/Documents/FloatingPoint.pdf>).

Internally, your computer represents floating-point numbers in binary.
Use B<sprintf> or C<< printf >> with the C<%.2f> format, see L<perlfunc/"sprintf">:

    printf "%.2f", 19.95;   # 19.95

=over 4

=item *

C<Math::BigFloat> E<mdash> arbitrary precision

=back

=head2 Data: Dates

Not a question, so not a pair.

=head1 AUTHOR AND COPYRIGHT

Copyright (c) 1997-2010 Tom Christiansen.
"""


def test_perlfaq_pairs_strip_pod_markup():
    pairs = perlfaq_pairs(PERLFAQ)
    assert len(pairs) == 1
    question, answer = pairs[0]
    assert question.startswith("Why am I getting long decimals") and question.endswith("(eg, 19.95)?")
    assert answer.startswith("For the long explanation")  # "(contributed by ...)" dropped
    assert "Use sprintf or `printf` with the `%.2f` format, see \"sprintf\" in perlfunc:" in answer
    assert "\n    printf \"%.2f\", 19.95;   # 19.95" in answer  # verbatim kept as indented code
    assert "- `Math::BigFloat` \u2014 arbitrary precision" in answer
    assert "Not a question" not in answer and "Christiansen" not in answer
    for markup in ("C<", "L<", "B<", "E<", "=item", "=over"):
        assert markup not in answer


def test_pod_codes_nested_and_errors():
    assert strip_codes("B<I<bold italic>> and C<< $a->[0] >> and C<<<FOO>") == "bold italic and `$a->[0]` and `<<FOO`"
    assert strip_codes("X<index>Z<>S<no break> L<text|perlop/Quote>") == "no break text"
    with pytest.raises(PodError, match="unclosed C"):
        strip_codes("C<never closed")
    with pytest.raises(PodError, match="unknown command =bogus"):
        parse_pod("=head1 A\n\n=bogus x\n")


PY_FAQ = """\
:tocdepth: 2

===============
Programming FAQ
===============

.. only:: html

   .. contents::

General Questions
=================

.. _faq-debugger:

Is there a source code level debugger with breakpoints, single-stepping, etc.?
------------------------------------------------------------------------------

Yes.

The built-in function :func:`breakpoint` drops into :mod:`pdb`, which is
:mod:`documented in the Library Reference Manual <pdb>`; see also
`Pylint <https://pylint.pycqa.org/>`_ and ``python -m pdb``.

* `Wing IDE <https://wingware.com/>`_
* **PyCharm**

How do I create a multidimensional list?
----------------------------------------

You probably tried to make a multidimensional array like this::

   >>> A = [[None] * 2] * 3

.. code-block:: python

   w, h = 2, 3
   A = [[None] * w for i in range(h)]

.. note::
   Replicating with ``*`` copies :ref:`references <faq-refs>` only.

Core Language
=============
"""


def test_python_faq_pairs_strip_rst_markup():
    sections = parse_rst(PY_FAQ)
    assert [(s.level, s.title) for s in sections] == [
        (1, "Programming FAQ"), (2, "General Questions"),
        (3, "Is there a source code level debugger with breakpoints, single-stepping, etc.?"),
        (3, "How do I create a multidimensional list?"), (2, "Core Language")]
    pairs = qa_pairs(sections)
    assert [q for q, _ in pairs] == [sections[2].title, sections[3].title]
    debugger, lists = pairs[0][1], pairs[1][1]
    assert debugger.startswith("Yes.\n\nThe built-in function `breakpoint` drops into `pdb`, which is "
                               "documented in the Library Reference Manual; see also Pylint and `python -m pdb`.")
    assert "- Wing IDE\n- PyCharm" in debugger
    assert "like this:\n\n    >>> A = [[None] * 2] * 3" in lists
    assert "\n    A = [[None] * w for i in range(h)]" in lists
    assert "Note: Replicating with `*` copies references only." in lists
    for text in (debugger, lists):
        for markup in (":func:", ":ref:", ":mod:", "``", ".. ", "_`", "contents::"):
            assert markup not in text


def test_rst_inline_roles():
    assert strip_inline(":pep:`8` and :rfc:`2822`, :meth:`~dict.get`, :class:`!str`") == \
        "PEP 8 and RFC 2822, `get`, `str`"


DEBIAN_FAQ_HTML = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "x"><html xmlns="http://www.w3.org/1999/xhtml">
<head><title>Chapter 1. Definitions and overview</title><style>body { x: y }</style></head><body>
<div class="navheader"><table><tr><th colspan="3">Chapter 1. Definitions and overview</th></tr></table><hr /></div>
<div class="chapter"><div class="titlepage"><div><div><h1 class="title"><a id="basic-defs"></a>Chapter 1. Definitions
and overview</h1></div></div></div><div class="toc"><p><strong>Table of Contents</strong></p><dl class="toc"><dt>
<span class="section"><a href="#whatisfaq">1.1. What is this FAQ?</a></span></dt></dl></div>
<div class="section"><div class="titlepage"><div><div><h2 class="title"><a id="whatisdebian"></a>1.2. What is
Debian GNU/Linux?</h2></div></div></div><p>
Debian GNU/Linux is a particular <span class="emphasis"><em>distribution</em></span> of the Linux
operating system, and numerous packages that run on it.
</p><div class="itemizedlist"><ul class="itemizedlist" type="disc"><li class="listitem"><p>
<span class="strong"><strong>full featured</strong></span>: see the <code class="literal">non-free</code> &amp;
<a class="ulink" href="https://www.debian.org/" target="_top">mirror sites</a>.
</p></li></ul></div><pre class="screen">
# apt install debian-faq
</pre></div>
<div class="section"><div class="titlepage"><div><div><h2 class="title"><a id="feedback"></a>16.2. Feedback</h2>
</div></div></div><p>Comments are welcome.</p></div></div>
<div class="navfooter"><hr /><table><tr><td><a href="index.en.html">Home</a></td></tr></table></div></body></html>
"""


def test_debian_faq_pairs_from_docbook_html():
    pairs = debian_faq_pairs(DEBIAN_FAQ_HTML)
    assert pairs == [("What is Debian GNU/Linux?",
                      "Debian GNU/Linux is a particular distribution of the Linux operating system, and numerous "
                      "packages that run on it.\n\n- full featured: see the `non-free` & mirror sites.\n\n"
                      "    # apt install debian-faq")]


SPHINX_HTML = """<html><head><script>var x = "<p>";</script></head><body>
<div class="document"><div id="hd"><h1><a href="index.html">Django documentation</a></h1>
<div id="global-nav"><a href="genindex.html">Index</a></div></div>
<div id="bd"><div class="section" id="s-sessions"><h1>How to use sessions<a class="headerlink" href="#x">¶</a></h1>
<p>Django provides full support for anonymous sessions.</p>
<div class="section"><h2>Enabling sessions<a class="headerlink" href="#y">¶</a></h2>
<p>Edit the <code class="docutils literal notranslate"><span class="pre">MIDDLEWARE</span></code> setting.</p>
<div class="section"><h3>Details</h3><p>More text.</p></div></div>
<div class="section"><h2>See also</h2><p>Links.</p></div></div></div>
<div class="sphinxsidebar" role="navigation"><h3>Table of Contents</h3><ul><li>nav</li></ul></div>
</div></body></html>"""


def test_prose_documents_keep_headers_and_drop_chrome():
    docs = documents(SPHINX_HTML, "html")
    assert docs == [("How to use sessions", "# How to use sessions\n\nDjango provides full support for anonymous "
                     "sessions."),
                    ("Enabling sessions", "# Enabling sessions\n\nEdit the `MIDDLEWARE` setting.\n\n## Details\n\n"
                     "More text.")]
    assert all("¶" not in s.title for s in parse_html(SPHINX_HTML))


def test_prose_documents_from_pod_skip_man_sections():
    docs = documents(PERLFAQ, "pod")
    titles = [t for t, _ in docs]
    assert titles == ["Description", "Data: Numbers"]  # NAME and AUTHOR AND COPYRIGHT dropped
    assert docs[1][1].startswith("# Data: Numbers\n\n## Why am I getting long decimals")
    assert "\n## Data: Dates\n\nNot a question" in docs[1][1]
