"""The trainer service driven by the official `openai` SDK, training the real small model on the CPU.

No model servers here: these jobs do not deploy (see test_deploy.py for the hot-swap).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.trainer.conftest import (
    TRAINER_KEY,
    RunningService,
    make_settings,
    start_service,
    upload,
    wait_for,
    wait_for_event,
)

FAST = {"preset": "cpu-test", "max_steps": "2"}


def test_sdk_job_runs_to_succeeded(trainer_service: RunningService, train_file: Path) -> None:
    client = trainer_service.client
    file_id = upload(client, train_file)
    assert client.files.retrieve(file_id).filename == "train.jsonl"
    job = client.fine_tuning.jobs.create(
        model="backward", training_file=file_id, validation_file=file_id, suffix="demo", seed=7, metadata=FAST
    )
    assert job.status == "queued"

    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:backward:humpback:demo:{job.id[6:14]}"
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.hyperparameters.batch_size == 2 and done.seed == 7

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = [e for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert [e.data["step"] for e in reversed(steps)] == [1, 2]
    assert all(e.data["train_loss"] > 0 for e in steps)
    assert "The job has successfully completed" in events[0].message
    assert any(e.message.startswith("Step 2: validation loss=") for e in events)
    finished = next(e for e in events if e.message.startswith("Training finished in"))
    assert finished.data["trained_tokens"] == done.trained_tokens

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [2, 1]
    assert checkpoints[0].metrics.train_loss is not None

    final = trainer_service.settings.data_dir / "checkpoints" / job.id / "final"
    assert (final / "model.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"

    # Prometheus text with the finished job and the observed steps.
    metrics = httpx.get(f"{trainer_service.url}/metrics", headers={"Authorization": f"Bearer {TRAINER_KEY}"}).text
    assert 'humpback_trainer_jobs{status="succeeded"} 1.0' in metrics
    assert "humpback_trainer_step_seconds_count 2.0" in metrics


def test_bad_training_file_is_refused_with_line_number(trainer_service: RunningService, tmp_path: Path, train_file: Path) -> None:
    lines = train_file.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
    lines[4] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(openai.BadRequestError) as err:
        upload(trainer_service.client, bad)
    message = err.value.body["message"]
    assert "line 3: messages: message 1 has role 'user', expected 'assistant'" in message
    assert "line 5:" in message and "JSON" in message
    assert trainer_service.client.files.list().data == []


def test_requests_cannot_name_paths_or_skip_auth(trainer_service: RunningService, train_file: Path) -> None:
    client = trainer_service.client
    file_id = upload(client, train_file)
    with pytest.raises(openai.BadRequestError, match="model '/etc' is unknown"):
        client.fine_tuning.jobs.create(model="/etc", training_file=file_id)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.fine_tuning.jobs.create(model="backward", training_file="../../trainer.sqlite3")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-..%2F..%2Ftrainer.sqlite3")
    with pytest.raises(openai.BadRequestError, match="deploy_to"):
        client.fine_tuning.jobs.create(model="backward", training_file=file_id, metadata={"deploy_to": "/tmp/x"})
    anonymous = openai.OpenAI(base_url=f"{trainer_service.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.fine_tuning.jobs.list()
    assert httpx.get(f"{trainer_service.url}/metrics").status_code == 401


def test_cancel_stops_a_running_job(trainer_service: RunningService, train_file: Path) -> None:
    client = trainer_service.client
    file_id = upload(client, train_file)
    job = client.fine_tuning.jobs.create(
        model="scorer", training_file=file_id, metadata={"preset": "cpu-test", "max_steps": "200"}
    )
    queued = client.fine_tuning.jobs.create(model="scorer", training_file=file_id, metadata=FAST)
    wait_for_event(client, job.id, "Step 1/200")
    pid = trainer_service.server.config.app.state.service.store.job_row(job.id)["pid"]

    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    assert not Path(f"/proc/{pid}").exists() or b"trainer.train" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "cancelled"


def test_restarted_service_lists_its_jobs_and_resumes(tmp_path: Path, train_file: Path) -> None:
    data_dir = tmp_path / "trainer"
    first = start_service(make_settings(data_dir))
    file_id = upload(first.client, train_file)
    job = first.client.fine_tuning.jobs.create(
        model="backward", training_file=file_id, metadata={"preset": "cpu-test", "max_steps": "4"}
    )
    wait_for_event(first.client, job.id, "Checkpoint created at step 2")
    first.stop()  # kills the training process mid-run; the job stays `running` on disk

    second = start_service(make_settings(data_dir))
    try:
        assert [j.id for j in second.client.fine_tuning.jobs.list()] == [job.id]
        done = wait_for(second.client, job.id, {"succeeded", "failed"})
        assert done.status == "succeeded", done.error
        messages = [e.message for e in second.client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any("The service restarted during the job; resuming from checkpoint-" in m for m in messages)
        assert any(m.startswith("Resuming from checkpoint-") for m in messages)
        assert "Step 4/4" in " ".join(messages)
        assert second.client.files.retrieve(file_id).id == file_id
    finally:
        second.stop()


def test_interrupted_job_out_of_attempts_is_failed_with_reason(tmp_path: Path, train_file: Path) -> None:
    data_dir = tmp_path / "trainer"
    first = start_service(make_settings(data_dir, max_attempts=1))
    file_id = upload(first.client, train_file)
    job = first.client.fine_tuning.jobs.create(
        model="backward", training_file=file_id, metadata={"preset": "cpu-test", "max_steps": "200"}
    )
    wait_for_event(first.client, job.id, "Step 1/200")
    first.stop()
    second = start_service(make_settings(data_dir, max_attempts=1))
    try:
        failed = second.client.fine_tuning.jobs.retrieve(job.id)
        assert failed.status == "failed"
        assert failed.error.code == "interrupted" and "1 times" in failed.error.message
    finally:
        second.stop()


def test_cli_serves_with_bearer_token(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "humpback", "trainer", "serve", "--port", str(port), "--data-dir", str(tmp_path / "d"),
         "--api-key", "cli-key", "--model", "tiny=models/smollm2-135m-instruct"],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the CLI service did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0)
        assert client.fine_tuning.jobs.list().data == []
        with pytest.raises(openai.BadRequestError, match="known base models: backward, scorer, tiny"):
            client.fine_tuning.jobs.create(model="nope", training_file="file-0")
        assert httpx.get(f"{url}/v1/files").status_code == 401
        assert (tmp_path / "d" / "trainer.sqlite3").is_file()
    finally:
        proc.terminate()
        proc.wait(30)


def test_job_runs_through_accelerate_launch(tmp_path: Path, train_file: Path) -> None:
    """Multi-GPU training goes through `accelerate launch`; the same launcher with one CPU process."""
    config = Path(__file__).resolve().parents[2] / "trainer" / "accelerate" / "cpu_single.yaml"
    service = start_service(make_settings(tmp_path / "trainer", accelerate_config=config))
    try:
        file_id = upload(service.client, train_file)
        job = service.client.fine_tuning.jobs.create(model="scorer", training_file=file_id, metadata=FAST)
        done = wait_for(service.client, job.id, {"succeeded", "failed"})
        assert done.status == "succeeded", done.error
        assert (tmp_path / "trainer" / "checkpoints" / job.id / "final" / "model.safetensors").is_file()
        messages = " ".join(e.message for e in service.client.fine_tuning.jobs.list_events(job.id, limit=100))
        assert "Step 2/2" in messages
    finally:
        service.stop()
