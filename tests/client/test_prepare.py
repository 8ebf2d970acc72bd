"""The paper's preparation rules, each switchable and counted."""

from __future__ import annotations

from client.prepare import PrepareConfig, Preparer, boilerplate_reason, is_repetitive, split_segments
from humpback.contracts import Segment, Source
from tests.client.conftest import make_text


def _doc(text: str) -> Segment:
    return Segment(text=text, source=Source(path="doc.jsonl", line=7, metadata={"url": "u"}))


def test_segments_are_largest_header_subtrees_that_fit() -> None:
    a, b, c = make_text(1, 700), make_text(2, 700), make_text(3, 700)
    doc = f"# Title\n{a}\n## Part one\n{b}\n### Detail\n{c}\n## Part two\n{a[:100]}"
    assert split_segments(doc, 5000) == [doc.strip()]
    parts = split_segments(doc, 2000)
    assert parts[0].startswith("# Title") and "## Part one" not in parts[0]
    assert parts[1].startswith("## Part one") and "### Detail" in parts[1]  # keeps its subsection
    assert parts[2].startswith("## Part two")


def test_long_headerless_text_is_packed_by_paragraphs() -> None:
    paras = [make_text(i, 500) for i in range(6)]
    parts = split_segments("\n\n".join(paras), 1200)
    assert all(len(p) <= 1200 for p in parts) and "\n\n".join(parts) == "\n\n".join(paras)


def test_boilerplate_headers() -> None:
    body = "\n" + make_text(1)
    assert boilerplate_reason("#\n" + body) == "empty_header"
    assert boilerplate_reason("SPECIAL OFFERS TODAY" + body) == "allcaps_header"
    assert boilerplate_reason("## Quick Links" + body) == "navigation_header"
    assert boilerplate_reason("Advertisement" + body) == "navigation_header"
    assert boilerplate_reason("How tides work" + body) is None
    assert boilerplate_reason(make_text(2)) is None  # no header at all


def test_repetitive_sentences() -> None:
    s = "The quick brown fox jumps over the lazy dog today."
    assert is_repetitive(f"{s} Something else entirely here now. {s}")
    assert not is_repetitive(make_text(4))


def test_counts_per_rule_and_switches() -> None:
    docs = [
        make_text(1),                                   # kept
        make_text(1),                                   # exact duplicate
        make_text(1).replace("w", "W", 1) + " extra",   # near duplicate
        "short text",                                   # too short
        "QUICK LINKS\n" + make_text(5),                 # all-caps header
        ("Buy now and save a lot of money today. " * 30),  # repetitive
        make_text(6, 4000).replace(".", ""),            # too long (one paragraph, cannot be split)
    ]
    p = Preparer()
    kept = [s for d in docs for s in p(_doc(d))]
    assert len(kept) == 1
    assert kept[0].source.line == 7 and kept[0].source.metadata == {"url": "u"}
    assert p.counts["dropped_exact_duplicate"] == 1
    assert p.counts["dropped_near_duplicate"] == 1
    assert p.counts["dropped_too_short"] == 1
    assert p.counts["dropped_allcaps_header"] == 1
    assert p.counts["dropped_repetitive"] == 1
    assert p.counts["dropped_too_long"] == 1
    off = Preparer(PrepareConfig(segment=False, min_chars=1, max_chars=10**6, boilerplate=False, repetition=False,
                                 dedup_exact=False, dedup_near=False))
    assert len([s for d in docs for s in off(_doc(d))]) == len(docs)
