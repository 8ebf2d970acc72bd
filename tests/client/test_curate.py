"""curate() against the fake server: both scoring modes, selection, bands, histogram, resume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from client.curate import CurateConfig, band_of, curate, parse_free_text, parse_logprob_score
from client.fanout import FanoutConfig
from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, ChatExample, RequestFailed, RetryableError, ScoredCandidate
from tests.client.conftest import make_text
from tests.client.fake_server import FakeServer


def _fan(url: str) -> FanoutConfig:
    return FanoutConfig(endpoints=[url], backoff_base=0.01, backoff_max=0.05)


@pytest.fixture
def candidates(tmp_path: Path) -> Path:
    p = tmp_path / "cands.jsonl"
    rows = [{"custom_id": f"{i:032x}", "instruction": f"Explain topic {i}" + "?" * i, "output": make_text(i)}
            for i in range(20)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n" + json.dumps({"instruction": ""}) + "\n")
    return p


def test_parse_logprob_score() -> None:
    top = [{"token": "5", "logprob": -0.1053605}, {"token": "4", "logprob": -2.3025851}, {"token": "x", "logprob": -1}]
    data = {"choices": [{"message": {"content": "5"}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "5", "top_logprobs": top}]}}]}
    score, dist, raw = parse_logprob_score(data)
    assert raw == "5" and dist["5"] == pytest.approx(0.9) and dist["4"] == pytest.approx(0.1)
    assert score == pytest.approx(4.9)
    nolp = {"choices": [{"message": {"content": "3"}, "finish_reason": "stop"}]}
    assert parse_logprob_score(nolp)[0] == 3.0
    with pytest.raises(RequestFailed):
        parse_logprob_score({"choices": [{"message": {"content": "great"}, "finish_reason": "stop"}]})
    with pytest.raises(RetryableError):
        parse_logprob_score({"choices": [{"message": {"content": ""}, "finish_reason": "abort"}]})


def test_parse_free_text_and_bands() -> None:
    assert parse_free_text({"choices": [{"message": {"content": "Good.\nScore: 4"}}]}) == (4.0, "Good.\nScore: 4")
    assert parse_free_text({"choices": [{"message": {"content": "no idea"}}]})[0] is None
    assert [band_of(s) for s in (1.0, 2.5, 3.99, 4.2, 4.5, 5.0, None)] == [
        "[1,2)", "[2,3)", "[3,4)", "[4,4.5)", "[4.5,5]", "[4.5,5]", "unparsed"]


async def test_logprobs_mode_scores_selects_and_plots(fake: FakeServer, candidates: Path, tmp_path: Path) -> None:
    fake.keep_bodies = True
    out = tmp_path / "curated.jsonl"
    summary = await curate(candidates, out, _fan(fake.url), CurateConfig(min_score=3.5, progress=False))
    scored = [ScoredCandidate.model_validate_json(x) for x in (tmp_path / "curated.scored.jsonl").read_text().splitlines()]
    assert len(scored) == 20 and summary.input["rejected"] == 2
    # Lines without a source are located by file and line; their own custom_id names the candidate.
    assert {(s.candidate_id, s.source.path, s.source.line) for s in scored} == {
        (f"{i:032x}", str(candidates), i + 1) for i in range(20)}
    assert all(1.0 <= s.score <= 5.0 and abs(sum(s.distribution.values()) - 1) < 1e-9 for s in scored)  # type: ignore[union-attr, operator]
    body = fake.bodies[0]
    assert body["structured_outputs"] == {"choice": ["1", "2", "3", "4", "5"]} and body["logprobs"] is True
    curated = [ChatExample.model_validate_json(x) for x in out.read_text().splitlines()]
    assert len(curated) == sum(1 for s in scored if s.score >= 3.5) == summary.extra.selected > 0  # type: ignore[operator]
    assert curated[0].messages[0].content == AUGMENTED_SYSTEM_PROMPT
    assert sum(summary.extra.bands.values()) == 20
    assert (tmp_path / "curated.scores.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "curated.errors.jsonl").read_text().splitlines()) == 2


async def test_top_fraction_sets_k_from_the_ranking(fake: FakeServer, candidates: Path, tmp_path: Path) -> None:
    out = tmp_path / "curated.jsonl"
    await curate(candidates, out, _fan(fake.url), CurateConfig(min_score=5.0, progress=False))
    scores = sorted((ScoredCandidate.model_validate_json(x).score for x in
                     (tmp_path / "curated.scored.jsonl").read_text().splitlines()), reverse=True)
    scored_before = fake.requests["/v1/chat/completions"]
    summary = await curate(candidates, out, _fan(fake.url), CurateConfig(top_fraction=0.25, progress=False))
    assert fake.requests["/v1/chat/completions"] == scored_before  # re-selected from the journal alone
    assert summary.extra.k == scores[4] and summary.extra.top_fraction == 0.25  # 5th of 20
    kept = sum(1 for s in scores if s >= scores[4])
    assert summary.extra.selected == kept == len(out.read_text().splitlines()) >= 5
    with pytest.raises(ValueError, match="top_fraction"):
        CurateConfig(top_fraction=0.0)


async def test_free_text_mode_reports_parse_rate(fake: FakeServer, candidates: Path, tmp_path: Path) -> None:
    fake.script.extend(["empty", "empty"])  # two answers state no score
    out = tmp_path / "curated.jsonl"
    summary = await curate(candidates, out, _fan(fake.url), CurateConfig(mode="free_text", progress=False))
    assert summary.extra.bands["unparsed"] == 2 and summary.extra.parse_rate == 0.9


async def test_resume_scores_only_missing(fake: FakeServer, candidates: Path, tmp_path: Path) -> None:
    out = tmp_path / "curated.jsonl"
    fake.script.extend(["400"] * 3)
    first = await curate(candidates, out, _fan(fake.url), CurateConfig(progress=False))
    assert first.results["written"] == 17 and first.results["failed"] == 3
    calls = fake.requests["/v1/chat/completions"]
    second = await curate(candidates, out, _fan(fake.url), CurateConfig(progress=False))
    assert second.results["skipped_done"] == 17 and fake.requests["/v1/chat/completions"] - calls == 3
    assert second.extra.scored_total == 20


async def test_reads_gzip_candidates_with_bom_and_crlf(fake: FakeServer, candidates: Path, tmp_path: Path) -> None:
    gz = tmp_path / "cands.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + candidates.read_bytes().replace(b"\n", b"\r\n")))
    plain = await curate(candidates, tmp_path / "plain.jsonl", _fan(fake.url), CurateConfig(progress=False))
    packed = await curate(gz, tmp_path / "packed.jsonl", _fan(fake.url), CurateConfig(progress=False))
    assert packed.results["written"] == 20 == plain.results["written"]
    assert plain.extra.bands == packed.extra.bands and packed.input == {"records": 22, "rejected": 2}
    assert (tmp_path / "plain.jsonl").read_text() == (tmp_path / "packed.jsonl").read_text()


async def test_truncated_gzip_candidates_are_reported_where_they_broke(fake: FakeServer, tmp_path: Path) -> None:
    gz = tmp_path / "cands.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"instruction": f"Explain {i}", "output": make_text(i, 300)}).encode()
                                  + b"\n" for i in range(400)))
    gz.write_bytes(data[: len(data) // 2])
    summary = await curate(gz, tmp_path / "curated.jsonl", _fan(fake.url), CurateConfig(progress=False))
    scored = summary.results["written"]
    assert 0 < scored < 400 and summary.rejected == {"unreadable file": 1}
    error = json.loads((tmp_path / "curated.errors.jsonl").read_text())
    assert error["source"] == str(gz) and error["line"] == scored + 1


async def test_fields_over_the_limit_are_set_aside_unsent(fake: FakeServer, tmp_path: Path) -> None:
    fake.keep_bodies = True
    cands = tmp_path / "cands.jsonl"
    rows = [{"instruction": "Explain this", "output": make_text(0)},
            {"instruction": "Explain that", "output": "y" * (10 << 20)},  # 10 MB, over the reader's 1 MiB too
            {"instruction": "Why? " * 400, "output": make_text(2)},
            {"instruction": "Explain more", "output": make_text(3, 1500)}]
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = await curate(cands, tmp_path / "curated.jsonl", _fan(fake.url),
                           CurateConfig(progress=False, max_field_chars=1200))
    assert summary.results["written"] == 1 and len(fake.bodies) == 1
    assert make_text(0) in fake.bodies[0]["messages"][-1]["content"]
    errors = [json.loads(x) for x in (tmp_path / "curated.errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"], e["reason"]) for e in errors] == [
        (2, None, "record larger than 1048576 bytes"),
        (3, "instruction", "field 'instruction' longer than 1200 characters (--max-field-chars)"),
        (4, "output", "field 'output' longer than 1200 characters (--max-field-chars)")]
    assert CurateConfig().max_field_chars == 8000


async def test_a_corrupt_scored_line_is_skipped_reported_and_scored_again(fake: FakeServer, candidates: Path,
                                                                           tmp_path: Path) -> None:
    out, scored = tmp_path / "curated.jsonl", tmp_path / "curated.scored.jsonl"
    first = await curate(candidates, out, _fan(fake.url), CurateConfig(min_score=1.0, progress=False))
    lines = scored.read_text().splitlines(keepends=True)
    lines[6] = lines[6][:50] + "\n"  # cut in the middle of the file, not at its end
    lines[9] = '{"custom_id": "' + "ab" * 32 + '", "mode": "garbled"}\n'  # JSON with an id, but no record
    scored.write_text("".join(lines))
    calls = fake.requests["/v1/chat/completions"]
    summary = await curate(candidates, out, _fan(fake.url), CurateConfig(min_score=1.0, progress=False))
    assert fake.requests["/v1/chat/completions"] - calls == 2 and summary.results["written"] == 2
    assert summary.extra.corrupt_journal_lines == 2 == summary.results["written"]
    assert summary.extra.selected == first.extra.selected == len(out.read_text().splitlines()) == 20
    errors = [json.loads(x) for x in (tmp_path / "curated.errors.jsonl").read_text().splitlines()]
    journal = [(e["source"], e["line"], e["reason"]) for e in errors if e["source"] == str(scored)]
    assert journal == [(str(scored), 7, "corrupt journal line: not a record"),
                       (str(scored), 10, "corrupt journal line: not a record")]


async def test_a_malformed_answer_fails_its_request_not_the_run(fake: FakeServer, candidates: Path,
                                                                  tmp_path: Path) -> None:
    """A 200 whose content is a list and whose top log-probabilities are no objects: that candidate goes
    to the failures file with the reason, the others are scored (no AttributeError through the fan-out)."""
    cfg = _fan(fake.url).model_copy(update={"max_retries": 0})  # no retry: the bad answer is final
    for mode in ("logprobs", "free_text"):
        fake.script.append("malformed")
        summary = await curate(candidates, tmp_path / mode / "curated.jsonl", cfg,
                               CurateConfig(mode=mode, progress=False))
        assert summary.results["failed"] == 1 and summary.results["written"] == 19
        failed = (tmp_path / mode / "curated.failed.jsonl").read_text()
        assert "malformed answer" in failed
