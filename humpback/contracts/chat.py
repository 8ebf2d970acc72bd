"""The bodies humpback POSTs to an OpenAI-compatible (vLLM) server, each defined once: a chat
completion (`ChatRequest`: augment, curate's rubric, rewrite, the evaluations' answers and the
pairwise judge), a completion that returns the prompt's log-probabilities (`PromptLogprobsRequest`:
the likelihood scorers and `eval nll`), and a chat rendered to token ids (`TokenizeRequest`).

`body()` is the JSON the server receives: unset fields are left out, so a server that refuses one
(CPU vLLM refuses a per-request `seed`) never sees it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ChatRequest(_Body):
    """`POST /v1/chat/completions`, with the fields humpback sets."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    # The top log-probabilities of the (one) answer token: the rubric's expected score, the judge's P(1 better).
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    # vLLM's constrained decoding, e.g. {"choice": ["1", "2"]}: every answer is one of the choices.
    structured_outputs: dict[str, Any] | None = None


class PromptLogprobsRequest(_Body):
    """`POST /v1/completions` over token ids that returns the log-probability of every prompt token
    (one prefill; the one generated token is ignored)."""

    model: str
    prompt: list[int]
    max_tokens: int = 1
    temperature: float = 0.0
    prompt_logprobs: int = 0


class TokenizeRequest(_Body):
    """vLLM's `POST /tokenize` of a conversation by the server's chat template."""

    model: str
    messages: list[dict[str, str]]
    add_generation_prompt: bool
