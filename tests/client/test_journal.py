"""The journal: torn-line repair, resume index, one write per line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client.journal import IdSet, Journal, LineWriter, lock_path, output_lock, repair_torn_tail
from humpback.contracts import InputError


def _line(i: int) -> str:
    return json.dumps({"custom_id": f"{i:016x}" * 2, "v": "x" * i})


def test_repairs_torn_last_line_and_loads_done_ids(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    p.write_text(_line(1) + "\n" + _line(2) + "\n" + _line(3)[:20])
    j = Journal(p).open()
    try:
        assert j.repaired_bytes == 20
        assert f"{1:016x}" * 2 in j.done and f"{2:016x}" * 2 in j.done and f"{3:016x}" * 2 not in j.done
        j.append(_line(3))
    finally:
        j.close()
    lines = p.read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == [f"{i:016x}" * 2 for i in (1, 2, 3)]


def test_torn_single_line_file_becomes_empty(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    p.write_text('{"custom_id": "ab')
    assert repair_torn_tail(p) == len('{"custom_id": "ab')
    assert p.read_text() == ""


def test_intact_file_is_untouched(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    p.write_text(_line(1) + "\n")
    assert repair_torn_tail(p) == 0 and p.read_text() == _line(1) + "\n"


def test_ids_found_without_custom_id_first(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    p.write_text(json.dumps({"a": "b" * 400, "custom_id": "ff" * 16}) + "\nnot json\n")
    with Journal(p, fsync="always") as j:
        assert "ff" * 16 in j.done and len(j.done) == 1


def test_idset() -> None:
    s = IdSet()
    s.add("0123456789abcdef" * 2)
    assert "0123456789abcdef" * 2 in s and "1" * 32 not in s and len(s) == 1
    s.discard("0123456789abcdef" * 2)
    assert len(s) == 0


def test_line_writer_replaces_stale_file(tmp_path: Path) -> None:
    p = tmp_path / "errors.jsonl"
    p.write_text("stale\n")
    w = LineWriter(p)
    assert not p.exists()
    w.write("{}")
    w.close()
    assert p.read_text() == "{}\n"


def test_lines_that_are_no_record_are_skipped_and_reported(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    lines = [_line(1), '{"custom_id": "not-hex", "v": 1}', _line(2)[:30], "garbage \xff", _line(3),
             json.dumps({"custom_id": 7}), ""]
    p.write_text("\n".join(lines) + "\n", encoding="latin-1")
    seen: list[int] = []
    with Journal(p, on_corrupt=lambda lineno, line: seen.append(lineno)) as j:
        assert len(j.done) == 2 and f"{1:016x}" * 2 in j.done and f"{3:016x}" * 2 in j.done
        assert f"{2:016x}" * 2 not in j.done  # its line was cut: the run does it again
    assert seen == [2, 3, 4, 6, 7]


def test_a_second_lock_on_an_output_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cands.jsonl"
    with output_lock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
        with pytest.raises(InputError, match=rf"cands\.jsonl is in use: the run with pid {os.getpid()} "):
            with output_lock(out):
                pass
    assert not lock_path(out).exists()
    lock_path(out).write_text("999999\n")  # left behind by a killed run: nobody holds it
    with output_lock(out, out, tmp_path / "other.jsonl"):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
