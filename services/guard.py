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
through carries `X-Humpback-Version`: the version that served it (none when it does not know one:
a reload ran while the request did, or has not been recorded yet). The barrier covers every
inference route (`/v1/*` and vLLM's root ones), and vLLM's API key is checked first, so a client
without it gets vLLM's 401 and no version. It reads at most MAX_BODY_BYTES of a body.

It runs inside the vLLM server, so it imports only starlette (vLLM's own), pydantic and humpback's
light modules (`humpback.contracts`, `services.registry`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from humpback.contracts import (
    ADMIN_ALLOW_ENV, REGISTRY_ENV, REJECT_SEED_ENV, SERVER_NAME_ENV, VERSION_HEADER, VERSION_NOT_SERVED, bearer,
)
from services.registry import Registry, ServedVersion

PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/tokenize", "/detokenize"})
# `/v1` is public except the routes that change what the server serves.
PRIVATE_V1_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
# Inference routes outside `/v1` (admin-only here, as every non-public route): vLLM 0.32 answers
# generation and pooling requests on these too, so the barrier and the seed refusal cover them.
# `/tokenize` too: a checkpoint brings its own tokenizer and chat template, and the likelihood scorers and
# `eval nll` render their prompts there through a client that requires every answer's version stamp.
ROOT_INFERENCE_PATHS = frozenset({"/invocations", "/pooling", "/classify", "/score", "/rerank", "/tokenize",
                                  "/detokenize"})
# The admin route that replaces the weights (`reload_weights`): while one runs the guard no longer
# trusts its registry entry, and a request it spans crossed a swap.
RELOAD_PATH = "/collective_rpc"
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
VERSION_KEY = VERSION_HEADER.lower().encode()
# The largest request body the guard reads (to map an alias, refuse a seed): far above any prompt a
# 2048-token model takes, and a bound on what one request may make the server hold.
MAX_BODY_BYTES = 32 << 20
# vLLM's own key (the launcher puts it in the server's environment, not on its command line).
VLLM_API_KEY_ENV = "VLLM_API_KEY"


def is_public(path: str) -> bool:
    if path in PUBLIC_PATHS:
        return True
    return path.startswith("/v1/") and path not in PRIVATE_V1_PATHS


def is_inference(path: str) -> bool:
    """A route whose answer depends on the weights: the barrier, the aliases and the seed refusal apply."""
    return (path.startswith("/v1/") and is_public(path)) or path in ROOT_INFERENCE_PATHS


def _allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    for item in os.environ.get(ADMIN_ALLOW_ENV, "").split(","):
        if item.strip():
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
    return nets


class _ServedView:
    """What this server's guard reads from the registry, re-read only when the file changes: its own
    entry (`name`, from HUMPBACK_SERVER_NAME), the names it maps to its role's weights, and the names
    another replica of its role answers to but it does not yet (a swap under way).

    It also follows the reloads that pass through the guard: `generation` changes when one starts and
    when it ends (a request that sees two generations crossed a swap), and from a reload's start until
    the registry is next written (`swap_checkpoint` records the new version, or rewrites the old one
    after a failure) the entry's version is not trusted: `version` is None."""

    def __init__(self, path: Path | None, name: str | None) -> None:
        self.path = path
        self.name = name
        self._stamp: tuple[int, int] | None = None
        self.own: ServedVersion | None = None
        self.table: dict[str, str] = {}
        self.pending: frozenset[str] = frozenset()
        self.generation = 0
        self.reloading = 0
        self._unsettled = False
        self._settled_after: tuple[int, int] | None = None  # the registry as it was when the last reload ended

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat() if self.path is not None else None
        except FileNotFoundError:
            return None
        # The registry is replaced by rename: a new inode means a new version, whatever the clock.
        return (st.st_ino, st.st_mtime_ns) if st is not None else None

    @property
    def version(self) -> str | None:
        """The version this server serves, or None: not in the registry, or its weights being replaced."""
        return self.own.version if self.own is not None and not self._unsettled else None

    def begin_reload(self) -> None:
        self.generation += 1
        self.reloading += 1
        self._unsettled = True

    def end_reload(self) -> None:
        self.generation += 1
        self.reloading -= 1
        self._settled_after = self._file_stamp()

    def refresh(self) -> _ServedView:
        if self.path is None:
            return self
        stamp = self._file_stamp()
        if self._unsettled and not self.reloading and stamp != self._settled_after:
            self._unsettled = False
        if stamp is None:
            self.own, self.table, self.pending, self._stamp = None, {}, frozenset(), None
            return self
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
        key = os.environ.get(VLLM_API_KEY_ENV)
        self.authorization = bearer(key).encode() if key else None

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

    def authorized(self, scope: Scope, path: str) -> bool:
        """vLLM's own key check (`--api-key` guards `/v1`, OPTIONS exempt), done first: a client without
        the key learns nothing from the guard, not even which version is served."""
        if self.authorization is None or not path.startswith("/v1") or scope.get("method") == "OPTIONS":
            return True
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.authorization)

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
        if not self.authorized(scope, path):
            await _send_json(send, 401, {"error": "Unauthorized"})  # vLLM's own answer
            return
        if scope.get("method") == "POST" and path == RELOAD_PATH:
            self.served.begin_reload()
            try:
                await self.app(scope, receive, send)
            finally:
                self.served.end_reload()
            return
        if scope.get("method") == "POST" and is_inference(path):
            await self._inference(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _inference(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The version barrier, the aliases and the seed refusal, then the request, its answer stamped."""
        served = self.served.refresh()
        version, generation = served.version, served.generation
        wanted = next((v.decode("latin-1") for k, v in scope["headers"] if k == VERSION_KEY), None)
        if wanted is not None and wanted != version:
            await _not_served(send, version, f"the request asks for version {wanted!r}")
            return
        if served.table or served.pending or self.reject_seed:
            try:
                body, receive = await _read_body(receive)
            except _TooLarge:
                await _send_json(send, 413, _error(f"the request body is over {MAX_BODY_BYTES >> 20} MiB", 413))
                return
            if body is not None:
                try:
                    payload = json.loads(body)
                except RecursionError:
                    await _send_json(send, 400, _error("the request body nests JSON too deeply", 400))
                    return
                except ValueError:
                    payload = None  # vLLM answers malformed JSON itself
                if isinstance(payload, dict):
                    if self.reject_seed and payload.get("seed") is not None:
                        await _send_json(send, 400, _error("per-request `seed` is refused on this CPU server: vLLM's "
                                                           "CPU engine crashes on it; leave `seed` out", 400, "seed"))
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
                        await _not_served(send, version, f"model {model!r} is not served here yet")
                        return
                receive = _replay([{"type": "http.request", "body": body, "more_body": False}], then=receive)
        await self.app(scope, receive, self._stamped(send, version, generation, wanted))

    def _stamped(self, send: Send, version: str | None, generation: int, wanted: str | None) -> Send:
        """`send` that names, on the answer, the version that served it, when one did: an answer whose
        request a reload spanned (a swap, or a rollback) came from two versions. Such an answer carries
        no version; where the request named one, it is refused instead (503, retryable), or, a stream
        already started, ended early, so that no client that requires a version accepts it."""
        cut = False

        async def stamped(message: Message) -> None:
            nonlocal cut
            if cut:
                return
            crossed = self.served.generation != generation
            if message["type"] == "http.response.start":
                if crossed and wanted is not None:
                    cut = True
                    await _not_served(send, None, f"the server's weights changed while the request for version "
                                                  f"{wanted!r} ran")
                    return
                if version is not None and not crossed:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (VERSION_KEY, version.encode("latin-1", "replace"))]}
            elif message["type"] == "http.response.body" and crossed and wanted is not None:
                cut = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        return stamped


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole request body, or None (with the message replayed) when the client went away;
    `_TooLarge` past MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, _replay([message])
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            raise _TooLarge
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


async def _not_served(send: Send, version: str | None, why: str) -> None:
    """503, retryable elsewhere: another replica of the role serves what the request names (a swap is
    under way), so a client with several endpoints sends it there (client.fanout) and others retry."""
    serving = (f"this server serves version {version!r}" if version is not None
               else "this server's version is not known (not in the registry, or its weights are being replaced)")
    body = json.dumps({"error": {"message": f"{why}; {serving}", "type": "service_unavailable",
                                 "code": VERSION_NOT_SERVED}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1")]
    if version is not None:
        headers.append((VERSION_KEY, version.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _forbid(scope: Scope, send: Send, message: str) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting is how ASGI refuses a handshake: the server answers it with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await _send_json(send, 403, {"error": {"message": message, "type": "forbidden", "code": 403}})


def _error(message: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


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
