"""Fan-out against the fake server: retries, backoff, failover, timeouts, aborts, no hidden pool cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from client.augment import parse_instruction
from client.fanout import Fanout, FanoutConfig, _metric
from humpback.contracts import RequestFailed
from tests.client.fake_server import FakeServer, free_port

BODY = {"model": "fake", "messages": [{"role": "user", "content": "hello world"}]}
FAST = {"backoff_base": 0.01, "backoff_max": 0.05}


async def test_retries_429_and_5xx_then_succeeds(fake: FakeServer) -> None:
    fake.script.extend(["429", "500", "503"])
    async with Fanout(FanoutConfig(endpoints=[fake.url], concurrency=4, **FAST)) as f:
        text, finish = await f.post("/v1/chat/completions", BODY, parse_instruction)
    assert text.startswith("What does this say") and finish == "stop"
    assert f.retries == 3 and fake.faults["ok"] == 1


async def test_gives_up_after_max_retries(fake: FakeServer) -> None:
    fake.script.extend(["500"] * 10)
    async with Fanout(FanoutConfig(endpoints=[fake.url], concurrency=4, max_retries=2, **FAST)) as f:
        with pytest.raises(RequestFailed, match="gave up after 3 attempts: HTTP 500") as info:
            await f.post("/v1/chat/completions", BODY)
    assert info.value.attempts == 3


async def test_client_errors_are_not_retried(fake: FakeServer) -> None:
    fake.script.append("400")
    async with Fanout(FanoutConfig(endpoints=[fake.url], concurrency=4, **FAST)) as f:
        with pytest.raises(RequestFailed, match="HTTP 400"):
            await f.post("/v1/chat/completions", BODY)
    assert fake.requests["/v1/chat/completions"] == 1


async def test_abort_and_dropped_connection_are_retried(fake: FakeServer) -> None:
    fake.script.extend(["abort", "drop"])
    async with Fanout(FanoutConfig(endpoints=[fake.url], concurrency=4, **FAST)) as f:
        text, _ = await f.post("/v1/chat/completions", BODY, parse_instruction)
    assert text and f.retries == 2


async def test_a_truncated_answer_is_the_callers_to_judge_not_retried(fake: FakeServer) -> None:
    fake.script.append("length")  # augment resamples it (tests/client/test_augment.py); the fan-out does not
    async with Fanout(FanoutConfig(endpoints=[fake.url], concurrency=4, **FAST)) as f:
        text, finish = await f.post("/v1/chat/completions", BODY, parse_instruction)
    assert (text, finish) == ("What is the meaning of", "length")
    assert f.retries == 0 and fake.requests["/v1/chat/completions"] == 1


async def test_per_request_timeout_then_retry() -> None:
    fake = FakeServer(hang=5.0).start()
    try:
        fake.script.append("hang")
        async with Fanout(FanoutConfig(endpoints=[fake.url], concurrency=4, timeout=0.3, **FAST)) as f:
            t0 = time.monotonic()
            text, _ = await f.post("/v1/chat/completions", BODY, parse_instruction)
        assert text and f.retries == 1 and time.monotonic() - t0 < 3
    finally:
        fake.stop()


async def test_failover_to_a_live_endpoint(fake: FakeServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with Fanout(FanoutConfig(endpoints=[dead, fake.url], concurrency=4, **FAST)) as f:
        results = await asyncio.gather(*(f.post("/v1/chat/completions", BODY) for _ in range(20)))
    assert len(results) == 20
    assert f.endpoints[0].completed == 0 and f.endpoints[1].completed == 20
    assert f.endpoints[0].failures >= 1  # benched after refusing connections


async def test_load_is_balanced(fake: FakeServer) -> None:
    other = FakeServer(delay=0.02).start()
    fake.delay = 0.02
    try:
        async with Fanout(FanoutConfig(endpoints=[fake.url, other.url], concurrency=8)) as f:
            await asyncio.gather(*(f.post("/v1/chat/completions", BODY) for _ in range(64)))
        assert abs(f.endpoints[0].completed - f.endpoints[1].completed) <= 8
    finally:
        other.stop()


async def test_no_hidden_pool_cap_at_100(fake: FakeServer) -> None:
    fake.delay = 0.4
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, fake.running)
            await asyncio.sleep(0.01)

    async with Fanout(FanoutConfig(endpoints=[fake.url], concurrency=200)) as f:
        w = asyncio.create_task(watch())
        await asyncio.gather(*(f.post("/v1/chat/completions", BODY) for _ in range(200)))
        w.cancel()
    assert peak > 120


async def test_adaptive_window_grows_while_server_has_no_queue(fake: FakeServer) -> None:
    fake.delay = 0.1
    cfg = FanoutConfig(endpoints=[fake.url], initial_window=8, metrics_interval=0.05)
    async with Fanout(cfg) as f:
        await asyncio.gather(*(f.post("/v1/chat/completions", BODY) for _ in range(100)))
        assert f.endpoints[0].window > 8 and f.endpoints[0].adaptive


def test_adaptive_window_shrinks_when_requests_queue() -> None:
    f = Fanout(FanoutConfig(endpoints=["http://x"], initial_window=256))
    ep = f.endpoints[0]
    f._adapt(ep, waiting=200, running=64)
    assert ep.window < 256
    ep.inflight = ep.window
    f._adapt(ep, waiting=0, running=64)
    assert ep.window > 100


def test_metric_sums_label_sets() -> None:
    text = 'vllm:num_requests_waiting{engine="0"} 3.0\nvllm:num_requests_waiting{engine="1"} 2.0\n' \
           'vllm:num_requests_waiting_by_reason{reason="x"} 9.0\n'
    assert _metric(text, "vllm:num_requests_waiting") == 5.0
    assert _metric(text, "vllm:num_requests_running") is None
