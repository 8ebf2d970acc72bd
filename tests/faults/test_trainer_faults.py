"""Faults around the trainer service, run as the real `humpback trainer serve` process with real TRL
steps on the real model: the service killed (SIGKILL) in the middle of a job, and the training
process killed under it (what the OOM killer does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from humpback.contracts import API_KEY_ENV
from tests.conftest import MODEL_DIR
from tests.faults.report import FaultRow
from tests.trainer.conftest import TRAINER_KEY, UNUSED_URL, free_port, upload, wait_for, wait_for_event

pytestmark = pytest.mark.fault
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TrainerProcess:
    """`humpback trainer serve` in its own process, on a free loopback port, keyed through the environment."""

    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TrainerProcess:
        log = (self.data_dir.parent / "trainer.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "humpback", "trainer", "serve", "--data-dir", str(self.data_dir),
             "--port", str(self.port), "--backward-url", UNUSED_URL, "--scorer-url", UNUSED_URL,
             "--backward-model", str(MODEL_DIR), "--scorer-model", str(MODEL_DIR), "--default-preset", "cpu-test"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, API_KEY_ENV: TRAINER_KEY})
        deadline = time.monotonic() + 120
        while not self.healthy():
            assert self.proc.poll() is None, f"the trainer exited: {self.log()[-3000:]}"
            assert time.monotonic() < deadline, "the trainer did not answer /health in 120 s"
            time.sleep(0.3)
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return (self.data_dir.parent / "trainer.log").read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TRAINER_KEY, max_retries=0)


@pytest.fixture
def trainer_process(tmp_path: Path) -> Iterator[TrainerProcess]:
    trainer = TrainerProcess(tmp_path / "trainer", free_port())
    yield trainer
    trainer.stop()


def training_alive(pid: int) -> bool:
    try:
        return b"trainer.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_trainer_killed_mid_job_resumes_the_job_after_restart(trainer_process: TrainerProcess, train_file: Path,
                                                              fault_report) -> None:
    start = time.monotonic()
    client = trainer_process.start().client
    file_id = upload(client, train_file)
    job = client.fine_tuning.jobs.create(model="backward", training_file=file_id,
                                         metadata={"preset": "cpu-test", "max_steps": "6"})
    wait_for_event(client, job.id, "Checkpoint created at step 2")
    trainer_process.kill()  # no shutdown handler runs: the job stays `running` on disk
    time.sleep(1)

    client = trainer_process.start().client
    jobs = client.fine_tuning.jobs.list().data
    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert [j.id for j in jobs] == [job.id]
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any("The service restarted during the job; resuming from checkpoint-" in m for m in messages)
    assert "Step 6/6" in " ".join(messages)
    # The first service's training process (an orphan after the kill) was ended by the restart, so no
    # two trainings wrote the job's folder at once.
    stale = [p for p in Path("/proc").iterdir() if p.name.isdigit() and training_alive(int(p.name))]
    assert not stale, f"training processes left behind: {stale}"
    assert trainer_process.healthy()
    fault_report(FaultRow(
        "trainer service killed (SIGKILL) at a job's step 2 of 6, then started again",
        "the job is listed again, logs `The service restarted during the job; resuming from checkpoint-2`, "
        "and succeeds; the orphaned training process is ended", 1, 0, len(jobs) - 1, "trainer /health 200",
        time.monotonic() - start))


def test_training_process_killed_fails_its_job_with_a_reason_and_the_queue_goes_on(
        trainer_process: TrainerProcess, train_file: Path, fault_report) -> None:
    start = time.monotonic()
    client = trainer_process.start().client
    file_id = upload(client, train_file)
    doomed = client.fine_tuning.jobs.create(model="backward", training_file=file_id,
                                            metadata={"preset": "cpu-test", "max_steps": "200"})
    after = client.fine_tuning.jobs.create(model="backward", training_file=file_id,
                                           metadata={"preset": "cpu-test", "max_steps": "2"})
    wait_for_event(client, doomed.id, "Step 1/200")
    training = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and training_alive(int(p.name))]
    assert len(training) == 1, training
    os.kill(training[0], signal.SIGKILL)  # what the OOM killer does

    failed = wait_for(client, doomed.id, {"succeeded", "failed", "cancelled"})
    assert failed.status == "failed"
    assert failed.error.code == "training_failed" and "killed by SIGKILL" in failed.error.message
    nxt = wait_for(client, after.id, {"succeeded", "failed", "cancelled"})
    assert nxt.status == "succeeded", nxt.error
    assert trainer_process.healthy()
    reason = failed.error.message.split(";")[0].replace("`", "")  # backticks would break the table's cell
    fault_report(FaultRow(
        "training process killed (SIGKILL, as the OOM killer does) at step 1; a second job queued behind it",
        f"the job fails with `{failed.error.code}`: \"{reason}\"; the queued job then "
        "succeeds", 2, 0, 0, "trainer /health 200", time.monotonic() - start))
