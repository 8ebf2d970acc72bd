"""Trainer-only fixtures: the service in-process (uvicorn on a free loopback port) and an `openai` client.

`start_service` can be called again on the same data dir to simulate a restart.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import uvicorn

from humpback.contracts import SeedPair, seed_forward_examples, write_jsonl
from tests.conftest import MODEL_DIR
from trainer.api import create_app
from trainer.config import ServiceSettings
from trainer.serving import TrainerService

TRAINER_KEY = "trainer-test-key"
# Nothing listens here: jobs that do not deploy never call it.
UNUSED_URL = "http://127.0.0.1:9"


@dataclass
class RunningService:
    url: str
    client: openai.OpenAI
    settings: ServiceSettings
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(settings: ServiceSettings) -> RunningService:
    settings = settings.model_copy(update={"port": free_port()})
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the trainer service did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{settings.port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=settings.api_key or "none", max_retries=0)
    return RunningService(url, client, settings, server, thread)


def make_settings(data_dir: Path, **overrides: object) -> ServiceSettings:
    base = dict(
        data_dir=data_dir, api_key=TRAINER_KEY, backward_url=UNUSED_URL, scorer_url=UNUSED_URL,
        backward_model=MODEL_DIR, scorer_model=MODEL_DIR, default_preset="cpu-test",
    )
    return ServiceSettings(**{**base, **overrides})


def upload(client: openai.OpenAI, path: Path) -> str:
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def add_file(service: TrainerService, path: Path) -> str:
    """Add `path` as a file through the service's own upload steps (staged, then validated), without HTTP."""
    with service.staging() as staged:
        shutil.copyfile(path, staged)
        return service.upload(path.name, "fine-tune", staged).id


@pytest.fixture
def trainer_service(tmp_path: Path) -> Iterator[RunningService]:
    running = start_service(make_settings(tmp_path / "trainer"))
    yield running
    running.stop()


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    pairs = [SeedPair.make(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", "test", "CC0") for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", seed_forward_examples(pairs))
    return tmp_path / "train.jsonl"


def wait_for(client: openai.OpenAI, job_id: str, statuses: set[str], timeout: float = 300) -> openai.types.fine_tuning.FineTuningJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
        time.sleep(0.5)


def wait_for_event(client: openai.OpenAI, job_id: str, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} logged no {text!r} in {timeout} s")
        time.sleep(0.3)
