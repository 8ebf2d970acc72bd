"""Two real CPU scorer replicas (`serve up --replicas backward=0 --replicas scorer=2`): `serve status`
shows each, and a hot-swap under load reaches both behind the version barrier with no failed request
and no answer from the old weights once the swap is reported done."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from client.fanout import Fanout, FanoutConfig
from humpback.contracts import VERSION_HEADER
from tests.conftest import TEST_API_KEY, humpback
from tests.services.helpers import perturbed_checkpoint
from tests.services.test_serve import FIXED_TEXT

pytestmark = pytest.mark.server

PORT = 18102  # apart from the session stack's (tests/conftest.py)
HEADERS = {"Authorization": f"Bearer {TEST_API_KEY}"}
LOGPROBS = {"model": "scorer", "prompt": FIXED_TEXT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}


@pytest.fixture(scope="module")
def replicas(model_dir, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("replicas")
    result = humpback(
        "serve", "up", "--state-dir", str(state_dir), "--replicas", "backward=0", "--replicas", "scorer=2",
        "--scorer-model", str(model_dir), "--scorer-port", str(PORT), "--kv-cache-bytes", "512M",
        check=False, env={"HUMPBACK_API_KEY": TEST_API_KEY},
    )
    if result.returncode != 0:
        humpback("serve", "down", "--state-dir", str(state_dir), check=False)
        pytest.fail(f"serve up failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    try:
        yield state_dir
    finally:
        humpback("serve", "down", "--state-dir", str(state_dir), check=False)


def rows(state_dir) -> dict[str, dict]:
    out = humpback("serve", "status", "--state-dir", str(state_dir), "--json", check=False)
    return {row["name"]: row for row in json.loads(out.stdout)}


def logprobs(answer: dict) -> list[float]:
    return [next(iter(tok.values()))["logprob"] for tok in answer["choices"][0]["prompt_logprobs"][1:]]


def differs(a: list[float], b: list[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) > 0.05


def test_status_shows_every_replica(replicas):
    status = rows(replicas)
    assert sorted(status) == ["scorer", "scorer-1"]
    assert {r["role"] for r in status.values()} == {"scorer"}
    assert [status[n]["url"] for n in ("scorer", "scorer-1")] == [f"http://127.0.0.1:{PORT}",
                                                                   f"http://127.0.0.1:{PORT + 10}"]
    assert all(r["healthy"] and r["version"] == "base" and r["state"] == "RUNNING" for r in status.values())


def test_swap_under_load_reaches_every_replica_behind_the_barrier(replicas, model_dir, tmp_path):
    urls = [r["url"] for r in rows(replicas).values()]
    ckpt = perturbed_checkpoint(model_dir, tmp_path / "m1")
    before = {u: logprobs(httpx.post(f"{u}/v1/completions", json=LOGPROBS, headers=HEADERS, timeout=120).json())
              for u in urls}
    done = threading.Event()

    async def unversioned(client: httpx.AsyncClient, i: int) -> tuple[bool, httpx.Response]:
        sent_after_done = done.is_set()
        resp = await client.post(f"{urls[i % 2]}/v1/chat/completions", json={
            "model": "scorer", "messages": [{"role": "user", "content": f"Write about the number {i}."}],
            "max_tokens": 32, "temperature": 0.7, "ignore_eos": True})
        return sent_after_done, resp

    def swap() -> float:
        out = humpback("serve", "swap", "scorer", str(ckpt), "--version", "m1-rep", "--alias", "ft:scorer:m1-rep",
                       "--state-dir", str(replicas), check=False)
        assert out.returncode == 0, out.stderr
        done.set()
        return json.loads(out.stdout)["stall_s"]

    async def scenario():
        cfg = FanoutConfig(endpoints=urls, api_key=TEST_API_KEY, require_version="m1-rep", concurrency=8)
        # A fresh connection per request: a kept-alive one that the server closes after its 5 s idle
        # timeout, just as a request goes out on it, fails with ReadError (humpback's fan-out retries
        # that; this raw client would count it as a failure of the swap).
        plain = httpx.AsyncClient(headers=HEADERS, timeout=300, limits=httpx.Limits(max_keepalive_connections=0))
        async with plain as client, Fanout(cfg) as fanout:
            load = [asyncio.create_task(unversioned(client, i)) for i in range(24)]
            # Asked for the new version before any replica serves it: refused, retried until one does.
            versioned = [asyncio.create_task(fanout.post("/v1/completions", LOGPROBS)) for _ in range(12)]
            while fanout.version_refusals == 0:
                await asyncio.sleep(0.05)
            stall = await asyncio.to_thread(swap)
            # After the barrier: every request, whichever replica takes it, is the new version's.
            after = [asyncio.create_task(unversioned(client, i)) for i in range(16)]
            probes = [client.post(f"{u}/v1/completions", json=LOGPROBS) for u in urls]
            return (stall, await asyncio.gather(*load), await asyncio.gather(*versioned), await asyncio.gather(*after),
                    await asyncio.gather(*probes), fanout.version_refusals)

    t0 = time.monotonic()
    stall, load, versioned, after, probes, refusals = asyncio.run(scenario())
    failed = [r.text[:200] for _, r in load + after
              if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] == "abort"]
    assert not failed, failed
    # Requests that named the new version were answered by the new weights only.
    assert refusals > 0 and all(differs(logprobs(a), before[urls[0]]) for a in versioned)
    # Once the swap was reported done, no answer came from the old version.
    assert all(sent_after and r.headers[VERSION_HEADER] == "m1-rep" for sent_after, r in after)
    new = [logprobs(p.json()) for p in probes]
    assert all(differs(n, before[u]) for n, u in zip(new, urls))
    assert new[0] == pytest.approx(new[1], abs=1e-3)  # both replicas serve the same weights
    status = rows(replicas)
    assert {(r["version"], r["healthy"]) for r in status.values()} == {("m1-rep", True)}
    assert all("ft:scorer:m1-rep" in r["aliases"] for r in status.values())
    print(f"replica swap: stall {stall:.2f} s per replica at most, {refusals} refusals, "
          f"{len(load) + len(after) + len(versioned)} requests, 0 failed, {time.monotonic() - t0:.1f} s")
