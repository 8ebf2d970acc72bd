"""The client's on-disk records: one pydantic model per line format, one source of truth each.

Every output file is JSONL and every line carries a `custom_id`: a content hash of everything that
determines the answer (the text, the prompt contract, the sampling parameters, the model), so a
re-run recognises finished work and a batch API's answers can be matched back to their requests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Source(BaseModel):
    """Where a segment came from: file, 1-based line (first line of a paragraph, row of a Parquet file),
    the segment's index within that document, and the record's other fields."""

    model_config = ConfigDict(extra="forbid")

    path: str
    line: int
    segment: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)


class Segment(BaseModel):
    """One unlabelled text segment, ready to be backtranslated."""

    model_config = ConfigDict(extra="forbid")

    text: str
    source: Source


class Candidate(BaseModel):
    """One self-augmentation result: the instruction M_yx wrote for a segment (the output)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    instruction: str
    output: str
    source: Source
    model: str
    checkpoint: str | None = None
    finish_reason: str | None = None


class ScoredCandidate(BaseModel):
    """A candidate with the scorer's verdict.

    `score` is the expected score over the digits in log-probability mode, the parsed rating in
    free-text mode, and None when the free-text answer stated no score.
    """

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    candidate_id: str
    instruction: str
    output: str
    source: Source
    mode: str
    score: float | None
    distribution: dict[str, float] | None = None
    raw: str | None = None
    scorer_model: str
    scorer_checkpoint: str | None = None


class Rejected(BaseModel):
    """A record the run set aside, with where it came from and why: one line of an errors file."""

    model_config = ConfigDict(extra="forbid")

    source: str
    line: int
    reason: str
    field: str | None = None
    excerpt: str | None = None


class Failure(BaseModel):
    """A request that failed after its retries (or produced no usable answer); retried on re-run."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    source: Source | None = None
    reason: str
    attempts: int


def content_id(*parts: Any) -> str:
    """A stable 128-bit hex id of JSON-serialisable parts (the run's `custom_id`)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]
