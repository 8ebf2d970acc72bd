"""The trainer's entry points under careless or hostile input, over real HTTP: every number bounded,
every error in OpenAI's shape, no stored row stops the queue, uploads streamed with a cap, files a
job needs kept. No job here trains: the ones created stay queued, are cancelled, or fail before
training starts.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from humpback.contracts import ErrorBody, ErrorResponse
from tests.trainer.conftest import (
    TRAINER_KEY,
    RunningService,
    free_port,
    make_settings,
    start_service,
    upload,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {TRAINER_KEY}"}
BOUNDARY = "humpback-test-boundary"


def http(service: RunningService) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers=AUTH, timeout=60)


def error_of(resp: httpx.Response, status: int) -> ErrorBody:
    """The OpenAI-shaped error of a response that must have `status`."""
    assert resp.status_code == status, resp.text
    return ErrorResponse.model_validate_json(resp.content).error


def multipart(chunks: Iterator[bytes], purpose: str = "fine-tune") -> Iterator[bytes]:
    """An upload's multipart body, streamed: `purpose`, then a file made of `chunks`."""
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
           f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode()
    yield from chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def example_line(chars: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Say it."},
                                    {"role": "assistant", "content": "x" * chars}]}).encode() + b"\n"


# (extra body fields, the param the 400 names)
NAN = float("nan")
BAD_JOBS: list[tuple[dict[str, Any], str]] = [
    ({"hyperparameters": {"learning_rate_multiplier": NAN}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": float("inf")}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": -float("inf")}}, "hyperparameters.learning_rate_multiplier"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": NAN}}}},
     "method.supervised.hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e6}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": 10**12}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": "2"}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": 10**9}}, "hyperparameters.batch_size"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"metadata": {"note": "x" * 513}}, "metadata.note"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"max_steps": "1000000000000000"}}, "metadata.max_steps"),
    ({"metadata": {"max_steps": "\u00b2"}}, "metadata.max_steps"),
    ({"metadata": {"max_steps": "0"}}, "metadata.max_steps"),
    ({"model": "x" * 10_000}, "model"),
]


def test_every_number_is_finite_and_bounded(trainer_service: RunningService, train_file: Path) -> None:
    trainer_service.server.config.app.state.worker.stop()  # what is accepted stays queued: nothing trains
    file_id = upload(trainer_service.client, train_file)
    with http(trainer_service) as api:
        for extra, param in BAD_JOBS:
            # json.dumps writes NaN and Infinity as the literals Python's JSON parser accepts.
            body = json.dumps({"model": "backward", "training_file": file_id, **extra})
            err = error_of(api.post("/v1/fine_tuning/jobs", content=body,
                                    headers={"Content-Type": "application/json"}), 400)
            assert err.type == "invalid_request_error" and err.param and err.param.startswith(param), (extra, err)
        listed = api.get("/v1/fine_tuning/jobs")
        assert listed.status_code == 200 and listed.json()["data"] == []
        # The bounds themselves are accepted.
        job = trainer_service.client.fine_tuning.jobs.create(
            model="backward", training_file=file_id, seed=2**31 - 1, metadata={"note": "x" * 512, "max_steps": "3"},
            hyperparameters={"batch_size": 256, "learning_rate_multiplier": 10, "n_epochs": 50},
        )
        assert trainer_service.client.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def _store_rows(db: Path, *rows: dict[str, Any]) -> None:
    with sqlite3.connect(db) as conn:
        for row in rows:
            conn.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))


def _row(job_id: str, file_id: str, status: str = "queued", **columns: Any) -> dict[str, Any]:
    auto = '{"batch_size":"auto","learning_rate_multiplier":"auto","n_epochs":"auto"}'
    return {"id": job_id, "created_at": 1, "status": status, "model": "backward", "training_file": file_id,
            "hyperparameters": auto, "method": '{"type":"supervised"}', "seed": 1, **columns}


# What the service stored for `"learning_rate_multiplier": NaN` before it refused it: pydantic writes NaN as null.
NAN_AS_STORED = '{"batch_size":"auto","learning_rate_multiplier":null,"n_epochs":"auto"}'


def test_an_unreadable_stored_job_fails_with_its_reason_and_the_queue_goes_on(tmp_path: Path, train_file: Path) -> None:
    data_dir = tmp_path / "trainer"
    first = start_service(make_settings(data_dir))
    file_id = upload(first.client, train_file)
    first.stop()
    queued, running, later = (f"ftjob-{n:024x}" for n in (1, 2, 3))
    db = data_dir / "trainer.sqlite3"
    # One queued, one the previous service left running: the restart reads both.
    _store_rows(db, _row(queued, file_id, hyperparameters=NAN_AS_STORED),
                _row(running, file_id, "running", metadata="{not json", attempts=1))

    service = start_service(make_settings(data_dir))
    try:
        client = service.client
        for job_id, column in ((queued, "hyperparameters.learning_rate_multiplier"), (running, "metadata")):
            failed = wait_for(client, job_id, {"failed"}, timeout=30)
            assert failed.error.code == "invalid_job"
            assert f"the stored job {job_id} cannot be read: {column}" in failed.error.message
        assert {j.id for j in client.fine_tuning.jobs.list()} == {queued, running}
        with pytest.raises(openai.BadRequestError, match="already failed"):
            client.fine_tuning.jobs.cancel(queued)
        # The queue still runs: a bad row stored now is failed too.
        _store_rows(db, _row(later, file_id, status="queued", seed="not a number"))
        service.server.config.app.state.worker.notify()
        assert wait_for(client, later, {"failed"}, timeout=30).error.code == "invalid_job"
        assert httpx.get(f"{service.url}/health").status_code == 200
    finally:
        service.stop()


def test_health_is_503_when_the_queue_does_not_run(trainer_service: RunningService) -> None:
    assert httpx.get(f"{trainer_service.url}/health").json() == {"status": "ok"}
    trainer_service.server.config.app.state.worker.stop()
    err = error_of(httpx.get(f"{trainer_service.url}/health"), 503)
    assert err.type == "server_error" and err.code == "worker_stopped"


def test_every_error_has_openai_shape(trainer_service: RunningService) -> None:
    with http(trainer_service) as api:
        assert error_of(httpx.get(f"{trainer_service.url}/v1/files"), 401).type == "authentication_error"
        assert error_of(api.get("/v1/nowhere"), 404).message == "Invalid URL (GET /v1/nowhere)"
        assert error_of(api.get("/v1/files/file-000000000000000000000000"), 404).code == "file_not_found"
        not_allowed = api.delete("/v1/fine_tuning/jobs")
        assert "Method not allowed (DELETE /v1/fine_tuning/jobs)" in error_of(not_allowed, 405).message
        assert "POST" in not_allowed.headers["allow"]
        assert error_of(api.post("/v1/fine_tuning/jobs", content=b"{not json",
                                 headers={"Content-Type": "application/json"}), 400).type == "invalid_request_error"
        assert error_of(api.get("/v1/fine_tuning/jobs", params={"limit": "many"}), 400).param == "limit"
        huge = json.dumps({"model": "backward", "training_file": "file-x", "suffix": "s" * 2_000_000})
        assert "exceeds" in error_of(api.post("/v1/fine_tuning/jobs", content=huge,
                                              headers={"Content-Type": "application/json"}), 413).message

        # A chunked body declares no length: it is counted as it arrives.
        def chunked() -> Iterator[bytes]:
            yield b'{"model": "backward", "training_file": "file-x", "suffix": "'
            for _ in range(40):
                yield b"s" * 65_536
            yield b'"}'

        assert error_of(api.post("/v1/fine_tuning/jobs", content=chunked(),
                                 headers={"Content-Type": "application/json"}), 413).type == "invalid_request_error"

        def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        # An unexpected exception: a 500 in the same shape, never a plain-text body.
        trainer_service.server.config.app.state.service.store.list_files = broken
        err = error_of(api.get("/v1/files"), 500)
        assert (err.type, err.code) == ("server_error", "internal_error") and "RuntimeError" in err.message


def test_files_paginate_as_openai(trainer_service: RunningService, train_file: Path) -> None:
    client = trainer_service.client
    ids = [upload(client, train_file) for _ in range(3)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[:0:-1] and page.has_more
    assert [f.id for f in client.files.list(limit=2, after=ids[1])] == [ids[0]]
    assert [f.id for f in client.files.list(order="asc")] == ids
    assert [f.id for f in client.files.list(limit=1, order="asc", after=ids[0]).data] == [ids[1]]
    # The SDK pages through with `after`.
    assert [f.id for f in client.files.list(limit=1)] == ids[::-1]
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.files.list(limit=0)
    assert client.files.content(ids[0]).content == train_file.read_bytes()  # streamed from disk


def test_a_file_a_pending_job_needs_cannot_be_deleted(trainer_service: RunningService, train_file: Path) -> None:
    # No worker: the job stays queued.
    trainer_service.server.config.app.state.worker.stop()
    client = trainer_service.client
    file_id = upload(client, train_file)
    validation_id = upload(client, train_file)
    job = client.fine_tuning.jobs.create(model="backward", training_file=file_id, validation_file=validation_id)
    for needed in (file_id, validation_id):
        with pytest.raises(openai.ConflictError) as err:
            client.files.delete(needed)
        assert err.value.body["code"] == "file_in_use" and job.id in err.value.body["message"]
        assert client.files.retrieve(needed).id == needed
    client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
    assert not (trainer_service.settings.data_dir / "files" / f"{file_id}.jsonl").exists()


def test_an_upload_over_the_cap_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    service = start_service(make_settings(tmp_path / "trainer", max_upload_bytes=10_000))
    try:
        files_dir = service.settings.data_dir / "files"
        with http(service) as api:
            # Streamed (no Content-Length): refused while it arrives.
            over = api.post("/v1/files", content=multipart(iter([example_line(4_000)] * 4)), headers=MULTIPART)
            err = error_of(over, 413)
            assert (err.param, err.code) == ("file", "file_too_large") and "10000 bytes" in err.message
            assert list(files_dir.iterdir()) == []
            under = api.post("/v1/files", content=multipart(iter([example_line(4_000)] * 2)), headers=MULTIPART)
            assert under.status_code == 200, under.text
            assert service.client.files.retrieve(under.json()["id"]).bytes == 2 * len(example_line(4_000))
            assert error_of(api.post("/v1/files", content=multipart(iter([example_line(10)]), purpose="batch"),
                                     headers=MULTIPART), 400).param == "purpose"
            assert error_of(api.post("/v1/files", content=b"{}", headers={"Content-Type": "application/json"}),
                            400).param == "file"
        with pytest.raises(openai.APIStatusError) as refused:
            service.client.files.create(file=("big.jsonl", example_line(20_000)), purpose="fine-tune")
        assert refused.value.status_code == 413
        assert [p.name for p in files_dir.iterdir()] == [f"{under.json()['id']}.jsonl"]
    finally:
        service.stop()


def test_uploads_at_once_are_bounded(tmp_path: Path, train_file: Path) -> None:
    service = start_service(make_settings(tmp_path / "trainer", max_concurrent_uploads=1))
    uploads = service.server.config.app.state.uploads
    release = threading.Event()
    result: dict[str, httpx.Response] = {}

    def slow_body() -> Iterator[bytes]:
        yield example_line(10)
        release.wait(30)
        yield example_line(10)

    def slow_upload() -> None:
        with http(service) as api:
            result["slow"] = api.post("/v1/files", content=multipart(slow_body()), headers=MULTIPART)

    thread = threading.Thread(target=slow_upload)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uploads.locked():
            assert time.monotonic() < deadline, "the slow upload never started"
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as err:
            upload(service.client, train_file)
        assert err.value.body["code"] == "too_many_uploads"
    finally:
        release.set()
        thread.join(30)
        try:
            assert result["slow"].status_code == 200, result["slow"].text
            assert upload(service.client, train_file).startswith("file-")
        finally:
            service.stop()


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_an_upload_streams_to_disk_with_flat_memory(tmp_path: Path) -> None:
    """The service's peak RSS grows far less than the upload (which it once held whole, several times)."""
    settings = make_settings(tmp_path / "trainer").model_copy(update={"port": free_port()})
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(settings.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "trainer.api", str(settings_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        _wait_healthy(url, proc)
        line = example_line(65_000)
        count = 1_000  # 65 MB
        before = _peak_rss_kib(proc.pid)
        with httpx.Client(base_url=url, headers=AUTH, timeout=300) as api:
            done = api.post("/v1/files", content=multipart(iter([line] * count)), headers=MULTIPART)
        assert done.status_code == 200, done.text
        assert done.json()["bytes"] == len(line) * count
        growth_mib = (_peak_rss_kib(proc.pid) - before) / 1024
        assert growth_mib < len(line) * count / 2**20 / 8, f"peak RSS grew {growth_mib:.0f} MiB"
    finally:
        proc.terminate()
        proc.wait(30)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the service did not start"
        time.sleep(0.1)
