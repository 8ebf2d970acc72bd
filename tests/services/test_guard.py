"""The admin guard and alias mapping, exercised through real ASGI requests (no vLLM needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from humpback.contracts import ADMIN_ALLOW_ENV, REGISTRY_ENV, REJECT_SEED_ENV
from services.guard import AdminGuard
from services.registry import Registry, record_swap

ROOT = Path(__file__).resolve().parents[2]


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "body": json.loads(body) if body else None,
                         "content_length": request.headers.get("content-length")})


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
    assert Registry.load(registry).roles["backward"].adapters == ["backward-b2"]
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
