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


# --- the barrier's holes, closed (issue 19), on the same two real replicas ---------------------------


def _role_version(state_dir) -> str:
    from services.registry import Registry

    version = Registry.load(state_dir / "registry.json").role_version("scorer")
    assert version is not None
    return version


def test_responses_and_a_request_without_the_key_meet_the_barrier(replicas):
    url = next(iter(rows(replicas).values()))["url"]
    current = _role_version(replicas)
    body = {"model": "scorer", "input": "Say hi.", "max_output_tokens": 4, "temperature": 0}
    stale = httpx.post(f"{url}/v1/responses", json=body, headers={**HEADERS, VERSION_HEADER: "ftjob-stale"},
                       timeout=120)
    assert stale.status_code == 503 and stale.json()["error"]["code"] == "version_not_served"
    fresh = httpx.post(f"{url}/v1/responses", json=body, headers={**HEADERS, VERSION_HEADER: current}, timeout=120)
    assert fresh.status_code == 200 and fresh.headers[VERSION_HEADER] == current, fresh.text
    seeded = httpx.post(f"{url}/v1/responses", json={**body, "seed": 3}, headers=HEADERS, timeout=120)
    assert seeded.status_code == 400 and "seed" in seeded.text
    # No key: vLLM's 401, before the barrier could name the version.
    anonymous = httpx.post(f"{url}/v1/chat/completions", json={"model": "scorer", "messages": []},
                           headers={VERSION_HEADER: "ftjob-stale"}, timeout=120)
    assert anonymous.status_code == 401 and VERSION_HEADER not in anonymous.headers
    assert current not in anonymous.text and "ftjob" not in anonymous.text


def test_a_request_in_flight_across_a_swap_is_not_stamped_with_the_old_version(replicas, model_dir, tmp_path):
    from services.hotswap import swap_role

    servers = {name: row["url"] for name, row in rows(replicas).items()}
    url = servers["scorer"]
    current = _role_version(replicas)
    ckpt = perturbed_checkpoint(model_dir, tmp_path / "m2", scale=0.7)
    long = {"model": "scorer", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 800, "temperature": 0.7, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient(headers=HEADERS, timeout=600) as client:
            versioned = asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=long,
                                                        headers={VERSION_HEADER: current}))
            plain = asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=long))
            await asyncio.sleep(1.5)
            assert not versioned.done() and not plain.done()
            result = await asyncio.to_thread(swap_role, servers, ckpt, role="scorer", version="m2", alias="ft:m2",
                                             api_key=TEST_API_KEY, registry=replicas / "registry.json")
            return result, await versioned, await plain

    result, versioned, plain = asyncio.run(scenario())
    assert result.servers == ["scorer", "scorer-1"]
    # Admitted under the old version, finished on the new weights: refused to the client that named
    # the old version, and no version stamped on the other.
    assert versioned.status_code == 503 and versioned.json()["error"]["code"] == "version_not_served"
    assert plain.status_code == 200 and VERSION_HEADER not in plain.headers
    answer = httpx.post(f"{url}/v1/completions", json=LOGPROBS, headers={**HEADERS, VERSION_HEADER: "m2"}, timeout=120)
    assert answer.status_code == 200 and answer.headers[VERSION_HEADER] == "m2"


def test_a_replica_gone_halfway_through_swap_role_leaves_the_role_on_one_version(replicas, model_dir, tmp_path,
                                                                                 monkeypatch):
    """The second replica is stopped once the first has the new weights: the first is put back, the
    registry and the error say the role serves its old version, and the first answers as before."""
    from humpback.contracts import SwapError
    from services import hotswap
    from services.registry import Registry
    from services.supervisor import rpc

    servers = {name: row["url"] for name, row in rows(replicas).items()}
    registry = replicas / "registry.json"
    current = _role_version(replicas)
    before_entries = Registry.load(registry).servers
    before = logprobs(httpx.post(f"{servers['scorer']}/v1/completions", json=LOGPROBS, headers=HEADERS,
                                 timeout=120).json())
    ckpt = perturbed_checkpoint(model_dir, tmp_path / "m3", scale=2.0)
    real_swap = hotswap.swap_checkpoint
    reached: list[str] = []

    def then_stop_the_other(url, *args, **kwargs):
        if kwargs["name"] == "scorer-1" and kwargs["version"] == "m3":
            # The first replica serves m3 now (the registry says so): the second goes away.
            assert Registry.load(registry).servers["scorer"].version == "m3"
            rpc(replicas).supervisor.stopProcess("scorer-1")
        result = real_swap(url, *args, **kwargs)
        reached.append(kwargs["name"])
        return result

    monkeypatch.setattr(hotswap, "swap_checkpoint", then_stop_the_other)
    with pytest.raises(SwapError) as err:
        hotswap.swap_role(servers, ckpt, role="scorer", version="m3", alias="ft:m3", api_key=TEST_API_KEY,
                          registry=registry)
    assert "scorer-1 failed the swap" in str(err.value)
    assert str(err.value).endswith(f"now every scorer server serves version {current!r}")
    assert Registry.load(registry).servers == before_entries and reached == ["scorer", "scorer"]
    after = httpx.post(f"{servers['scorer']}/v1/completions", json=LOGPROBS,
                       headers={**HEADERS, VERSION_HEADER: current}, timeout=120)
    assert after.status_code == 200 and after.headers[VERSION_HEADER] == current
    assert logprobs(after.json()) == pytest.approx(before, abs=1e-3)
