"""Streaming readers: every format, and every kind of bad input becomes a counted, located rejection."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.corpus import Corpus, open_corpora
from humpback.contracts import CorpusError, Rejected, Segment


def _split(corpus: Corpus) -> tuple[list[Segment], list[Rejected]]:
    good, bad = [], []
    for rec in corpus:
        (bad if isinstance(rec, Rejected) else good).append(rec)
    return good, bad


def test_jsonl_keeps_other_fields_as_metadata(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"body": "hello there", "url": "u", "n": 1}) + "\n")
    good, bad = _split(Corpus(p, text_field="body"))
    assert not bad
    assert good[0].text == "hello there"
    assert good[0].source.metadata == {"url": "u", "n": 1}
    assert good[0].source.line == 1


def test_every_bad_input_kind_is_rejected_with_line_and_reason(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "fine record"}).encode(),          # 1 ok
        b'{"text": "unterminated',                               # 2 invalid JSON
        json.dumps({"title": "no text"}).encode(),              # 3 missing field
        json.dumps({"text": 42}).encode(),                       # 4 not a string
        b'{"text": "caf\xe9 latin-1"}',                          # 5 invalid UTF-8
        json.dumps({"text": "   "}).encode(),                    # 6 empty
        json.dumps({"text": "x" * (10 << 20)}).encode(),         # 7 a 10 MB record
        bytes(b for b in range(256) if b != 10) * 4,             # 8 binary junk
        json.dumps({"text": "nul\u0000inside"}).encode(),        # 9 binary in a string
        json.dumps(["a", "list"]).encode(),                      # 10 not an object
        json.dumps({"text": None}).encode(),                     # 11 null
        json.dumps({"text": "last fine one"}).encode(),          # 12 ok
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = _split(Corpus(p))
    assert [g.source.line for g in good] == [1, 12]
    reasons = {r.line: r.reason for r in bad}
    assert set(reasons) == set(range(2, 12))
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "missing field 'text'"
    assert "not a string" in reasons[4]
    assert reasons[5].startswith("invalid UTF-8")
    assert "empty" in reasons[6]
    assert "larger than" in reasons[7]
    assert reasons[8].startswith(("invalid UTF-8", "invalid JSON"))
    assert "binary" in reasons[9]
    assert "JSON object" in reasons[10]
    assert "null" in reasons[11]
    assert all(r.source == str(p) for r in bad)
    assert next(r for r in bad if r.line == 3).field == "text"


def test_huge_record_is_not_held_in_memory(tmp_path: Path) -> None:
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "' + b"y" * (5 << 20) + b'"}\n{"text": "after"}\n')
    good, bad = _split(Corpus(p, max_record_bytes=1 << 16))
    assert [g.text for g in good] == ["after"] and bad[0].line == 1


def test_gzip_jsonl_and_progress(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl.gz"
    with gzip.open(p, "wt") as f:
        for i in range(100):
            f.write(json.dumps({"text": f"record {i}"}) + "\n")
    c = Corpus(p)
    good, bad = _split(c)
    assert len(good) == 100 and not bad
    assert c.bytes_read == c.total_bytes == p.stat().st_size


def test_truncated_gzip_ends_file_not_run(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"text": f"r{i}" * 50}).encode() + b"\n" for i in range(2000)))
    p.write_bytes(data[: len(data) // 2])
    good, bad = _split(Corpus(p))
    assert good and bad[-1].reason.startswith("unreadable file")
    assert [g.source.line for g in good] == list(range(1, len(good) + 1))
    assert bad == [bad[-1]] and bad[-1].line == len(good) + 1  # the line it broke in


def test_truncated_gzip_text_drops_the_paragraph_it_broke_in(tmp_path: Path) -> None:
    p = tmp_path / "c.txt.gz"
    data = gzip.compress(b"".join(f"paragraph {i}\nsecond line\n\n".encode() for i in range(3000)))
    p.write_bytes(data[: len(data) // 2])
    good, bad = _split(Corpus(p))
    assert all(g.text.endswith("\nsecond line") for g in good)
    assert bad[-1].line > good[-1].source.line + 1 and bad[-1].reason.startswith("unreadable file")


def test_byte_order_mark_and_crlf_line_ends(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    p = tmp_path / "c.jsonl"
    p.write_bytes(bom + b'{"text": "first"}\r\n{"text": "second"}\r\n\r\n')
    good, bad = _split(Corpus(p))
    assert [(g.text, g.source.line) for g in good] == [("first", 1), ("second", 2)] and not bad
    t = tmp_path / "c.txt.gz"
    t.write_bytes(gzip.compress(bom + b"para one\r\nline two\r\n\r\npara two\r\n"))
    assert [(g.text, g.source.line) for g in Corpus(t)] == [("para one\nline two", 1), ("para two", 4)]


def test_text_paragraphs(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_bytes(b"first para\nline two\n\n\n\nsecond para\n\nbad \xff bytes\n\n  \n")
    good, bad = _split(Corpus(p))
    assert [(g.text, g.source.line) for g in good] == [("first para\nline two", 1), ("second para", 6)]
    assert bad[0].line == 8 and bad[0].reason.startswith("invalid UTF-8")


def test_text_gz(tmp_path: Path) -> None:
    p = tmp_path / "c.txt.gz"
    p.write_bytes(gzip.compress(b"a\n\nb\n"))
    assert [g.text for g in Corpus(p)] == ["a", "b"]


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["one", None, "", "four"], "lang": ["en"] * 4}), p)
    good, bad = _split(Corpus(p))
    assert [(g.text, g.source.line, g.source.metadata) for g in good] == [("one", 1, {"lang": "en"}),
                                                                           ("four", 4, {"lang": "en"})]
    assert [r.line for r in bad] == [2, 3]


def test_parquet_missing_column_names_the_fix(tmp_path: Path) -> None:
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["one"]}), p)
    with pytest.raises(CorpusError, match="--text-field"):
        list(Corpus(p))


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text("a,b\n")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        Corpus(p)


def test_every_file_is_checked_before_any_is_read(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "c.csv").write_text("a,b\n")
    pq.write_table(pa.table({"body": ["one"]}), tmp_path / "c.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps({"text": "not compressed"}) + "\n")
    names = ["good.jsonl", "missing.jsonl", "folder.jsonl", "c.csv", "c.parquet", "broken.parquet", "plain.jsonl.gz"]
    with pytest.raises(CorpusError) as err:
        open_corpora([tmp_path / n for n in names])
    problems = str(err.value).splitlines()
    assert [line.split(": ", 1)[0] for line in problems] == [str(tmp_path / n) for n in names[1:]]
    assert ["no such file" in problems[0], "a directory" in problems[1], "unknown corpus format" in problems[2],
            "pass --text-field" in problems[3], "not a readable Parquet file" in problems[4],
            "not gzip-compressed" in problems[5]] == [True] * 6
    assert [c.path for c in open_corpora([good, Corpus(good)])] == [good, good]
