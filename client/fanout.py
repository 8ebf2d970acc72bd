"""Bounded fan-out of JSON requests to one or more OpenAI-compatible endpoints.

The servers batch; the client's job is only to keep each one busy without flooding it. Each endpoint
has a window of in-flight requests. By default the window adapts to the server's own queue, read
from vLLM's `/metrics` (`vllm:num_requests_waiting`): it doubles while the server has no queue and
the client is the limit, and shrinks when requests pile up waiting, so the server always has work
and nobody hand-tunes a concurrency. Endpoints without `/metrics` get a fixed generous window.

Requests go to the endpoint with the lowest load; failures are retried with exponential backoff and
full jitter, preferring another endpoint (failover), and an endpoint that refuses connections is
benched for a growing cool-down. The httpx pool is sized to the windows: no hidden 100-connection cap.

With `require_version`, every request names the served version it must be answered by; the replicas
of a role that do not serve it yet (a swap is rolling through them) refuse with 503
`version_not_served`, and the request goes at once to an endpoint that has not refused it; when every
endpoint has refused, it waits as the servers' Retry-After asks and asks again. The version stamped on
each answer is checked too: an answer stamped with another version, or with none (a swap ran while the
request did), is not accepted and the request is sent again. A refusal is not a failure: it uses up
none of `max_retries`, and the request waits up to `version_wait` for the version (a swap on CPU takes
tens of seconds, and the backoff of a few retries could end before it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
from pydantic import BaseModel, ConfigDict

from client.transport import AsyncioBackend
from humpback.contracts import (
    VERSION_HEADER, VERSION_NOT_SERVED, RequestFailed, RetryableError, Unreachable, auth_headers,
)
from humpback.settings import setting, stack_api_key

log = logging.getLogger(__name__)
_VERSION_KEY = VERSION_HEADER.lower().encode()


class FanoutConfig(BaseModel):
    """How requests are spread and retried; each field is a flag of `humpback augment`/`curate`."""

    model_config = ConfigDict(extra="forbid")

    endpoints: list[str] = setting(
        help="server base URL (`http://host:port`, without /v1), repeatable for load balancing and failover",
        flag="endpoint", metavar="URL")
    api_key: str | None = stack_api_key("sent to every endpoint as `Authorization: Bearer`; unset sends no header")
    concurrency: int | None = setting(None, "fixed in-flight requests per endpoint; unset adapts the window to the "
                                            "server's queue", ge=1)
    initial_window: int = setting(64, "first in-flight window of an adaptive endpoint", ge=1)
    min_window: int = setting(8, "smallest adaptive window", ge=1)
    max_window: int = setting(1024, "largest adaptive window", ge=1)
    fallback_window: int = setting(256, "window of an endpoint that exposes no vLLM /metrics", ge=1)
    timeout: float = setting(600.0, "seconds per request, queueing on the server included", gt=0)
    connect_timeout: float = setting(10.0, "seconds to connect", gt=0)
    max_retries: int = setting(8, "retries after the first attempt, on connection errors, timeouts, 429, 5xx and "
                                  "aborts", ge=0)
    backoff_base: float = setting(0.5, "first backoff in seconds (exponential, full jitter)", ge=0)
    backoff_max: float = setting(30.0, "longest backoff in seconds", ge=0)
    metrics_interval: float = setting(1.0, "seconds between /metrics polls", gt=0)
    require_version: str | None = setting(
        None, f"the served version every answer must come from, sent as {VERSION_HEADER}: a replica that does not "
              "serve it (yet) refuses, and the request goes to another endpoint (the version barrier of a role "
              "served by several replicas, services.hotswap.swap_role)")
    version_wait: float = setting(600.0, "seconds a request waits for an endpoint that serves --require-version "
                                         "(a swap rolling through the replicas) before it fails; these refusals "
                                         "use up none of --max-retries", ge=0)


@dataclass(eq=False)
class Endpoint:
    """One server and its load: in-flight requests, window, cool-down after connection failures."""

    url: str
    window: int
    adaptive: bool
    inflight: int = 0
    down_until: float = 0.0
    failures: int = 0
    completed: int = 0
    errors: int = 0
    waiting: float = 0.0
    running: float = 0.0


def _metric(text: str, name: str) -> float | None:
    """Sum of a Prometheus gauge over its label sets; None when absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except ValueError:
                pass
    return total if seen else None


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:  # an HTTP date: fall back on our own backoff
                return None
    return None


class Fanout:
    """`async with Fanout(cfg) as f: data = await f.post("/v1/chat/completions", body)`."""

    def __init__(self, config: FanoutConfig) -> None:
        if not config.endpoints:
            raise ValueError("at least one endpoint is needed")
        self.config = config
        fixed = config.concurrency
        self.endpoints = [Endpoint(url=u.rstrip("/"), window=fixed or config.initial_window, adaptive=fixed is None)
                          for u in config.endpoints]
        self.retries = 0
        # Answers of a replica that did not serve the required version (yet): tried elsewhere at once.
        self.version_refusals = 0
        self._cond = asyncio.Condition()
        self._client: httpx.AsyncClient | None = None  # control requests (/v1/models, /metrics)
        self._free: list[httpcore.AsyncConnectionPool] = []  # idle per-request pools, most recent last
        self._all: list[httpcore.AsyncConnectionPool] = []
        self._ssl = httpx.create_ssl_context()
        self._backend = AsyncioBackend()
        self._urls: dict[str, httpcore.URL] = {}
        self._headers: dict[str, list[tuple[bytes, bytes]]] = {}
        self._timeouts: dict[str, float | None] = {}
        self._poller: asyncio.Task[None] | None = None

    @property
    def max_inflight(self) -> int:
        """The most requests that can ever be in flight: bound for a producer's pending work."""
        per = self.config.concurrency or max(self.config.max_window, self.config.fallback_window)
        return per * len(self.endpoints)

    async def __aenter__(self) -> Fanout:
        cfg = self.config
        headers = auth_headers(cfg.api_key)
        timeout = httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout, pool=None)
        # The hot path talks to httpcore (httpx's transport) directly. httpcore scans its whole pool on
        # every request and response, so one pool of a thousand connections would spend more CPU than
        # the requests: each in-flight request instead borrows a pool of its own (one keep-alive
        # connection per endpoint), most recently used first, so there are never more pools than the
        # windows allow and no hidden connection cap. httpx's URL/auth/redirect layers, useless for
        # one POST to a fixed URL, are skipped: this halves the client's CPU per request. The pools run on
        # plain asyncio transports (client/transport.py) rather than anyio: another third off.
        for ep in self.endpoints:
            url = httpx.URL(ep.url)
            host = url.netloc.decode("ascii")
            self._headers[ep.url] = [(b"Host", host.encode("ascii")), (b"Content-Type", b"application/json"),
                                     *[(k.encode(), v.encode()) for k, v in headers.items()],
                                     *([(VERSION_HEADER.encode(), cfg.require_version.encode())]
                                       if cfg.require_version else [])]
        self._timeouts = {"connect": cfg.connect_timeout, "read": cfg.timeout, "write": cfg.timeout, "pool": None}
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers)
        if any(e.adaptive for e in self.endpoints):
            self._poller = asyncio.create_task(self._poll_metrics())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
        for c in [*self._all, *([self._client] if self._client is not None else [])]:
            await c.aclose()

    # --- load balancing ------------------------------------------------------------------------

    async def _acquire(self, avoid: Endpoint | None, exclude: Collection[str] = ()) -> Endpoint:
        """The least loaded endpoint with room, other than `avoid` when there is a choice, and never
        one in `exclude` (waiting for another to have room)."""
        async with self._cond:
            while True:
                now = time.monotonic()
                ready = [e for e in self.endpoints
                         if e.down_until <= now and e.inflight < e.window and e.url not in exclude]
                if avoid is not None and len(ready) > 1:
                    ready = [e for e in ready if e is not avoid]
                if ready:
                    ep = min(ready, key=lambda e: e.inflight / e.window)
                    ep.inflight += 1
                    return ep
                wake = [e.down_until - now for e in self.endpoints if e.down_until > now]
                try:
                    await asyncio.wait_for(self._cond.wait(), min(wake) if wake else None)
                except asyncio.TimeoutError:
                    pass

    def _new_pool(self) -> httpcore.AsyncConnectionPool:
        n = len(self.endpoints)
        pool = httpcore.AsyncConnectionPool(ssl_context=self._ssl, max_connections=n, max_keepalive_connections=n,
                                            network_backend=self._backend)
        self._all.append(pool)
        return pool

    async def _release(self, ep: Endpoint) -> None:
        async with self._cond:
            ep.inflight -= 1
            self._cond.notify()

    def _bench(self, ep: Endpoint) -> None:
        ep.failures += 1
        ep.down_until = time.monotonic() + min(self.config.backoff_max, self.config.backoff_base * 2 ** ep.failures)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        delay = random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** (attempt - 1)))
        return max(delay, min(retry_after or 0.0, cfg.backoff_max))

    # --- requests ------------------------------------------------------------------------------

    async def post(self, path: str, body: dict[str, Any],
                   check: Callable[[dict[str, Any]], Any] | None = None) -> Any:
        """POST `body` as JSON; returns `check(response)` (or the response), retrying as configured.

        `check` validates a 200 response: raising `RetryableError` retries it, `RequestFailed` gives up.
        """
        assert self._client is not None, "use `async with Fanout(...)`"
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        length = (b"Content-Length", str(len(payload)).encode())
        extensions = {"timeout": self._timeouts}
        avoid: Endpoint | None = None
        refused: set[str] = set()  # endpoints that did not serve the required version, since the last wait
        waiting_since: float | None = None  # the first refusal of the required version
        reason = ""
        failed = sent = rounds = 0  # failures (against max_retries), requests sent, waits for the version
        while True:
            ep = await self._acquire(avoid, refused)
            sent += 1
            refusal = False
            retry_after: float | None = None  # what this answer asks, for the wait right after it only
            try:
                pool = self._free.pop() if self._free else self._new_pool()
                try:
                    resp = await self._send(pool, ep.url + path, [*self._headers[ep.url], length], payload, extensions)
                finally:
                    self._free.append(pool)
            except httpcore.TimeoutException as exc:
                reason = f"{type(exc).__name__} after {self.config.timeout:g}s from {ep.url}"
            except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
                reason = f"{type(exc).__name__} from {ep.url}: {exc}"
                self._bench(ep)
            else:
                status = resp.status
                text = resp.content.decode("utf-8", "replace") if status != 200 else ""
                stamp = self._stamp_refused(resp.headers) if status == 200 else None
                if stamp is not None:
                    # Answered, but not (wholly) by the required version: a replica swapped under it.
                    refusal = True
                    reason = f"an answer from {ep.url} stamped {stamp}, not version {self.config.require_version!r}"
                elif status == 200:
                    try:
                        data = json.loads(resp.content)
                        if not isinstance(data, dict):
                            raise ValueError(f"a JSON {type(data).__name__}, not an object")
                        result = check(data) if check is not None else data
                    except RetryableError as exc:
                        reason = f"{exc} from {ep.url}"
                    except ValueError as exc:  # a 200 whose body is not JSON: a broken proxy, retry
                        reason = f"invalid JSON from {ep.url}: {exc}"
                    except (TypeError, AttributeError, KeyError, IndexError) as exc:
                        # JSON, but not the shape `check` reads (a list where text belongs): a bad answer,
                        # retried and, if it stays bad, this request's failure, never the run's.
                        reason = f"a malformed answer from {ep.url} ({type(exc).__name__}: {exc})"
                    else:
                        ep.failures = 0
                        ep.completed += 1
                        return result
                elif status == 503 and VERSION_NOT_SERVED in text:
                    refusal = True
                    reason = f"HTTP 503 from {ep.url}: {text[:200]}"
                    retry_after = _retry_after(resp.headers)
                elif status == 429 or status >= 500:
                    reason = f"HTTP {status} from {ep.url}: {text[:200]}"
                    retry_after = _retry_after(resp.headers)
                else:
                    ep.errors += 1
                    raise RequestFailed(f"HTTP {status} from {ep.url}{path}: {text[:300]}", sent)
            finally:
                await self._release(ep)
            avoid = ep
            log.debug("attempt %d failed: %s", sent, reason)
            if refusal:
                self.version_refusals += 1
                refused.add(ep.url)
                now = time.monotonic()
                waiting_since = now if waiting_since is None else waiting_since
                left = self.config.version_wait - (now - waiting_since)
                if left <= 0:
                    raise RequestFailed(f"no endpoint served version {self.config.require_version!r} within "
                                        f"{self.config.version_wait:g}s (--version-wait): {reason}", sent)
                if len(refused) < len(self.endpoints):
                    continue  # another replica may serve it already: go there, no wait
                # Every endpoint refused: wait as long as the servers ask (the guard's Retry-After), else back off.
                refused.clear()
                rounds += 1
                await asyncio.sleep(min(left, retry_after if retry_after is not None else self._backoff(rounds, None)))
                continue
            ep.errors += 1
            failed += 1
            if failed > self.config.max_retries:
                raise RequestFailed(f"gave up after {sent} attempts: {reason}", sent)
            self.retries += 1
            refused.clear()  # a replica that refused may serve the version by the time the backoff ends
            await asyncio.sleep(self._backoff(failed, retry_after))

    def _stamp_refused(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """With `require_version`, why an answer's stamp (the version that served it, services.guard)
        is not the one required, or None when it is (or none is required)."""
        if self.config.require_version is None:
            return None
        stamp = next((v.decode("latin-1") for k, v in headers if k.lower() == _VERSION_KEY), None)
        if stamp == self.config.require_version:
            return None
        return "no version" if stamp is None else repr(stamp)

    async def _send(self, pool: httpcore.AsyncConnectionPool, url: str, headers: list[tuple[bytes, bytes]],
                    payload: bytes, extensions: dict[str, Any]) -> httpcore.Response:
        """`pool.request` without re-checking what is fixed per endpoint: the parsed URL is cached and
        the headers (Host and Content-Length included) are already bytes."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = httpcore.URL(url)
        response = await pool.handle_async_request(
            httpcore.Request(b"POST", parsed, headers=headers, content=payload, extensions=extensions))
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET from the first endpoint that answers (for `/v1/models`), retrying while servers start."""
        assert self._client is not None
        errors: list[str] = []
        answered = False
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt, None))
            for ep in self.endpoints:
                try:
                    resp = await self._client.get(ep.url + path, timeout=self.config.connect_timeout + 20)
                    resp.raise_for_status()
                    return resp.json()
                except (httpx.HTTPError, ValueError) as exc:
                    errors.append(f"{ep.url}: {exc}")
                    answered = answered or not isinstance(exc, httpx.TransportError)
        reason = f"GET {path} failed on every endpoint: {'; '.join(errors[-len(self.endpoints):])}"
        if answered:
            raise RequestFailed(reason, self.config.max_retries + 1)
        # No server answered at all: the environment's fault (exit status 4), not the request's.
        raise Unreachable(f"{reason}; start the servers (`humpback serve up`) or point --endpoint at running ones",
                          self.config.max_retries + 1)

    # --- adaptive windows ----------------------------------------------------------------------

    async def _poll_metrics(self) -> None:
        assert self._client is not None
        cfg = self.config
        while True:
            for ep in self.endpoints:
                if not ep.adaptive:
                    continue
                try:
                    resp = await self._client.get(ep.url + "/metrics", timeout=5.0)
                    waiting = _metric(resp.text, "vllm:num_requests_waiting") if resp.status_code == 200 else None
                    running = _metric(resp.text, "vllm:num_requests_running") if resp.status_code == 200 else None
                except httpx.HTTPError:
                    continue  # a down server is the retry logic's business
                if waiting is None or running is None:
                    log.info("%s exposes no vLLM metrics: fixed window of %d", ep.url, cfg.fallback_window)
                    ep.adaptive, ep.window = False, cfg.fallback_window
                else:
                    self._adapt(ep, waiting, running)
            async with self._cond:
                self._cond.notify_all()
            await asyncio.sleep(cfg.metrics_interval)

    def _adapt(self, ep: Endpoint, waiting: float, running: float) -> None:
        """Keep a short queue on the server: enough that it never idles between steps, no deeper."""
        cfg = self.config
        ep.waiting, ep.running = waiting, running
        target = max(4.0, running / 4)
        if waiting > 2 * target:
            ep.window = max(cfg.min_window, int(ep.window - (waiting - target) / 2))
        elif waiting <= target and ep.inflight >= ep.window - 1:
            ep.window = min(cfg.max_window, ep.window * 2)
