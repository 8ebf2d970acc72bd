"""Deployment: a job's model hot-swapped into a real vLLM server after training and on request
(`POST /v1/fine_tuning/jobs/{id}/deploy`), a broken checkpoint refused; and, without any server, the
deploy route's validation and answers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from humpback.contracts import CreateJobRequest, Deployment, ErrorResponse, auth_headers
from services.hotswap import swap_checkpoint
from services.registry import Registry, record_swap
from tests.trainer.conftest import (
    TRAINER_KEY,
    UNUSED_URL,
    RunningService,
    add_file,
    make_settings,
    start_service,
    wait_for,
)
from trainer.api import create_app
from trainer.serving import TrainerService
from trainer.store import Store, model_name, now

FIXED_TEXT = "The quick brown fox jumps over the lazy dog because it was in a hurry."
AUTH = {"Authorization": f"Bearer {TRAINER_KEY}"}


def prompt_logprobs(server: openai.OpenAI, model: str) -> list[float]:
    """Log-probability of every token of FIXED_TEXT under `model`, as the server computes it."""
    out = server.completions.create(model=model, prompt=FIXED_TEXT, max_tokens=1, echo=True, logprobs=0, temperature=0)
    return [lp for lp in out.choices[0].logprobs.token_logprobs if lp is not None]


def model_client(servers, role: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{servers.url(role)}/v1", api_key=servers.api_key or "none", max_retries=0)


def metric(text: str, line_start: str) -> float:
    """The value of the Prometheus sample whose line starts with `line_start`."""
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


# --- the deploy route, without model servers --------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    """The service without its worker (no lifespan): jobs stay as the test puts them."""
    return create_app(make_settings(tmp_path / "trainer", registry=tmp_path / "registry.json"))


@pytest.fixture
def http(app: FastAPI) -> TestClient:
    return TestClient(app, headers=AUTH)


def queued_job(app: FastAPI, train_file: Path) -> str:
    service: TrainerService = app.state.service
    file_id = add_file(service, train_file)
    return service.create_job(CreateJobRequest(model="backward", training_file=file_id, suffix="t")).id


def succeeded_job(app: FastAPI, train_file: Path, export_dir: Path) -> tuple[str, str]:
    """(job id, fine-tuned model) of a job recorded as the worker records a finished one."""
    service: TrainerService = app.state.service
    job = service.get_job(queued_job(app, train_file))
    name = model_name("backward", "t", job.id)
    service.store.update_job(job.id, export_dir=str(export_dir))
    assert service.store.transition(job.id, ("queued",), "succeeded", fine_tuned_model=name, finished_at=now())
    return job.id, name


def exported(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def error(resp: httpx.Response) -> tuple[int, str, str | None, str | None]:
    body = ErrorResponse.model_validate_json(resp.content).error
    return resp.status_code, body.message, body.param, body.code


def messages(app: FastAPI, job_id: str) -> list[str]:
    return [e.message for e in app.state.service.store.list_events(job_id, limit=100)[0]]


def test_deploy_route_validates_the_request(app: FastAPI, http: TestClient, train_file: Path) -> None:
    job_id, _ = succeeded_job(app, train_file, exported(train_file.parent / "final"))
    route = f"/v1/fine_tuning/jobs/{job_id}/deploy"

    assert TestClient(app).post(route, json={"role": "backward"}).status_code == 401
    status, message, param, _ = error(http.post(route, json={"role": "/tmp/x"}))
    assert (status, param) == (400, "role") and "'backward' or 'scorer'" in message
    status, _, param, _ = error(http.post(route, json={"role": "backward", "path": "/tmp/x"}))
    assert (status, param) == (400, "path")
    status, _, param, _ = error(http.post(route, json={}))
    assert (status, param) == (400, "role")

    unknown = "ftjob-" + "0" * 24
    assert error(http.post(f"/v1/fine_tuning/jobs/{unknown}/deploy", json={"role": "scorer"})) == (
        404, f"No such fine-tuning job: {unknown}", "fine_tuning_job_id", "job_not_found")

    queued = queued_job(app, train_file)
    assert error(http.post(f"/v1/fine_tuning/jobs/{queued}/deploy", json={"role": "scorer"})) == (
        400, f"Job {queued} is queued: only a succeeded job's model can be deployed", "fine_tuning_job_id", None)
    assert not any(m.startswith("Deploying") for m in messages(app, job_id) + messages(app, queued))


def test_deploy_of_a_job_whose_model_is_gone_says_so(app: FastAPI, http: TestClient, train_file: Path,
                                                     tmp_path: Path) -> None:
    job_id, _ = succeeded_job(app, train_file, tmp_path / "trainer" / "checkpoints" / "gone" / "final")
    status, message, param, code = error(http.post(f"/v1/fine_tuning/jobs/{job_id}/deploy", json={"role": "backward"}))
    assert (status, param, code) == (409, "fine_tuning_job_id", "model_not_found")
    assert message == (f"The model of job {job_id} is no longer in the trainer's data dir, so it cannot be deployed; "
                       "train it again")
    assert not (tmp_path / "registry.json").exists()  # nothing was swapped or recorded


def test_deploy_is_a_no_op_when_the_role_serves_the_job(app: FastAPI, http: TestClient, train_file: Path,
                                                        tmp_path: Path) -> None:
    final = exported(tmp_path / "final")
    job_id, name = succeeded_job(app, train_file, final)
    registry = tmp_path / "registry.json"
    before = record_swap(registry, "backward", job_id, str(final), "reload", name)

    # The backward URL has no server: any swap attempt would fail with 502.
    resp = http.post(f"/v1/fine_tuning/jobs/{job_id}/deploy", json={"role": "backward"})
    assert resp.status_code == 200, resp.text
    assert Deployment.model_validate_json(resp.content) == Deployment(
        fine_tuning_job_id=job_id, fine_tuned_model=name, role="backward", swapped=False, stall_s=None)
    assert Registry.load(registry).servers["backward"] == before
    assert not any(m.startswith("Deploying") for m in messages(app, job_id))


def test_failed_deploy_answers_bad_gateway_and_keeps_the_job(app: FastAPI, http: TestClient, train_file: Path,
                                                             tmp_path: Path) -> None:
    job_id, name = succeeded_job(app, train_file, exported(tmp_path / "final"))
    status, message, param, code = error(http.post(f"/v1/fine_tuning/jobs/{job_id}/deploy", json={"role": "scorer"}))
    assert (status, param, code) == (502, None, "deploy_failed")
    assert message.startswith(f"The model of job {job_id} was not deployed to scorer: no server of role 'scorer' "
                              f"answers: {UNUSED_URL} refuses")
    assert app.state.service.get_job(job_id).status == "succeeded"
    assert messages(app, job_id)[0] == f"Deploying {name} to the scorer server at {UNUSED_URL}"
    metrics = app.state.metrics.render().decode()
    assert metric(metrics, 'humpback_trainer_swaps_total{outcome="failed",role="scorer"}') == 1.0
    assert not (tmp_path / "registry.json").exists()


# --- with the real servers ------------------------------------------------------------------------


@pytest.fixture
def deploy_service(tmp_path: Path, servers, model_dir: Path) -> Iterator[RunningService]:
    settings = make_settings(
        tmp_path / "trainer", backward_url=servers.backward_url, scorer_url=servers.scorer_url,
        api_key=servers.api_key, registry=servers.registry,
        backward_model=model_dir, scorer_model=model_dir,
    )
    running = start_service(settings)
    yield running
    running.stop()


@pytest.fixture
def restore_base(servers, model_dir: Path) -> Iterator[None]:
    """Put the base weights back afterwards: the servers are shared by the whole session."""
    yield
    for role in ("backward", "scorer"):
        swap_checkpoint(servers.url(role), model_dir, role=role, version="base", api_key=servers.api_key, registry=servers.registry)


@pytest.mark.server
def test_job_is_hot_swapped_and_requestable(deploy_service: RunningService, train_file: Path, servers,
                                            model_dir: Path, restore_base: None) -> None:
    server = model_client(servers, "backward")
    # The servers are shared by the session: earlier tests may have left a fine-tuned model on backward.
    swap_checkpoint(servers.backward_url, model_dir, role="backward", version="base", api_key=servers.api_key,
                    registry=servers.registry)
    before = prompt_logprobs(server, servers.backward_model)
    client = deploy_service.client
    with train_file.open("rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="backward", training_file=file_id, suffix="swap",
        metadata={"deploy_to": "backward", "preset": "cpu-test", "max_steps": "2"},
    )
    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, timeout=600)
    assert done.status == "succeeded", done.error

    answer = server.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "What is 3 plus 3?"}], max_tokens=12, temperature=0
    )
    assert answer.choices[0].message.content
    after = prompt_logprobs(server, done.fine_tuned_model)
    assert len(after) == len(before)
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-2

    deployed = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.message.startswith("Deployed to backward")]
    assert len(deployed) == 1
    swap = deployed[0].data
    assert (swap["role"], swap["version"], swap["served_model"], swap["method"]) == (
        "backward", job.id, done.fine_tuned_model, "reload")
    assert swap["checkpoint"] == str(deploy_service.settings.data_dir.absolute() / "checkpoints" / job.id / "final")
    assert swap["stall_s"] > 0  # the server was paused from the reload to the resume
    auth = auth_headers(deploy_service.settings.api_key)  # the trainer's one key: the servers' here
    metrics = httpx.get(f"{deploy_service.url}/metrics", headers=auth).text
    assert metric(metrics, 'humpback_trainer_swap_stall_seconds{role="backward"}') == pytest.approx(swap["stall_s"])
    assert Registry.load(servers.registry).servers["backward"].aliases == [done.fine_tuned_model]

    # On request: nothing to do while the server serves the job; after a restart put the base back
    # (as `serve up` does), the same request swaps the job's model in again.
    route = f"{deploy_service.url}/v1/fine_tuning/jobs/{job.id}/deploy"
    again = Deployment.model_validate_json(httpx.post(route, json={"role": "backward"}, headers=auth, timeout=600).content)
    assert (again.swapped, again.stall_s) == (False, None)
    swap_checkpoint(servers.backward_url, model_dir, role="backward", version="base", api_key=servers.api_key,
                    registry=servers.registry)
    assert prompt_logprobs(server, servers.backward_model) == pytest.approx(before, abs=1e-3)
    redeployed = Deployment.model_validate_json(
        httpx.post(route, json={"role": "backward"}, headers=auth, timeout=600).content)
    assert redeployed.swapped and redeployed.stall_s > 0
    assert redeployed.fine_tuned_model == done.fine_tuned_model
    assert Registry.load(servers.registry).servers["backward"].version == job.id
    assert prompt_logprobs(server, done.fine_tuned_model) == pytest.approx(after, abs=1e-3)


@pytest.mark.server
def test_broken_checkpoint_leaves_old_weights_serving(tmp_path: Path, train_file: Path, servers, model_dir: Path, restore_base: None) -> None:
    server = model_client(servers, "scorer")
    before = prompt_logprobs(server, servers.scorer_model)
    settings = make_settings(
        tmp_path / "trainer", scorer_url=servers.scorer_url, api_key=servers.api_key,
        registry=servers.registry, scorer_model=model_dir,
    )
    # A job whose training "finished" with a truncated weights file: the worker goes straight to the swap.
    store = Store(settings.data_dir.absolute() / "trainer.sqlite3")
    service = TrainerService(settings, store)
    file_id = add_file(service, train_file)
    job = service.create_job(CreateJobRequest(model="scorer", training_file=file_id, metadata={"deploy_to": "scorer"}))
    store.close()
    final = settings.data_dir / "checkpoints" / job.id / "final"
    final.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_dir / name, final / name)
    (final / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[: 1 << 20])

    running = start_service(settings)
    try:
        failed = wait_for(running.client, job.id, {"succeeded", "failed"}, timeout=120)
    finally:
        running.stop()
    assert failed.status == "failed"
    assert failed.error.code == "deploy_failed"
    assert "truncated" in failed.error.message and "; now every scorer server serves" in failed.error.message
    assert failed.fine_tuned_model is None
    assert prompt_logprobs(server, servers.scorer_model) == pytest.approx(before, abs=1e-3)
