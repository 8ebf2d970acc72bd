"""The admin guard and alias mapping, exercised through real ASGI requests (no vLLM needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from humpback.contracts import ADMIN_ALLOW_ENV, REGISTRY_ENV, REJECT_SEED_ENV
from services.config import ServerSpec
from services.guard import AdminGuard
from services.launch import FORWARDED_ALLOW_IPS_ENV, vllm_env
from services.registry import Registry, record_swap

ROOT = Path(__file__).resolve().parents[2]


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "body": json.loads(body) if body else None,
                         "content_length": request.headers.get("content-length"), "client": request.client.host})


def make_app(monkeypatch: pytest.MonkeyPatch, registry=None, allow: str = "") -> AdminGuard:
    monkeypatch.setenv(ADMIN_ALLOW_ENV, allow)
    if registry is not None:
        monkeypatch.setenv(REGISTRY_ENV, str(registry))
    else:
        monkeypatch.delenv(REGISTRY_ENV, raising=False)
    paths = ["/health", "/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter",
             "/collective_rpc", "/pause", "/resume", "/sleep", "/reset_prefix_cache"]
    app = Starlette(routes=[Route(p, echo, methods=["GET", "POST"]) for p in paths])
    return AdminGuard(app)


def client(app, ip: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 5000)), base_url="http://server")


@pytest.mark.parametrize("path", ["/collective_rpc", "/pause", "/resume", "/sleep", "/reset_prefix_cache", "/v1/load_lora_adapter"])
async def test_admin_routes_refused_from_outside(monkeypatch, path):
    app = make_app(monkeypatch)
    async with client(app, "203.0.113.9") as c:
        resp = await c.post(path, json={})
    assert resp.status_code == 403
    assert "admin route" in resp.json()["error"]["message"]


async def test_admin_routes_answer_loopback_and_allowed_networks(monkeypatch):
    app = make_app(monkeypatch, allow="172.28.0.0/16")
    for ip in ("127.0.0.1", "::1", "172.28.3.4"):
        async with client(app, ip) as c:
            assert (await c.post("/collective_rpc", json={})).status_code == 200, ip
    async with client(app, "172.29.0.1") as c:
        assert (await c.post("/collective_rpc", json={})).status_code == 403


async def test_inference_routes_are_public(monkeypatch):
    app = make_app(monkeypatch)
    async with client(app, "203.0.113.9") as c:
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/v1/chat/completions", json={"model": "scorer"})).status_code == 200


async def test_alias_maps_to_role_after_swap(monkeypatch, tmp_path):
    registry = tmp_path / "registry.json"
    app = make_app(monkeypatch, registry=registry)
    async with client(app, "127.0.0.1") as c:
        resp = await c.post("/v1/chat/completions", json={"model": "ft:scorer:m1", "messages": []})
        assert resp.json()["body"]["model"] == "ft:scorer:m1"  # no alias recorded yet
        record_swap(registry, "scorer", "m1", "/ckpt/m1", "reload", "ft:scorer:m1")
        resp = await c.post("/v1/chat/completions", json={"model": "ft:scorer:m1", "messages": []})
        body = resp.json()
        assert body["body"]["model"] == "scorer"
        assert int(body["content_length"]) == len(json.dumps(body["body"]).encode())
        # A later full-weight swap replaces the weights: the old name no longer resolves.
        record_swap(registry, "scorer", "m2", "/ckpt/m2", "reload", "ft:scorer:m2")
        resp = await c.post("/v1/completions", json={"model": "ft:scorer:m1", "prompt": "x"})
        assert resp.json()["body"]["model"] == "ft:scorer:m1"
        resp = await c.post("/v1/completions", json={"model": "ft:scorer:m2", "prompt": "x"})
        assert resp.json()["body"]["model"] == "scorer"
    assert Registry.load(registry).aliases() == {"ft:scorer:m2": "scorer"}


def test_aliases_of_every_role_and_not_adapters(tmp_path):
    registry = tmp_path / "registry.json"
    record_swap(registry, "scorer", "m1", "/ckpt/m1", "reload", "ft:scorer:m1")
    record_swap(registry, "backward", "b1", "/ckpt/b1", "reload", "ft:backward:b1")
    # An adapter is requested by its own name and leaves the full weights (and their alias) in place.
    record_swap(registry, "backward", "b2", "/ckpt/b2", "lora", "backward-b2")
    assert Registry.load(registry).aliases() == {"ft:scorer:m1": "scorer", "ft:backward:b1": "backward"}
    assert Registry.load(registry).servers["backward"].adapters == ["backward-b2"]
    # New full weights served under the role's own name: the old alias goes, and no new one comes.
    record_swap(registry, "scorer", "m0", "/ckpt/m0", "reload", "scorer")
    assert Registry.load(registry).aliases() == {"ft:backward:b1": "backward"}


def test_guard_imports_only_what_the_vllm_image_mounts():
    """compose mounts only `services/` and `humpback/` into the vLLM image: the guard must not pull in
    the client, the trainer, the loop or anything beyond starlette and pydantic."""
    code = ("import sys, services.guard; "
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in "
            "('services', 'humpback', 'client', 'trainer', 'httpx', 'fastapi', 'torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert {"services.guard", "services.registry", "humpback.contracts"} <= loaded
    assert {m for m in loaded if not m.startswith(("services.guard", "services.registry", "humpback.contracts"))} \
        <= {"services", "humpback"}


async def test_seed_refused_on_cpu_servers(monkeypatch):
    monkeypatch.setenv(REJECT_SEED_ENV, "1")
    app = make_app(monkeypatch)
    async with client(app, "127.0.0.1") as c:
        resp = await c.post("/v1/chat/completions", json={"model": "backward", "messages": [], "seed": 3})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "seed"
        ok = await c.post("/v1/chat/completions", json={"model": "backward", "messages": [], "seed": None})
        assert ok.status_code == 200 and ok.json()["body"]["model"] == "backward"
    monkeypatch.setenv(REJECT_SEED_ENV, "0")
    app = make_app(monkeypatch)
    async with client(app, "127.0.0.1") as c:
        resp = await c.post("/v1/completions", json={"model": "backward", "prompt": "x", "seed": 3})
        assert resp.status_code == 200 and resp.json()["body"]["seed"] == 3


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
async def test_admin_requests_through_a_proxy_are_refused_even_from_loopback(monkeypatch, header):
    """A proxy on the host connects from loopback: what it forwards must not reach the admin routes."""
    app = make_app(monkeypatch, allow="172.28.0.0/16")
    value = "for=127.0.0.1" if header == "Forwarded" else "127.0.0.1"
    for ip in ("127.0.0.1", "::1", "172.28.3.4"):
        async with client(app, ip) as c:
            resp = await c.post("/collective_rpc", json={}, headers={header: value})
            assert resp.status_code == 403, (ip, header)
            error = resp.json()["error"]
            assert (error["type"], error["code"]) == ("forbidden", 403)
            assert "admin route" in error["message"] and header.lower() in error["message"]
            # Inference through a proxy is what proxies are for.
            assert (await c.post("/v1/chat/completions", json={"model": "scorer"},
                                 headers={header: value})).status_code == 200


async def test_v4_mapped_addresses_count_as_their_ipv4_address(monkeypatch):
    """A server bound dual-stack on `::` sees IPv4 clients as `::ffff:a.b.c.d`."""
    app = make_app(monkeypatch, allow="172.28.0.0/16")
    for ip, status in (("::ffff:127.0.0.1", 200), ("::ffff:172.28.3.4", 200), ("::ffff:203.0.113.9", 403),
                       ("::ffff:172.29.0.1", 403)):
        async with client(app, ip) as c:
            assert (await c.post("/pause", json={})).status_code == status, ip


@contextmanager
def served(app, family: socket.AddressFamily, host: str) -> Iterator[int]:
    """`app` behind a real uvicorn (vLLM's server) on `host`, in a thread; yields the port."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack, as `--host ::` binds
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_real_server_under_the_launchers_environment(monkeypatch, tmp_path):
    """uvicorn, with the environment the launcher gives vLLM, takes no peer's word for the client's
    address: a forwarded request keeps its real client, and its admin route stays shut."""
    env = vllm_env(ServerSpec(role="scorer", port=9, device="cpu"), tmp_path / "registry.json", [])
    monkeypatch.setenv(FORWARDED_ALLOW_IPS_ENV, env[FORWARDED_ALLOW_IPS_ENV])
    app = make_app(monkeypatch)
    with served(app, socket.AF_INET, "127.0.0.1") as port:
        url = f"http://127.0.0.1:{port}"
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        assert httpx.post(f"{url}/v1/completions", json={}, headers=forwarded).json()["client"] == "127.0.0.1"
        assert httpx.post(f"{url}/pause", json={}, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 403
        assert httpx.post(f"{url}/pause", json={}).status_code == 200


def test_real_dual_stack_server_answers_ipv4_loopback_on_admin_routes(monkeypatch):
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this host")
    app = make_app(monkeypatch)
    with served(app, socket.AF_INET6, "::") as port:
        resp = httpx.post(f"http://127.0.0.1:{port}/collective_rpc", json={})
        assert resp.status_code == 200 and resp.json()["client"] == "::ffff:127.0.0.1"


async def _ws_handshake(guard: AdminGuard, path: str, ip: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """The first message the app sends back for a websocket handshake to `path` from `ip`."""
    sent: list[dict] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": path, "raw_path": path.encode(), "root_path": "", "scheme": "ws",
             "query_string": b"", "headers": headers, "client": (ip, 5000), "server": ("server", 80),
             "subprotocols": [], "asgi": {"version": "3.0"}}
    await guard(scope, receive, send)
    return sent[0]


async def test_websocket_handshakes_to_admin_routes_are_guarded_too(monkeypatch):
    async def accept(ws: WebSocket) -> None:
        await ws.accept()
        await ws.close()

    monkeypatch.setenv(ADMIN_ALLOW_ENV, "")
    guard = AdminGuard(Starlette(routes=[WebSocketRoute("/collective_rpc", accept), WebSocketRoute("/v1/realtime", accept)]))
    outside = await _ws_handshake(guard, "/collective_rpc", "203.0.113.9", [])
    assert outside["type"] == "websocket.close" and "admin route" in outside["reason"]
    proxied = await _ws_handshake(guard, "/collective_rpc", "127.0.0.1", [(b"x-forwarded-for", b"203.0.113.9")])
    assert proxied["type"] == "websocket.close" and "proxy" in proxied["reason"]
    assert (await _ws_handshake(guard, "/collective_rpc", "127.0.0.1", []))["type"] == "websocket.accept"
    assert (await _ws_handshake(guard, "/v1/realtime", "203.0.113.9", []))["type"] == "websocket.accept"


async def test_a_model_that_is_no_name_passes_to_vllm(monkeypatch, tmp_path):
    """A list or object as `model` is vLLM's to refuse (422), not a crash of the guard's alias lookup."""
    registry = tmp_path / "registry.json"
    record_swap(registry, "scorer", "m1", "/ckpt/m1", "reload", "ft:scorer:m1")
    app = make_app(monkeypatch, registry=registry)
    async with client(app, "127.0.0.1") as c:
        for model in (["ft:scorer:m1"], {"a": 1}):
            resp = await c.post("/v1/chat/completions", json={"model": model, "messages": []})
            assert resp.status_code == 200 and resp.json()["body"]["model"] == model


# --- the key first, every inference route, bounded bodies, answers that crossed a reload ----------


def _scorer(monkeypatch: pytest.MonkeyPatch, registry: Path, routes: list[Route], key: str | None = None,
            seed: bool = False) -> AdminGuard:
    """A guard in front of `routes`, speaking for server `scorer` of `registry`, which serves base."""
    from humpback.contracts import SERVER_NAME_ENV
    from services.registry import reset_server

    reset_server(registry, "scorer", "scorer", "http://127.0.0.1:1")
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    monkeypatch.setenv(SERVER_NAME_ENV, "scorer")
    monkeypatch.setenv(REJECT_SEED_ENV, "1" if seed else "0")
    if key:
        monkeypatch.setenv("VLLM_API_KEY", key)
    else:
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return AdminGuard(Starlette(routes=routes))


async def test_a_request_without_the_key_learns_nothing(monkeypatch, tmp_path):
    """vLLM's key is checked before the barrier: no 503 naming the version, no version header."""
    from humpback.contracts import VERSION_HEADER

    app = _scorer(monkeypatch, tmp_path / "registry.json", [Route("/v1/chat/completions", echo, methods=["POST"])],
                  key="sekret")
    async with client(app, "203.0.113.9") as c:
        for headers in ({VERSION_HEADER: "ftjob-x"}, {VERSION_HEADER: "base"}, {"Authorization": "Bearer wrong"}):
            resp = await c.post("/v1/chat/completions", json={"model": "scorer"}, headers=headers)
            assert resp.status_code == 401 and resp.json() == {"error": "Unauthorized"}
            assert VERSION_HEADER not in resp.headers and "ftjob" not in resp.text
        ok = await c.post("/v1/chat/completions", json={"model": "scorer"}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.headers[VERSION_HEADER] == "base"
        stale = await c.post("/v1/chat/completions", json={"model": "scorer"},
                             headers={"Authorization": "Bearer sekret", VERSION_HEADER: "ftjob-x"})
        assert stale.status_code == 503


async def test_a_deeply_nested_or_huge_body_is_refused_not_a_500(monkeypatch, tmp_path):
    from services.guard import MAX_BODY_BYTES

    app = _scorer(monkeypatch, tmp_path / "registry.json", [Route("/v1/chat/completions", echo, methods=["POST"])],
                  seed=True)
    async with client(app, "203.0.113.9") as c:
        nested = await c.post("/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000)
        assert nested.status_code == 400 and "nests" in nested.json()["error"]["message"]
        huge = await c.post("/v1/chat/completions", content=b'{"model": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}')
        assert huge.status_code == 413


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions/batch", "/v1/embeddings"])
async def test_every_inference_route_is_behind_the_barrier_and_the_seed_refusal(monkeypatch, tmp_path, path):
    from humpback.contracts import VERSION_HEADER

    app = _scorer(monkeypatch, tmp_path / "registry.json", [Route(path, echo, methods=["POST"])], seed=True)
    async with client(app, "203.0.113.9") as c:
        stale = await c.post(path, json={"model": "scorer", "input": "hi"}, headers={VERSION_HEADER: "ftjob-x"})
        assert stale.status_code == 503 and stale.json()["error"]["code"] == "version_not_served"
        seeded = await c.post(path, json={"model": "scorer", "input": "hi", "seed": 7})
        assert seeded.status_code == 400 and seeded.json()["error"]["param"] == "seed"
        ok = await c.post(path, json={"model": "scorer", "input": "hi"}, headers={VERSION_HEADER: "base"})
        assert ok.status_code == 200 and ok.headers[VERSION_HEADER] == "base"


async def test_an_answer_a_reload_ran_under_is_not_stamped_with_the_old_version(monkeypatch, tmp_path):
    """A request admitted under `base` whose answer comes after a reload passed through the guard: a
    request that named `base` is refused (503, retryable), an unversioned one carries no version; until
    the registry records the swap, the server's version is unknown; then the new one is stamped."""
    import asyncio

    from humpback.contracts import VERSION_HEADER

    registry = tmp_path / "registry.json"
    release = asyncio.Event()

    async def slow(request: Request) -> JSONResponse:
        await release.wait()
        return JSONResponse({"ok": True})

    app = _scorer(monkeypatch, registry, [Route("/v1/completions", slow, methods=["POST"]),
                                          Route("/collective_rpc", echo, methods=["POST"])])
    async with client(app, "127.0.0.1") as c:
        versioned = asyncio.create_task(c.post("/v1/completions", json={}, headers={VERSION_HEADER: "base"}))
        plain = asyncio.create_task(c.post("/v1/completions", json={}))
        await asyncio.sleep(0.2)  # both admitted under base
        assert (await c.post("/collective_rpc", json={"method": "reload_weights"})).status_code == 200
        release.set()
        crossed, unversioned = await versioned, await plain
        assert crossed.status_code == 503 and "changed while the request" in crossed.json()["error"]["message"]
        assert unversioned.status_code == 200 and VERSION_HEADER not in unversioned.headers
        # Reloaded, not recorded yet: nothing is stamped, and no version is served.
        assert VERSION_HEADER not in (await c.post("/v1/completions", json={})).headers
        assert (await c.post("/v1/completions", json={}, headers={VERSION_HEADER: "base"})).status_code == 503
        record_swap(registry, "scorer", "m1", "/ckpt/m1", "reload", "scorer", name="scorer")
        recorded = await c.post("/v1/completions", json={}, headers={VERSION_HEADER: "m1"})
        assert recorded.headers[VERSION_HEADER] == "m1"
