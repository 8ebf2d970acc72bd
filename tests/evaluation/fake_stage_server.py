"""The evaluation fake taught to play the backward model and the scorer with known answers.

As backward model it answers each backward prompt with `write(prompt)`; as scorer (a request with
`structured_outputs`) it puts all the probability on the digit `rate(prompt)`, so the expected score
is that digit. Tokens, the chat template and log-probabilities are `EvalFake`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.client.fake_server import _completion
from tests.evaluation.fake_eval_server import EvalFake


class StageFake(EvalFake):
    def __init__(self, write: Callable[[str], str] = lambda prompt: "What is this?",
                 rate: Callable[[str], int] = lambda prompt: 3) -> None:
        super().__init__()
        self.write = write
        self.rate = rate

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["messages"][-1]["content"]
        if "structured_outputs" not in body:
            return _completion(self.write(prompt))
        digit = str(self.rate(prompt))
        top = [{"token": str(d), "logprob": 0.0 if str(d) == digit else -30.0} for d in range(1, 6)]
        return _completion(digit, logprobs={"content": [{"token": digit, "logprob": 0.0, "top_logprobs": top}]})
