"""A job's model hot-swapped into a real vLLM server, and a broken checkpoint refused by it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.hotswap import swap_checkpoint
from tests.trainer.conftest import RunningService, make_settings, start_service, wait_for
from humpback.contracts import CreateJobRequest
from trainer.serving import TrainerService
from trainer.store import Store

pytestmark = pytest.mark.server

FIXED_TEXT = "The quick brown fox jumps over the lazy dog because it was in a hurry."


def prompt_logprobs(server: openai.OpenAI, model: str) -> list[float]:
    """Log-probability of every token of FIXED_TEXT under `model`, as the server computes it."""
    out = server.completions.create(model=model, prompt=FIXED_TEXT, max_tokens=1, echo=True, logprobs=0, temperature=0)
    return [lp for lp in out.choices[0].logprobs.token_logprobs if lp is not None]


def model_client(servers, role: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{servers.url(role)}/v1", api_key=servers.api_key or "none", max_retries=0)


@pytest.fixture
def deploy_service(tmp_path: Path, servers, model_dir: Path) -> Iterator[RunningService]:
    settings = make_settings(
        tmp_path / "trainer", backward_url=servers.backward_url, scorer_url=servers.scorer_url,
        server_api_key=servers.api_key, registry=servers.registry,
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


def test_job_is_hot_swapped_and_requestable(deploy_service: RunningService, train_file: Path, servers, restore_base: None) -> None:
    server = model_client(servers, "backward")
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
    assert deployed and deployed[0].data["stall_s"] >= 0


def test_broken_checkpoint_leaves_old_weights_serving(tmp_path: Path, train_file: Path, servers, model_dir: Path, restore_base: None) -> None:
    server = model_client(servers, "scorer")
    before = prompt_logprobs(server, servers.scorer_model)
    settings = make_settings(
        tmp_path / "trainer", scorer_url=servers.scorer_url, server_api_key=servers.api_key,
        registry=servers.registry, scorer_model=model_dir,
    )
    # A job whose training "finished" with a truncated weights file: the worker goes straight to the swap.
    store = Store(settings.data_dir.absolute() / "trainer.sqlite3")
    service = TrainerService(settings, store)
    file_id = service.upload("train.jsonl", "fine-tune", train_file.read_bytes()).id
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
    assert "keeps its previous weights" in failed.error.message and "truncated" in failed.error.message
    assert failed.fine_tuned_model is None
    assert prompt_logprobs(server, servers.scorer_model) == pytest.approx(before, abs=1e-3)
