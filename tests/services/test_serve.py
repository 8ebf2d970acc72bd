"""The real stack: two vLLM CPU servers on the real model, started by `humpback serve up`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from datetime import datetime

import httpx
import pytest

from humpback.contracts import CheckpointError
from services.hotswap import swap_checkpoint
from services.registry import Registry
from tests.conftest import humpback
from tests.services.helpers import copy_small_files, edit_config, linked_checkpoint, perturbed_checkpoint
from tests.services.test_checkpoint import REFUSED, trainer_export

pytestmark = pytest.mark.server

FIXED_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


def prompt_logprobs(servers, role: str, model: str | None = None) -> list[float]:
    resp = httpx.post(
        f"{servers.url(role)}/v1/completions",
        headers=servers.headers,
        json={"model": model or role, "prompt": FIXED_TEXT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0},
        timeout=120,
    )
    resp.raise_for_status()
    return [next(iter(tok.values()))["logprob"] for tok in resp.json()["choices"][0]["prompt_logprobs"][1:]]


def status(servers) -> dict[str, dict]:
    out = humpback("serve", "status", "--state-dir", str(servers.state_dir), "--json", check=False)
    return {row["role"]: row for row in json.loads(out.stdout)}


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"{url} not healthy after {timeout}s")


@pytest.mark.parametrize("role", ["backward", "scorer"])
def test_chat_and_text_completions(servers, role):
    url, headers = servers.url(role), servers.headers
    chat = httpx.post(
        f"{url}/v1/chat/completions", headers=headers, timeout=120,
        json={"model": role, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"].strip()
    text = httpx.post(
        f"{url}/v1/completions", headers=headers, timeout=120,
        json={"model": role, "prompt": "Once upon a time", "max_tokens": 8},
    )
    assert text.status_code == 200, text.text
    assert text.json()["choices"][0]["text"]


def test_api_key_enforced(servers):
    if not servers.api_key:
        pytest.skip("the reused stack runs without an API key")
    body = {"model": "scorer", "prompt": "hi", "max_tokens": 1}
    assert httpx.post(f"{servers.scorer_url}/v1/completions", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.post(f"{servers.scorer_url}/v1/completions", json=body, headers=wrong, timeout=60).status_code == 401
    assert httpx.get(f"{servers.scorer_url}/v1/models", timeout=60).status_code == 401
    assert httpx.post(f"{servers.scorer_url}/v1/completions", json=body, headers=servers.headers, timeout=60).status_code == 200
    # Health stays open for probes.
    assert httpx.get(f"{servers.scorer_url}/health", timeout=10).status_code == 200


def test_status_reports_both_servers(servers):
    rows = status(servers)
    assert set(rows) == {"backward", "scorer"}
    for role, row in rows.items():
        assert row["healthy"] is True
        assert row["state"] == "RUNNING"
        assert isinstance(row["pid"], int) and row["pid"] > 0
        assert row["url"] == servers.url(role)
        assert os.path.isfile(row["log"])


def _first_logged(log: str, text: str) -> datetime:
    """When vLLM first logged a line holding `text` (its lines read `(APIServer pid=1) INFO 12-07 00:55:19 ...`)."""
    for line in open(log, errors="replace"):
        if text in line and (stamp := re.search(r"\b(\d\d-\d\d \d\d:\d\d:\d\d)\b", line)):
            return datetime.strptime(stamp.group(1), "%m-%d %H:%M:%S")
    raise AssertionError(f"{log} has no line with {text!r}")


def test_the_scorer_starts_once_the_backward_server_has_compiled(servers):
    """Both serve one model on CPU: compiling at once, they would fight for the cores; the scorer starts after
    and loads the backward server's compiled graph from the cache."""
    logs = {role: row["log"] for role, row in status(servers).items()}
    backward_up = _first_logged(logs["backward"], "Starting vLLM server on")
    scorer_begins = _first_logged(logs["scorer"], "non-default args")
    assert scorer_begins >= backward_up


@pytest.mark.parametrize("kind", ["missing_weights", "wrong_architecture", "no_such_path"])
def test_bad_checkpoint_refused_and_server_keeps_serving(servers, model_dir, tmp_path, kind):
    before = prompt_logprobs(servers, "backward")
    if kind == "missing_weights":
        folder = copy_small_files(model_dir, tmp_path / "ckpt")
    elif kind == "wrong_architecture":
        folder = linked_checkpoint(model_dir, tmp_path / "ckpt")
        edit_config(folder, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    else:
        folder = tmp_path / "does-not-exist"
    version_before = Registry.load(servers.registry).servers["backward"].version
    with pytest.raises(CheckpointError):
        swap_checkpoint(servers.backward_url, folder, role="backward", version="bad", api_key=servers.api_key,
                        registry=servers.registry)
    assert prompt_logprobs(servers, "backward") == pytest.approx(before, abs=1e-4)
    assert Registry.load(servers.registry).servers["backward"].version == version_before


# One refused kind per way a folder can break or corrupt a reload (tests/services/test_checkpoint.py
# holds them all); each costs three CLI runs, so not every variant goes to the server.
SWAP_REFUSED = (
    "inconsistent_offsets", "dtype_F32", "extra_tensor", "stray_adapter", "stray_bin", "stale_shard_beside_weights",
    "nan", "tokenizer_not_json", "tokenizer_foreign", "tokenizer_symlinked_out", "config_list", "header_list",
)


def cli_swap(servers, folder, version: str):
    return humpback("serve", "swap", "backward", str(folder), "--version", version,
                    "--state-dir", str(servers.state_dir), check=False, timeout=600)


@pytest.mark.parametrize("kind", SWAP_REFUSED)
def test_swap_refuses_each_unfit_kind_and_server_keeps_serving(servers, model_dir, tmp_path, kind):
    folder, problem = REFUSED[kind](model_dir, tmp_path / kind)
    row, logprobs = status(servers)["backward"], prompt_logprobs(servers, "backward")
    out = cli_swap(servers, folder, f"bad-{kind}")
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    assert f"checkpoint {folder.absolute()}: {problem}" in out.stderr
    after = status(servers)["backward"]
    assert after["healthy"] is True
    assert {k: after[k] for k in ("version", "checkpoint", "pid", "state")} == \
        {k: row[k] for k in ("version", "checkpoint", "pid", "state")}
    assert prompt_logprobs(servers, "backward") == pytest.approx(logprobs, abs=1e-4)


def test_swap_reloads_a_trainer_export(servers, model_dir, tmp_path):
    """A trainer export of the served weights is accepted and reloaded; swapping the served folder back
    gives the same outputs (and leaves the base serving)."""
    export = trainer_export(model_dir, tmp_path / "final")
    out = cli_swap(servers, export, "export-test")
    assert out.returncode == 0, out.stderr
    row = status(servers)["backward"]
    assert (row["healthy"], row["version"], row["checkpoint"]) == (True, "export-test", str(export.absolute()))
    exported = prompt_logprobs(servers, "backward")
    out = cli_swap(servers, model_dir, "base")
    assert out.returncode == 0, out.stderr
    row = status(servers)["backward"]
    assert (row["healthy"], row["version"], row["checkpoint"]) == (True, "base", str(model_dir.absolute()))
    assert prompt_logprobs(servers, "backward") == pytest.approx(exported, abs=1e-4)


async def _load(servers, role: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(headers=servers.headers, timeout=300,
                                 limits=httpx.Limits(max_connections=n)) as client:
        async def one(i: int) -> httpx.Response:
            return await client.post(
                f"{servers.url(role)}/v1/chat/completions",
                json={"model": role, "messages": [{"role": "user", "content": f"Write a sentence about the number {i}."}],
                      "max_tokens": 48, "temperature": 0.7, "ignore_eos": True},
            )
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_hot_swap_under_load_changes_weights_without_failures(servers, model_dir, tmp_path):
    ckpt = perturbed_checkpoint(model_dir, tmp_path / "m1")
    before = prompt_logprobs(servers, "scorer")

    async def scenario():
        load = asyncio.create_task(_load(servers, "scorer", 32))
        await asyncio.sleep(3)  # let the 32 requests get in flight
        result = await asyncio.to_thread(
            swap_checkpoint, servers.scorer_url, ckpt, role="scorer", version="m1-test",
            alias="ft:scorer:m1-test", api_key=servers.api_key, registry=servers.registry,
        )
        return result, await load

    result, responses = asyncio.run(scenario())
    failures = [r for r in responses if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] == "abort"]
    assert not failures, [r.text[:200] for r in failures]
    assert result.stall_s < 60

    after = prompt_logprobs(servers, "scorer")
    assert max(abs(a - b) for a, b in zip(before, after)) > 0.05
    # The fine-tuned name is requestable and serves the new weights.
    assert prompt_logprobs(servers, "scorer", model="ft:scorer:m1-test") == pytest.approx(after, abs=1e-4)
    row = status(servers)["scorer"]
    assert row["version"] == "m1-test"
    assert "ft:scorer:m1-test" in row["aliases"]


def test_killed_server_is_restarted_with_its_served_checkpoint(servers, model_dir, tmp_path):
    ckpt = perturbed_checkpoint(model_dir, tmp_path / "m2", scale=0.7)
    swap_checkpoint(servers.backward_url, ckpt, role="backward", version="m2-test", api_key=servers.api_key,
                    registry=servers.registry)
    swapped = prompt_logprobs(servers, "backward")
    pid = status(servers)["backward"]["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(3)
    wait_healthy(servers.backward_url, timeout=900)
    row = status(servers)["backward"]
    assert row["pid"] != pid
    # The dead server's engine core (an orphan in its process group) was reaped by the restart.
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert row["version"] == "m2-test"
    assert prompt_logprobs(servers, "backward") == pytest.approx(swapped, abs=1e-3)
