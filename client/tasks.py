"""A task: one kind of request-per-record work, written once for the live fan-out and for OpenAI batch
files alike (as curator's request processors share one request and response type).

A task builds the request of an item (its `custom_id` and chat-completions body, as a batch request
line), parses the answer's body, and makes the journal record from the item and the parsed answer.
`client.runner.run` drives any task over live requests or a batch's results; `augment.AugmentTask`
(segment -> `Candidate`), `curate.ScoreTask` (candidate -> `ScoredCandidate`) and
`likelihood.TermTask` (tokenized prompt and target -> its log-probability) are three of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from humpback.contracts import BatchRequest, Source

Item = TypeVar("Item")
Parsed = TypeVar("Parsed")


class Task(Protocol[Item, Parsed]):
    """Request, parse, record: what one kind of work needs to run online or in a batch.

    `parse` raises `RetryableError` for an answer that may succeed when asked again and
    `RequestFailed` for one that never will; `record` may raise `RequestFailed` too, for an answer
    that its item shows to be unusable.
    """

    def request(self, item: Item) -> BatchRequest: ...

    def parse(self, body: dict[str, Any]) -> Parsed: ...

    def record(self, custom_id: str, item: Item, parsed: Parsed) -> BaseModel: ...


@dataclass(slots=True)
class Job(Generic[Item]):
    """One request of a run: the request, the item it was built from, where the item came from (for
    the failures file), and the input bytes read so far (for progress)."""

    request: BatchRequest
    item: Item
    source: Source | None
    pos: int = 0
