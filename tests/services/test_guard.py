"""The admin guard and alias mapping, exercised through real ASGI requests (no vLLM needed)."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.guard import AdminGuard
from services.registry import record_swap


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "body": json.loads(body) if body else None,
                         "content_length": request.headers.get("content-length")})


def make_app(monkeypatch: pytest.MonkeyPatch, registry=None, allow: str = "") -> AdminGuard:
    monkeypatch.setenv("HUMPBACK_ADMIN_ALLOW", allow)
    if registry is not None:
        monkeypatch.setenv("HUMPBACK_REGISTRY", str(registry))
    else:
        monkeypatch.delenv("HUMPBACK_REGISTRY", raising=False)
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


async def test_seed_refused_on_cpu_servers(monkeypatch):
    monkeypatch.setenv("HUMPBACK_REJECT_SEED", "1")
    app = make_app(monkeypatch)
    async with client(app, "127.0.0.1") as c:
        resp = await c.post("/v1/chat/completions", json={"model": "backward", "messages": [], "seed": 3})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "seed"
        ok = await c.post("/v1/chat/completions", json={"model": "backward", "messages": [], "seed": None})
        assert ok.status_code == 200 and ok.json()["body"]["model"] == "backward"
    monkeypatch.setenv("HUMPBACK_REJECT_SEED", "0")
    app = make_app(monkeypatch)
    async with client(app, "127.0.0.1") as c:
        resp = await c.post("/v1/completions", json={"model": "backward", "prompt": "x", "seed": 3})
        assert resp.status_code == 200 and resp.json()["body"]["seed"] == 3
