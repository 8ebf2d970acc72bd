"""Every on-disk record of humpback: one pydantic model per line format, and the ids that name them.

Seed pairs and corpus documents come from the data builders (`humpback data ...`); segments,
candidates and scored candidates flow through the client (`augment`, `curate`); chat examples are
what the trainer fits (OpenAI fine-tuning JSONL). Every reader of one of these files goes through its
model here, so a field renamed here is renamed for every room at once.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from humpback.contracts.errors import RecordError

M = TypeVar("M", bound=BaseModel)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- ids -----------------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """The dedup key of a text: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def content_id(*parts: Any) -> str:
    """The `custom_id` of a request: 128 bits of a hash over the exact JSON of everything that
    determines its answer (text, prompt, model, sampling parameters). Exact, so a changed prompt or
    parameter is new work."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def text_id(*parts: str) -> str:
    """The id of a human-written record (a seed pair): 64 bits of a hash over its *normalised* text,
    so the same pair gets the same id in every build whatever its spacing or punctuation, and the
    held-out split (drawn from the id) never reshuffles."""
    h = hashlib.sha256("\x1f".join(normalize(p) for p in parts).encode("utf-8"))
    return h.hexdigest()[:16]


# --- human data: seed pairs and unlabelled documents ----------------------------------------------


class SeedPair(_Record):
    """One human-written (instruction, response) pair: a line of `seed.jsonl` / `heldout.jsonl`."""

    id: str
    instruction: str
    response: str
    source: str
    license: str

    @field_validator("instruction", "response", "source", "license")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        return v

    @classmethod
    def make(cls, instruction: str, response: str, source: str, license: str) -> SeedPair:
        instruction, response = instruction.strip(), response.strip()
        return cls(id=text_id(instruction, response), instruction=instruction, response=response,
                   source=source, license=license)


class CorpusDoc(_Record):
    """One unlabelled document (a section with its subsections): a line of `corpus.jsonl`."""

    text: str
    source: str
    title: str
    license: str
    path: str


class ParseFailure(_Record):
    """A source file the data builders could not use; the build records it and goes on."""

    source: str
    file: str
    reason: str


# --- the client's records: segments, candidates, scores --------------------------------------------


class Source(_Record):
    """Where a segment came from: file, 1-based line (first line of a paragraph, row of a Parquet file),
    the segment's index within that document, and the record's other fields."""

    path: str
    line: int
    segment: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)


class Segment(_Record):
    """One unlabelled text segment, ready to be backtranslated."""

    text: str
    source: Source


class Candidate(_Record):
    """One self-augmentation result: the instruction M_yx wrote for a segment (the output).

    Also what `curate` reads: any JSONL whose lines carry `instruction` and `output` strings is a
    candidates file (`custom_id` and `source` are then derived from the line).
    """

    custom_id: str
    instruction: str
    output: str
    source: Source
    model: str
    checkpoint: str | None = None
    finish_reason: str | None = None


class RewrittenCandidate(Candidate):
    """A candidate whose output an aligned model rewrote (`humpback rewrite`): `output` is the rewrite,
    `original_output` the text it was rewritten from; `model`/`checkpoint` name the rewriter and
    `candidate_id` the candidate it came from. A candidates file like any other: curate scores it."""

    candidate_id: str
    original_output: str


class ScoredCandidate(_Record):
    """A candidate with the scorer's verdict: a line of the scored journal.

    `score` is the expected score over the digits in log-probability mode, the parsed rating in
    free-text mode, and None when the free-text answer stated no score; for a likelihood scorer
    (`mode` pmi, reverse_pmi or combined: `client.likelihood`) it is the scorer's signal, or P(good
    pair) for combined, and `signals` holds every signal computed for the pair.
    """

    custom_id: str
    candidate_id: str
    instruction: str
    output: str
    source: Source
    mode: Literal["logprobs", "free_text", "pmi", "reverse_pmi", "combined"]
    score: float | None
    distribution: dict[str, float] | None = None
    signals: dict[str, float] | None = None
    raw: str | None = None
    scorer_model: str
    scorer_checkpoint: str | None = None


class Rejected(_Record):
    """A record the run set aside, with where it came from and why: one line of an errors file."""

    source: str
    line: int
    reason: str
    field: str | None = None
    excerpt: str | None = None


class Failure(_Record):
    """A request that failed after its retries (or produced no usable answer); retried on re-run."""

    custom_id: str
    source: Source | None = None
    reason: str
    attempts: int


# --- score bands ----------------------------------------------------------------------------------

# The bands every summary and plot counts scores in; the last one is the paper's A_5 ("score >= 4.5").
SCORE_BANDS: tuple[tuple[float, float], ...] = ((1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 4.5), (4.5, 5.0))
BAND_LABELS: tuple[str, ...] = (*(f"[{lo:g},{hi:g})" for lo, hi in SCORE_BANDS[:-1]),
                                f"[{SCORE_BANDS[-1][0]:g},{SCORE_BANDS[-1][1]:g}]")
UNPARSED = "unparsed"


def band_of(score: float | None) -> str:
    """The band label of a score (`unparsed` for a free-text answer that stated none)."""
    if score is None:
        return UNPARSED
    for (_, hi), label in zip(SCORE_BANDS[:-1], BAND_LABELS):
        if score < hi:
            return label
    return BAND_LABELS[-1]


# --- chat examples: what the trainer fits -----------------------------------------------------------


class ChatMessage(_Record):
    """One message of an OpenAI chat-format record."""

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("content is empty")
        return v


class ChatExample(_Record):
    """One line of an OpenAI fine-tuning file: `{"messages": [...]}`.

    Optional system message first, then alternating user/assistant turns ending with the assistant:
    the last assistant message is the training target (loss on the response only).
    """

    messages: list[ChatMessage] = Field(min_length=2)

    @field_validator("messages")
    @classmethod
    def _well_formed(cls, msgs: list[ChatMessage]) -> list[ChatMessage]:
        turns = msgs[1:] if msgs[0].role == "system" else msgs
        if len(turns) < 2:
            raise ValueError("needs at least one user message and one assistant message")
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise ValueError(f"message {i + (len(msgs) - len(turns))} has role {m.role!r}, expected {expected!r}")
        if turns[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's")
        return msgs

    def prompt_completion(self) -> dict[str, list[dict[str, str]]]:
        """The conversational prompt-completion row TRL trains on with loss on the completion only."""
        msgs = [m.model_dump() for m in self.messages]
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def read_jsonl(path: str | Path, model: type[M]) -> list[M]:
    """Every record of a JSONL file the project wrote itself (blank lines skipped), through its model:
    a line that does not fit raises, naming the field."""
    with Path(path).open(encoding="utf-8") as f:
        return [model.model_validate_json(line) for line in f if line.strip()]


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line, value) of each line of a JSONL file a user gives (blank lines skipped, a UTF-8 BOM
    read as none); a line that is not JSON raises `RecordError` naming the file and line."""
    with Path(path).open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as exc:
                raise RecordError(path, lineno, f"invalid JSON ({exc}); fix the line or remove it") from None


def read_pairs(path: str | Path) -> Iterator[tuple[int, str, str]]:
    """(line, instruction, response) of each line of a file of human pairs: JSONL whose lines carry
    non-empty `instruction` and `response` strings (`output` is read for `response`; other fields are
    ignored), such as humpback's `seed.jsonl` and `heldout.jsonl`. Blank lines are skipped; any other
    line that is no such pair raises `RecordError` naming the file and line."""
    for lineno, obj in json_lines(path):
        x, y = (obj.get("instruction"), obj.get("response", obj.get("output"))) if isinstance(obj, dict) else (None, None)
        if not (isinstance(x, str) and x.strip() and isinstance(y, str) and y.strip()):
            raise RecordError(path, lineno, "not a pair with non-empty strings 'instruction' and 'response'")
        yield lineno, x, y


def write_jsonl(path: Path, records: Iterable[BaseModel]) -> int:
    """Write `records` to `path`, one JSON object per line, through a temporary file and a rename
    (a reader never sees half a file); the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(rec.model_dump_json() + "\n")
            n += 1
    tmp.replace(path)
    return n


class PreferencePair(_Record):
    """A chosen/rejected pair in TRL's conversational preference format (`prompt`, `chosen`,
    `rejected`, each a message list: `DPOTrainer` reads it as it is), from two scored responses to
    one instruction (`humpback export dpo`). `margin` = `score_chosen` - `score_rejected`; the ids
    are the scored records' `candidate_id`s."""

    prompt: list[ChatMessage]
    chosen: list[ChatMessage]
    rejected: list[ChatMessage]
    score_chosen: float
    score_rejected: float
    margin: float
    chosen_id: str
    rejected_id: str

