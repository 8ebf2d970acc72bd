"""The client tests' fake server, taught the three things evaluation needs: `/tokenize` with chat
messages, `/v1/completions` with `prompt_logprobs`, and a judge that answers "1" or "2".

Tokens are characters (id = code point); the chat template is `<role>content`, assistant turns end
with `<end>`, and the log-probability of token `t` is `logprob(t)`. The judge prefers the answer that
contains "good"; when both or neither do, it picks the first shown (a maximal position bias).
"""

from __future__ import annotations

import re
from typing import Any

from tests.client.fake_server import FakeServer, _completion, read_json


def logprob(token: int) -> float:
    return -((token % 7) + 1) / 10


def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"<{m['role']}>{m['content']}" + ("<end>" if m["role"] == "assistant" else "") for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


class EvalFake(FakeServer):
    def __init__(self, answer: str = "good answer", max_model_len: int = 2048) -> None:
        super().__init__()
        self.reply = answer
        self.max_model_len = max_model_len

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        if "structured_outputs" in body:
            text = body["messages"][-1]["content"]
            first, second = re.split(r"^# Answer 2$", text.split("# Answer 1", 1)[1], flags=re.M)
            pick = "2" if "good" in second and "good" not in first else "1"
            top = [{"token": c, "logprob": -0.1053605 if c == pick else -2.3025851} for c in ("1", "2")]
            return _completion(pick, logprobs={"content": [{"token": pick, "logprob": -0.1, "top_logprobs": top}]})
        return _completion(self.reply)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in ("/tokenize", "/v1/completions"):
            return await super().__call__(scope, receive, send)
        self.record(scope)
        self.requests[scope["path"]] += 1
        body = await read_json(receive)
        if scope["path"] == "/tokenize":
            ids = [ord(c) for c in render(body["messages"], body.get("add_generation_prompt", True))]
            return await self._send(send, 200, {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})
        ids = body["prompt"]
        plp = [None] + [{str(t): {"logprob": logprob(t), "rank": 1}} for t in ids[1:]]
        return await self._send(send, 200, {"choices": [{"index": 0, "text": "x", "finish_reason": "length",
                                                         "prompt_logprobs": plp}]})
