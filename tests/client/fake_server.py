"""An in-process fake OpenAI-compatible server (raw ASGI on uvicorn) that can misbehave on demand.

`FakeServer().start()` serves on a free 127.0.0.1 port in a background thread. `script` is a queue of
faults consumed one per chat request ("429", "500", "503", "abort", "length", "drop", "hang",
"empty", "malformed" (list content and non-object top log-probabilities), and two unusable
instructions: "meta", a generic question, and "copy", the end of the
prompt's text); when it is empty, requests succeed. `delay` slows every request. `authorizations`
records the `Authorization` header of every HTTP request (None where it had none), to show who is sent
which key. `python -m
tests.client.fake_server --port N` runs it in its own process (the overhead benchmark).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter, deque
from typing import Any

import uvicorn

Scope = dict[str, Any]


def _completion(content: str, finish: str = "stop", logprobs: Any = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "cmpl-fake", "object": "chat.completion", "model": "fake", "choices": [choice]}



async def read_json(receive: Any) -> Any:
    """The whole ASGI request body, parsed as JSON."""
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return json.loads(b"".join(chunks))

class FakeServer:
    def __init__(self, model: str = "fake", delay: float = 0.0, hang: float = 30.0) -> None:
        self.model = model
        self.delay = delay
        self.hang = hang
        self.script: deque[str] = deque()
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.running = 0
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: Counter[str | None] = Counter()
        self.keep_bodies = False
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The successful answer to a chat request: a digit with log-probabilities, or text."""
        text = body["messages"][-1]["content"]
        if "structured_outputs" in body:
            # A deterministic distribution peaked on a digit taken from the text's length.
            peak = 1 + len(text) % 5
            top = [{"token": str(d), "logprob": (-0.2 if d == peak else -2.5)} for d in range(1, 6)]
            return _completion(str(peak), logprobs={"content": [{"token": str(peak), "logprob": -0.2,
                                                                  "top_logprobs": top}]})
        if "Score: <rating>" in text:
            return _completion(f"The answer is fine.\nScore: {1 + len(text) % 5}")
        return _completion("What does this say: " + " ".join(text.split()[-6:]) + "?")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.record(scope)
        path = scope["path"]
        self.requests[path] += 1
        if path == "/v1/models":
            return await self._send(send, 200, {"data": [{"id": self.model, "root": "/fake/weights"}]})
        if path == "/metrics":
            text = (f'vllm:num_requests_running{{model_name="{self.model}"}} {float(self.running)}\n'
                    f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0.0\n')
            return await self._send(send, 200, text.encode(), "text/plain")
        if path != "/v1/chat/completions":
            return await self._send(send, 404, {"error": "not found"})
        body = await read_json(receive)
        if self.keep_bodies:
            self.bodies.append(body)
        fault = self.script.popleft() if self.script else "ok"
        self.faults[fault] += 1
        self.running += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if fault in ("429", "500", "503"):
                return await self._send(send, int(fault), {"error": fault}, headers=[(b"retry-after", b"0")])
            if fault == "400":
                return await self._send(send, 400, {"error": "bad request"})
            if fault == "hang":
                await asyncio.sleep(self.hang)
            if fault == "drop":  # start a response, then die: the client sees a broken connection
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", b"1000"), (b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"choi', "more_body": True})
                raise ConnectionResetError("dropped on purpose")
            if fault == "malformed":  # a 200 of the right shape at the top, wrong inside
                return await self._send(send, 200, {"choices": [{
                    "message": {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
                    "logprobs": {"content": [{"token": "4", "top_logprobs": ["4", 3]}]}, "finish_reason": "stop"}]})
            if fault == "abort":
                return await self._send(send, 200, _completion("", "abort"))
            if fault == "length":
                return await self._send(send, 200, _completion("What is the meaning of", "length"))
            if fault == "empty":
                return await self._send(send, 200, _completion("   "))
            if fault == "meta":
                return await self._send(send, 200, _completion("How can I help you?"))
            if fault == "copy":
                words = body["messages"][-1]["content"].split()[-20:]
                return await self._send(send, 200, _completion(" ".join(words)))
            return await self._send(send, 200, self.answer(body))
        finally:
            self.running -= 1

    def record(self, scope: Scope) -> None:
        """Note the request's `Authorization` header."""
        value = dict(scope["headers"]).get(b"authorization")
        self.authorizations[value.decode() if value is not None else None] += 1

    @staticmethod
    async def _send(send: Any, status: int, payload: Any, ctype: str = "application/json",
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(data)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": data})

    def start(self, port: int = 0) -> FakeServer:
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        config = uvicorn.Config(self, host="127.0.0.1", port=port, log_level="critical", lifespan="on",
                                backlog=4096, timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def free_port() -> int:
    """A port nothing listens on (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    uvicorn.run(FakeServer(delay=a.delay), host="127.0.0.1", port=a.port, log_level="critical",
                backlog=4096, loop="uvloop", http="httptools")
