"""A model server killed (SIGKILL) in the middle of an augment run, on the real stack: the supervisor
restarts it, the client retries with its default settings, and every segment is accounted for once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.supervisor import health, process_info
from tests.faults.report import FaultRow
from tests.faults.test_client_faults import journal_ids, lost_and_duplicated, write_corpus

pytestmark = [pytest.mark.fault, pytest.mark.server]
ROOT = Path(__file__).resolve().parents[2]
TRANSPORT = ("gave up", "Connect", "HTTP 5", "ReadError", "RemoteProtocolError")


def test_model_server_killed_mid_augment_is_restarted_and_nothing_is_lost(servers, tmp_path: Path,
                                                                          fault_report) -> None:
    n = 60
    corpus = write_corpus(tmp_path / "corpus.jsonl", n, chars=700)
    out = tmp_path / "cands.jsonl"
    cmd = [sys.executable, "-m", "humpback", "augment", "--corpus", str(corpus), "--out", str(out),
           "--endpoint", servers.backward_url, "--model", servers.backward_model, "--max-tokens", "48",
           "--concurrency", "4", "--no-progress", "--fsync", "never"]
    env = {**os.environ, "HUMPBACK_API_KEY": servers.api_key or ""}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 600
    while not out.exists() or out.read_bytes().count(b"\n") < 3:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no candidate in 10 minutes"
        time.sleep(0.2)
    old = process_info(servers.state_dir)["backward"]["pid"]
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=1200)
    took = time.monotonic() - start
    assert proc.returncode in (0, 3), stderr[-3000:]
    wait_healthy_url(servers.backward_url)
    assert process_info(servers.state_dir)["backward"]["pid"] != old  # restarted by the supervisor

    summary = json.loads((tmp_path / "cands.summary.json").read_text())
    failed_file = tmp_path / "cands.failed.jsonl"
    failures = [json.loads(line) for line in failed_file.read_text().splitlines()] if failed_file.exists() else []
    transport = [f["reason"] for f in failures if any(t in f["reason"] for t in TRANSPORT)]
    assert not transport, f"requests lost to the restart: {transport[:3]}"
    ids = journal_ids(out)
    _, dup = lost_and_duplicated(ids, n)
    lost = n - len(ids) - len(failures)  # a segment neither written nor listed with its reason is lost
    assert (lost, dup) == (0, 0)
    assert summary["extra"]["retries"] > 0, summary  # the kill was felt, and ridden out
    fault_report(FaultRow(
        "backward vLLM server killed (SIGKILL) mid-augment, client on default retry settings",
        f"the supervisor restarts it; the client retries ({summary['extra']['retries']} retries) and the run "
        f"finishes in {took:.0f} s ({time.monotonic() - killed_at:.0f} s after the kill); "
        f"{len(failures)} segments failed for the model's own reasons (listed with them)",
        n, lost, dup, "both servers /health 200", took))
    assert health(servers.scorer_url)


def wait_healthy_url(url: str) -> None:
    deadline = time.monotonic() + 900
    while not health(url):
        assert time.monotonic() < deadline, f"{url} did not come back"
        time.sleep(1)
