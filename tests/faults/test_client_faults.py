"""Faults around the client, through its real CLI against a fake OpenAI-compatible server (loopback):
a full disk under the journal, a server that answers garbage or hangs, a client killed mid-curate.

Every test ends by counting what reached the journal: each input exactly once (0 lost, 0 duplicated).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.conftest import make_text
from tests.client.fake_server import FakeServer, read_json
from tests.faults.report import FaultRow

pytestmark = pytest.mark.fault
ROOT = Path(__file__).resolve().parents[2]
# Fast retries, so that a test of retrying takes seconds, not the default minutes.
FAST_RETRY = ["--backoff-base", "0.01", "--backoff-max", "0.05"]


def write_corpus(path: Path, n: int, chars: int = 900) -> Path:
    path.write_text("".join(json.dumps({"text": make_text(i, chars), "id": i}) + "\n" for i in range(n)))
    return path


def humpback(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "humpback", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def augment_args(corpus: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["augment", "--corpus", str(corpus), "--out", str(out), "--endpoint", url, "--no-progress",
            "--fsync", "never", *extra]


def journal_ids(path: Path) -> Counter[str]:
    """custom_id -> how many whole lines carry it; fails on any line that is not a record."""
    ids: Counter[str] = Counter()
    for lineno, line in enumerate(path.read_bytes().split(b"\n")[:-1], 1):
        ids[json.loads(line)["custom_id"]] += 1  # a torn or mixed line fails here, naming nothing lost silently
        assert line.endswith(b"}"), f"{path} line {lineno} is not whole"
    assert path.read_bytes().endswith(b"\n") or path.stat().st_size == 0, f"{path} ends in a torn line"
    return ids


def lost_and_duplicated(ids: Counter[str], expected: int) -> tuple[int, int]:
    return expected - len(ids), sum(n - 1 for n in ids.values())


# --- a full disk under the journal ----------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: room for a few dozen candidates, not for a run of 200."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_under_the_journal_stops_the_run_with_the_journal_whole(small_fs: Path, tmp_path: Path,
                                                                         fault_report) -> None:
    n = 200
    corpus = write_corpus(tmp_path / "corpus.jsonl", n)
    out = small_fs / "cands.jsonl"
    fake = FakeServer().start()
    try:
        start = time.monotonic()
        full = humpback(*augment_args(corpus, out, fake.url, "--concurrency", "4"))
        assert full.returncode == 4, full.stderr[-2000:]
        message = full.stderr.strip().splitlines()[-1]
        assert message.startswith(f"humpback: error: {out}: cannot write (No space left on device)"), message
        kept = journal_ids(out)  # every line whole: the refused line was taken back
        assert 0 < len(kept) < n and f"it keeps its {len(kept)} records whole" in message
        sent = fake.requests["/v1/chat/completions"]
        # At most the requests in flight when the disk filled were asked beyond what was kept.
        assert sent <= len(kept) + 4 + 1, f"{sent} requests for {len(kept)} records: the run went on asking"

        subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
        resumed = humpback(*augment_args(corpus, out, fake.url))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        lost, dup = lost_and_duplicated(journal_ids(out), n)
        assert (lost, dup) == (0, 0)
        assert fake.requests["/v1/chat/completions"] - sent == n - len(kept)  # the kept ones were not asked again
    finally:
        fake.stop()
    fault_report(FaultRow(
        "disk full under the augment journal (64 KiB tmpfs), then room made and the command re-run",
        f"exit 4 and `humpback: error: <out>: {message.split(f'{out}: ', 1)[1]}`; the journal keeps "
        f"{len(kept)} whole records; the re-run asks only for the rest", n, lost, dup, "run exits 0 after room is made",
        time.monotonic() - start))


# --- a server that answers garbage, or hangs ---------------------------------------------------------


GARBAGE = {
    "not JSON": (200, b"<html><body>502 Bad Gateway</body></html>", b"text/html"),
    "JSON without choices": (200, b'{"object": "error", "message": "upstream reset"}', b"application/json"),
    "JSON list": (200, b"[]", b"application/json"),
    "choices of another shape": (200, b'{"choices": [{"text": "a completion, not a chat message"}]}',
                                 b"application/json"),
    "HTML 502": (502, b"<html>Bad Gateway</html>", b"text/html"),
}


class GarbageServer(FakeServer):
    """The fake server, except that chat requests get garbage while `garbage` is more than 0 (each of
    the kinds above in turn; "cut" sends half a body and drops the connection)."""

    def __init__(self, garbage: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.garbage = garbage
        self.sent: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions" or self.garbage <= 0:
            return await super().__call__(scope, receive, send)
        self.garbage -= 1
        await read_json(receive)
        kinds = [*GARBAGE, "cut"]
        kind = kinds[sum(self.sent.values()) % len(kinds)]
        self.sent[kind] += 1
        if kind == "cut":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"4000"), (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"choices": [{"mess', "more_body": True})
            raise ConnectionResetError("cut on purpose")
        status, body, ctype = GARBAGE[kind]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def test_garbage_answers_are_retried_and_nothing_is_lost(tmp_path: Path, fault_report) -> None:
    n = 60
    corpus = write_corpus(tmp_path / "corpus.jsonl", n)
    out = tmp_path / "cands.jsonl"
    server = GarbageServer(garbage=90).start()
    try:
        start = time.monotonic()
        done = humpback(*augment_args(corpus, out, server.url, "--max-retries", "8", *FAST_RETRY))
        assert done.returncode == 0, done.stderr[-2000:]
        lost, dup = lost_and_duplicated(journal_ids(out), n)
        assert (lost, dup) == (0, 0)
        assert set(server.sent) == {*GARBAGE, "cut"}, server.sent
        retries = json.loads((tmp_path / "cands.summary.json").read_text())["extra"]["retries"]
        assert retries == 90  # each garbage answer cost one retry, and no more
    finally:
        server.stop()
    fault_report(FaultRow(
        "server answers 90 requests with garbage (HTML with status 200, JSON of another shape, `[]`, choices "
        "without a message, 502, a body cut mid-way), then well",
        f"the client retries ({retries} retries in the summary) and the run exits 0", n, lost, dup,
        "server and client", time.monotonic() - start))


def test_a_server_that_only_answers_garbage_fails_every_segment_with_a_reason(tmp_path: Path,
                                                                               fault_report) -> None:
    n = 20
    corpus = write_corpus(tmp_path / "corpus.jsonl", n)
    out = tmp_path / "cands.jsonl"
    server = GarbageServer(garbage=10**9).start()
    try:
        start = time.monotonic()
        broken = humpback(*augment_args(corpus, out, server.url, "--max-retries", "2", *FAST_RETRY))
        assert broken.returncode == 3, broken.stderr[-2000:]
        failures = [json.loads(line) for line in (tmp_path / "cands.failed.jsonl").read_text().splitlines()]
        assert len(failures) == n and all(f["reason"] for f in failures)
        assert not out.exists() or out.stat().st_size == 0
        server.garbage = 0  # the server is mended: the same command finishes the run
        mended = humpback(*augment_args(corpus, out, server.url, *FAST_RETRY))
        assert mended.returncode == 0, mended.stderr[-2000:]
        lost, dup = lost_and_duplicated(journal_ids(out), n)
        assert (lost, dup) == (0, 0)
    finally:
        server.stop()
    reason = failures[0]["reason"]
    fault_report(FaultRow(
        "server answers nothing but garbage; then mended and the command re-run",
        f"exit 3; each segment in `cands.failed.jsonl` with its reason (`{reason[:70]}...`); the re-run "
        "completes", n, lost, dup, "run exits 0 once the server is mended", time.monotonic() - start))


def test_a_hanging_server_times_out_and_the_rerun_completes(tmp_path: Path, fault_report) -> None:
    n = 12
    corpus = write_corpus(tmp_path / "corpus.jsonl", n)
    out = tmp_path / "cands.jsonl"
    server = FakeServer(hang=60).start()
    try:
        server.script.extend(["hang"] * (2 * n))  # every first and second attempt hangs
        start = time.monotonic()
        hung = humpback(*augment_args(corpus, out, server.url, "--timeout", "1", "--max-retries", "1",
                                      *FAST_RETRY))
        took = time.monotonic() - start
        assert hung.returncode == 3, hung.stderr[-2000:]
        failures = [json.loads(line) for line in (tmp_path / "cands.failed.jsonl").read_text().splitlines()]
        assert len(failures) == n and all("ReadTimeout after 1s" in f["reason"] for f in failures)
        assert took < 45, f"{took:.0f} s: the timeout did not bound the wait"
        server.script.clear()
        again = humpback(*augment_args(corpus, out, server.url, "--timeout", "5"))
        assert again.returncode == 0, again.stderr[-2000:]
        lost, dup = lost_and_duplicated(journal_ids(out), n)
        assert (lost, dup) == (0, 0)
    finally:
        server.stop()
    fault_report(FaultRow(
        "server accepts requests and never answers (`--timeout 1 --max-retries 1`); then answers again",
        f"exit 3 after {took:.0f} s; each segment failed with `ReadTimeout after 1s`; the re-run completes",
        n, lost, dup, "run exits 0 once the server answers", time.monotonic() - start))


# --- the client killed mid-curate -----------------------------------------------------------------------


def test_curate_killed_twice_then_resumed_scores_each_candidate_once(tmp_path: Path, fault_report) -> None:
    n = 200
    corpus = write_corpus(tmp_path / "corpus.jsonl", n)
    cands = tmp_path / "cands.jsonl"
    fake = FakeServer(delay=0.02).start()
    try:
        assert humpback(*augment_args(corpus, cands, fake.url)).returncode == 0
        scored = tmp_path / "scored.jsonl"
        cmd = [sys.executable, "-m", "humpback", "curate", "--candidates", str(cands), "--out",
               str(tmp_path / "curated.jsonl"), "--scored", str(scored), "--endpoint", fake.url, "--no-progress",
               "--fsync", "never", "--concurrency", "16", "--min-score", "1"]
        start = time.monotonic()
        kills = 0
        for kill_after in (25, 90):
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while not scored.exists() or scored.read_bytes().count(b"\n") < kill_after:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        with open(scored, "ab") as f:
            f.write(b'{"custom_id": "0123')  # the worst moment of a kill: half a line written
        last = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert last.returncode == 0, last.stderr[-2000:]
        lost, dup = lost_and_duplicated(journal_ids(scored), n)
        assert (lost, dup) == (0, 0)
        curated = (tmp_path / "curated.jsonl").read_text().splitlines()
        assert len(curated) == n  # --min-score 1 keeps every pair: the curated set is complete too
    finally:
        fake.stop()
    fault_report(FaultRow(
        f"client killed (SIGKILL) {kills} times mid-curate, a torn last line, then re-run",
        "the re-run repairs the torn line, skips what was scored, and exits 0", n, lost, dup,
        "run exits 0", time.monotonic() - start))
