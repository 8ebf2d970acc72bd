"""OpenAI's batch JSONL lines (what `vllm run-batch` and hosted batch APIs read and write).

A request line is `{"custom_id", "method": "POST", "url", "body"}`; a result line is
`{"custom_id", "response": {"status_code", "body"}, "error"}`, matched back to its request by
`custom_id`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from humpback.contracts.defaults import CHAT_PATH


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str
    method: Literal["POST"] = "POST"
    url: str = CHAT_PATH
    body: dict[str, Any]


class BatchResponse(BaseModel):
    status_code: int
    request_id: str | None = None
    body: dict[str, Any] | None = None


class BatchResult(BaseModel):
    """One line of a batch output file; `error` is set when the request was not answered."""

    id: str | None = None
    custom_id: str
    response: BatchResponse | None = None
    error: Any = None

    def failure(self) -> str | None:
        """Why this result holds no usable answer, or None when it does."""
        if self.error:
            return f"batch error: {self.error}"
        if self.response is None or self.response.status_code != 200:
            return f"batch error: {self.response.status_code if self.response else None}"
        return None
