"""augment() end to end against the fake server: output, side files, resume, exactly-once after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from client.augment import AugmentConfig, augment
from client.instructions import ISSUE_KINDS
from client.fanout import FanoutConfig
from humpback.contracts import Candidate, Failure
from humpback.contracts import AUGMENT_TEMPERATURE, AUGMENT_TOP_P, backward_messages
from tests.client.conftest import make_text
from tests.client.fake_server import FakeServer

ROOT = Path(__file__).resolve().parents[2]
QUIET = AugmentConfig(progress=False)
NO_RESAMPLE = AugmentConfig(progress=False, resample=0)


def _fan(*urls: str, **kw: object) -> FanoutConfig:
    return FanoutConfig(endpoints=list(urls), backoff_base=0.01, backoff_max=0.05, **kw)  # type: ignore[arg-type]


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


async def test_writes_one_candidate_per_segment(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    fake.keep_bodies = True
    out = tmp_path / "cands.jsonl"
    summary = await augment([corpus], out, _fan(fake.url), QUIET)
    cands = [Candidate.model_validate_json(line) for line in out.read_text().splitlines()]
    assert len(cands) == 30 == summary.results["written"] and len(set(_ids(out))) == 30
    assert all(c.instruction and c.model == "fake" and c.checkpoint == "/fake/weights" for c in cands)
    assert cands[0].source.path == str(corpus) and "id" in cands[0].source.metadata
    body = fake.bodies[0]
    assert body["temperature"] == AUGMENT_TEMPERATURE and body["top_p"] == AUGMENT_TOP_P
    assert body["messages"] == backward_messages(body["messages"][-1]["content"].split("Response:\n", 1)[1])
    saved = json.loads((tmp_path / "cands.summary.json").read_text())
    assert saved["results"]["written"] == 30 and saved["prepare"]["kept"] == 30


async def test_rerun_skips_done_and_retries_failed(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cands.jsonl"
    fake.script.extend(["length", "400", "empty"])  # three segments fail for good this run
    first = await augment([corpus], out, _fan(fake.url), NO_RESAMPLE)
    assert first.results["written"] == 27 and first.results["failed"] == 3
    failed = (tmp_path / "cands.failed.jsonl").read_text().splitlines()
    assert len(failed) == 3 and "truncated" in failed[0] + failed[1] + failed[2]
    assert first.failures["unusable instruction (truncated)"] == first.failures["unusable instruction (empty)"] == 1
    assert asdict(first.quality) == {"sent": 30, "usable": 27, "truncated": 1, "empty": 1, "copy": 0, "meta": 0,
                             "resampled": 0, "rescued": 0, "usable_rate": 0.9}
    calls = fake.requests["/v1/chat/completions"]
    second = await augment([corpus], out, _fan(fake.url), NO_RESAMPLE)
    assert second.results["skipped_done"] == 27 and second.results["written"] == 3
    assert fake.requests["/v1/chat/completions"] - calls == 3
    assert sorted(_ids(out)) == sorted(set(_ids(out))) and len(_ids(out)) == 30
    assert not (tmp_path / "cands.failed.jsonl").exists()


async def test_torn_last_line_is_repaired_on_resume(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cands.jsonl"
    await augment([corpus], out, _fan(fake.url), QUIET)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    summary = await augment([corpus], out, _fan(fake.url), QUIET)
    assert summary.extra.repaired_bytes > 0 and summary.results["written"] == 1
    assert len(_ids(out)) == 30 == len(set(_ids(out)))


async def test_lines_of_the_journal_that_are_no_record_are_reported_and_done_again(
        fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cands.jsonl"
    await augment([corpus], out, _fan(fake.url), QUIET)
    lines = out.read_text().splitlines(keepends=True)
    lines[4] = '{"custom_id": "not-hex", "instruction": "?"}\n'  # crashed the resume
    lines[11] = lines[11][:40] + "\n"
    out.write_text("".join(lines))
    summary = await augment([corpus], out, _fan(fake.url), QUIET)
    assert summary.results["written"] == 2 and summary.extra.corrupt_journal_lines == 2
    errors = [json.loads(x) for x in (tmp_path / "cands.errors.jsonl").read_text().splitlines()]
    assert [(e["source"], e["line"], e["reason"]) for e in errors] == [
        (str(out), 5, "corrupt journal line: not a record"), (str(out), 12, "corrupt journal line: not a record")]
    ids = [Candidate.model_validate_json(x).custom_id for i, x in enumerate(out.read_text().splitlines())
           if i not in (4, 11)]
    assert len(ids) == 30 == len(set(ids))


async def test_bad_records_go_to_the_errors_file(fake: FakeServer, tmp_path: Path) -> None:
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_bytes(json.dumps({"text": make_text(1)}).encode() + b"\n{broken\n"
                       + json.dumps({"text": 5}).encode() + b"\n\xff\xfe\n" + json.dumps({"text": make_text(2)}).encode())
    out = tmp_path / "cands.jsonl"
    summary = await augment([corpus], out, _fan(fake.url), QUIET)
    assert summary.results["written"] == 2 and summary.input["rejected"] == 3
    errors = [json.loads(x) for x in (tmp_path / "cands.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [2, 3, 4] and all(e["source"] == str(corpus) for e in errors)


async def test_duplicate_segments_are_sent_once(fake: FakeServer, tmp_path: Path) -> None:
    corpus = tmp_path / "dups.jsonl"
    corpus.write_text("".join(json.dumps({"text": make_text(i % 3)}) + "\n" for i in range(9)))
    from client.prepare import PrepareConfig

    summary = await augment([corpus], tmp_path / "c.jsonl", _fan(fake.url), QUIET,
                            PrepareConfig(dedup_exact=False, dedup_near=False))
    assert summary.results["written"] == 3 and fake.requests["/v1/chat/completions"] == 3


def _one_segment(tmp_path: Path) -> Path:
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": make_text(7)}) + "\n")
    return corpus


async def test_an_unusable_instruction_is_resampled_with_the_next_seed(fake: FakeServer, tmp_path: Path) -> None:
    fake.keep_bodies = True
    fake.script.append("length")
    out = tmp_path / "cands.jsonl"
    summary = await augment([_one_segment(tmp_path)], out, _fan(fake.url), AugmentConfig(progress=False, seed=7))
    assert summary.results["written"] == 1 and summary.results["failed"] == 0
    assert asdict(summary.quality) == {"sent": 1, "usable": 1, "truncated": 1, "empty": 0, "copy": 0, "meta": 0,
                               "resampled": 1, "rescued": 1, "usable_rate": 1.0}
    assert summary.extra.retries == 0  # a resample is no retry: no backoff
    first, second = fake.bodies
    assert (first["seed"], second["seed"]) == (7, 8) and first["messages"] == second["messages"]
    assert Candidate.model_validate_json(out.read_text()).instruction.startswith("What does this say")
    # The custom_id does not depend on `resample`: a run without resampling finds the segment done.
    again = await augment([_one_segment(tmp_path)], out, _fan(fake.url),
                          AugmentConfig(progress=False, seed=7, resample=0))
    assert again.results["skipped_done"] == 1 and len(fake.bodies) == 2


async def test_a_segment_fails_when_its_resamples_are_unusable_too(fake: FakeServer, tmp_path: Path) -> None:
    fake.keep_bodies = True
    fake.script.extend(["meta", "copy", "empty"])
    out = tmp_path / "cands.jsonl"
    summary = await augment([_one_segment(tmp_path)], out, _fan(fake.url), QUIET)
    assert summary.results["written"] == 0 and summary.failures == {"unusable instruction (empty)": 1}
    assert asdict(summary.quality) == {"sent": 1, "usable": 0, "truncated": 0, "empty": 1, "copy": 1, "meta": 1,
                               "resampled": 2, "rescued": 0, "usable_rate": 0.0}
    assert [b.get("seed") for b in fake.bodies] == [None, None, None]  # no seed set: none sent (CPU servers refuse one)
    failure = Failure.model_validate_json((tmp_path / "cands.failed.jsonl").read_text())
    assert (failure.reason, failure.attempts) == ("unusable instruction (empty): ''", 3)
    saved = json.loads((tmp_path / "cands.summary.json").read_text())
    assert saved["quality"] == asdict(summary.quality)
    rerun = await augment([_one_segment(tmp_path)], out, _fan(fake.url), QUIET)  # a re-run retries it
    assert rerun.results["written"] == 1 and rerun.quality.usable_rate == 1.0


async def test_no_resample_at_temperature_zero(fake: FakeServer, tmp_path: Path) -> None:
    fake.script.extend(["meta", "meta"])
    summary = await augment([_one_segment(tmp_path)], tmp_path / "c.jsonl", _fan(fake.url),
                            AugmentConfig(progress=False, temperature=0.0))
    assert summary.results["failed"] == 1 and summary.quality.resampled == 0
    assert fake.requests["/v1/chat/completions"] == 1


async def test_every_answer_is_counted_once(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    fake.script.extend(["length", "meta", "400", "copy", "empty", "length", "meta", "length"])
    summary = await augment([corpus], tmp_path / "c.jsonl", _fan(fake.url), AugmentConfig(progress=False, resample=1))
    q = asdict(summary.quality)
    assert {k: q[k] for k in ISSUE_KINDS} == {"truncated": 3, "empty": 1, "copy": 1, "meta": 2}
    other = summary.failures["HTTP 400"]
    assert q["sent"] == 30 and q["usable"] == summary.results["written"] and q["usable_rate"] == q["usable"] / 30
    assert q["sent"] + q["resampled"] == q["usable"] + sum(q[k] for k in ISSUE_KINDS) + other
    assert fake.requests["/v1/chat/completions"] == q["sent"] + q["resampled"]


def _run_cli(url: str, corpus: Path, out: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "humpback", "augment", "--corpus", str(corpus), "--out", str(out),
           "--endpoint", url, "--no-progress", "--concurrency", "16", "--fsync", "never"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_run_then_restart_gives_exactly_one_line_per_input(tmp_path: Path) -> None:
    fake = FakeServer(delay=0.02).start()
    try:
        corpus = tmp_path / "corpus.jsonl"
        n = 240
        corpus.write_text("".join(json.dumps({"text": make_text(i)}) + "\n" for i in range(n)))
        out = tmp_path / "cands.jsonl"
        for kill_after in (30, 100):  # two kills at different moments, then a clean finish
            proc = _run_cli(fake.url, corpus, out)
            deadline = time.monotonic() + 60
            while (not out.exists() or out.stat().st_size == 0 or len(out.read_bytes().splitlines()) < kill_after):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        # Simulate the worst moment of a kill: half a line written.
        with open(out, "ab") as f:
            f.write(b'{"custom_id":"deadbeef')
        proc = _run_cli(fake.url, corpus, out)
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
        ids = _ids(out)
        assert len(ids) == n == len(set(ids))
    finally:
        fake.stop()
