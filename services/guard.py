"""ASGI middleware that humpback loads into every vLLM server (`--middleware services.guard.AdminGuard`).

vLLM's `--api-key` guards only the `/v1` routes; with `VLLM_SERVER_DEV_MODE=1` (needed for weight
reloads) the server also exposes `/collective_rpc`, `/pause`, `/sleep` and friends to anyone who can
reach its port. The guard closes that: only the public inference routes below answer every client;
everything else answers only loopback clients and the networks named in `HUMPBACK_ADMIN_ALLOW`
(comma-separated CIDRs, e.g. compose's internal subnet). A v4-mapped address (`::ffff:127.0.0.1`, what
a server bound dual-stack on `::` sees) counts as its IPv4 address. An admin request that carries a
forwarding header (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`) is refused whoever sent it: it came
through a proxy, and a proxy on the host would make any client look like loopback. (The launcher also
empties uvicorn's `FORWARDED_ALLOW_IPS`, so no peer can rewrite the client address the guard reads.)
Websocket handshakes pass the same checks: a refused one is closed before it is accepted.

It also maps the model aliases recorded in the registry (`HUMPBACK_REGISTRY`, read through
`services.registry`), so a fine-tuned model's name is requestable right after its weights were
swapped into the role's server, and, on CPU servers (`HUMPBACK_REJECT_SEED=1`), refuses per-request
`seed`s: vLLM 0.32's CPU engine dies on one when the prompt is prefilled in chunks (a torch CPU
generator has no offset to rewind), taking every other request with it.

And it holds the version barrier of a role served by several replicas (`services.hotswap.swap_role`).
It knows its own server (`HUMPBACK_SERVER_NAME`, set by the launcher) and answers an inference request
with 503 `version_not_served` (retryable: a client with the other replicas as endpoints sends it
there) when the request names, in `X-Humpback-Version`, a version this server does not serve, or a
model name another replica of its role answers to but this one does not yet. Every answer it lets
through carries `X-Humpback-Version`: the version that served it.

It runs inside the vLLM server, so it imports only starlette (vLLM's own), pydantic and humpback's
light modules (`humpback.contracts`, `services.registry`).
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from humpback.contracts import (
    ADMIN_ALLOW_ENV, REGISTRY_ENV, REJECT_SEED_ENV, SERVER_NAME_ENV, VERSION_HEADER, VERSION_NOT_SERVED,
)
from services.registry import Registry, ServedVersion

PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/tokenize", "/detokenize"})
# `/v1` is public except the routes that change what the server serves.
PRIVATE_V1_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ALIASED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
VERSION_KEY = VERSION_HEADER.lower().encode()


def is_public(path: str) -> bool:
    if path in PUBLIC_PATHS:
        return True
    return path.startswith("/v1/") and path not in PRIVATE_V1_PATHS


def _allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    for item in os.environ.get(ADMIN_ALLOW_ENV, "").split(","):
        if item.strip():
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
    return nets


class _ServedView:
    """What this server's guard reads from the registry, re-read only when the file changes: its own
    entry (`name`, from HUMPBACK_SERVER_NAME), the names it maps to its role's weights, and the names
    another replica of its role answers to but it does not yet (a swap under way)."""

    def __init__(self, path: Path | None, name: str | None) -> None:
        self.path = path
        self.name = name
        self._stamp: tuple[int, int] | None = None
        self.own: ServedVersion | None = None
        self.table: dict[str, str] = {}
        self.pending: frozenset[str] = frozenset()

    def refresh(self) -> _ServedView:
        if self.path is None:
            return self
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.own, self.table, self.pending, self._stamp = None, {}, frozenset(), None
            return self
        # The registry is replaced by rename: a new inode means a new version, whatever the clock.
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self._stamp:
            reg = Registry.load(self.path)
            self.own = reg.servers.get(self.name) if self.name else None
            # A guard that does not know its server (run outside the launcher) maps every alias.
            self.table = reg.aliases(self.name if self.own else None)
            mine = set(self.own.aliases + self.own.adapters) if self.own else set()
            siblings = reg.of_role(self.own.role).values() if self.own else ()
            self.pending = frozenset(n for v in siblings for n in v.aliases + v.adapters) - mine
            self._stamp = stamp
        return self


class AdminGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.networks = _allowed_networks()
        registry = os.environ.get(REGISTRY_ENV)
        self.served = _ServedView(Path(registry) if registry else None, os.environ.get(SERVER_NAME_ENV) or None)
        self.reject_seed = os.environ.get(REJECT_SEED_ENV) == "1"

    def client_allowed(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client:
            return False
        try:
            addr = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not is_public(path):
            # ASGI header names are lower-case bytes.
            forwarded = sorted({name.decode() for name, _ in scope["headers"] if name in FORWARDING_HEADERS})
            if forwarded:
                await _forbid(scope, send, f"{path} is an admin route and this request came through a proxy "
                                           f"({', '.join(forwarded)}): send it to the server directly from the "
                                           "host or its internal network")
                return
            if not self.client_allowed(scope):
                await _forbid(scope, send, f"{path} is an admin route, reachable only from the host or its "
                                           "internal network")
                return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST" and path in ALIASED_PATHS:
            served = self.served.refresh()
            wanted = next((v.decode("latin-1") for k, v in scope["headers"] if k == VERSION_KEY), None)
            if wanted is not None and (served.own is None or wanted != served.own.version):
                await _not_served(send, served.own, f"the request asks for version {wanted!r}")
                return
            if served.table or served.pending or self.reject_seed:
                body, receive = await _read_body(receive)
                if body is not None:
                    try:
                        payload = json.loads(body)
                    except ValueError:
                        payload = None  # vLLM answers malformed JSON itself
                    if isinstance(payload, dict):
                        if self.reject_seed and payload.get("seed") is not None:
                            await _send_json(send, 400, {"error": {"message": "per-request `seed` is refused on this CPU server: vLLM's CPU engine crashes on it; leave `seed` out", "type": "invalid_request_error", "param": "seed", "code": 400}})
                            return
                        model = payload.get("model")
                        if not isinstance(model, str):
                            pass  # vLLM answers a model that is no name itself
                        elif model in served.table:
                            payload["model"] = served.table[model]
                            body = json.dumps(payload).encode()
                            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
                        elif model in served.pending:
                            await _not_served(send, served.own, f"model {model!r} is not served here yet")
                            return
                    receive = _replay([{"type": "http.request", "body": body, "more_body": False}], then=receive)
            if served.own is not None:
                send = _stamped(send, served.own.version)
        await self.app(scope, receive, send)


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole request body, or None (with the message replayed) when the client went away."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, _replay([message])
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), receive


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def _stamped(send: Send, version: str) -> Send:
    """`send` that names, on the response, the version this server served when it took the request."""
    header = (VERSION_KEY, version.encode("latin-1", "replace"))

    async def stamped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return stamped


async def _not_served(send: Send, own: ServedVersion | None, why: str) -> None:
    """503, retryable elsewhere: another replica of the role serves what the request names (a swap is
    under way), so a client with several endpoints sends it there (client.fanout) and others retry."""
    serving = f"this server serves version {own.version!r}" if own else "this server is not in the registry"
    body = json.dumps({"error": {"message": f"{why}; {serving}", "type": "service_unavailable",
                                 "code": VERSION_NOT_SERVED}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1")]
    if own is not None:
        headers.append((VERSION_KEY, own.version.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _forbid(scope: Scope, send: Send, message: str) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting is how ASGI refuses a handshake: the server answers it with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await _send_json(send, 403, {"error": {"message": message, "type": "forbidden", "code": 403}})


async def _send_json(send: Send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
