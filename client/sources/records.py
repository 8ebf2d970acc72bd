"""The records the data builders write: seed pairs, corpus documents, and parse failures.

A `SeedPair` is what `seed.jsonl` / `heldout.jsonl` hold; the chat format it becomes for training
lives in `services.contracts` (`tagged_example`, `backward_example`) and is not repeated here.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, field_validator

from services.contracts import SEED_SYSTEM_PROMPT, ChatExample, backward_example, tagged_example

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """The dedup key of a text: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def content_id(*parts: str) -> str:
    """A stable id from content: the same pair gets the same id in every build."""
    h = hashlib.sha256("\x1f".join(normalize(p) for p in parts).encode("utf-8"))
    return h.hexdigest()[:16]


def split_bucket(record_id: str, purpose: str = "heldout") -> float:
    """A uniform number in [0, 1) fixed by the id, for a held-out split that never reshuffles;
    each `purpose` draws independently (subsampling must not pick the held-out pairs first)."""
    return int(hashlib.sha256(f"{purpose}:{record_id}".encode("ascii")).hexdigest()[:8], 16) / 2**32


class SeedPair(BaseModel):
    """One human-written (instruction, response) pair of the seed set."""

    model_config = ConfigDict(extra="forbid")

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
        return cls(id=content_id(instruction, response), instruction=instruction, response=response,
                   source=source, license=license)

    def as_tuple(self) -> tuple[str, str]:
        """The (instruction, response) tuple `trainer.data.seed_*_examples` take."""
        return self.instruction, self.response

    def forward_example(self, system: str | None = SEED_SYSTEM_PROMPT) -> ChatExample:
        return tagged_example(self.instruction, self.response, system)

    def backward_example(self) -> ChatExample:
        return backward_example(self.instruction, self.response)


class CorpusDoc(BaseModel):
    """One unlabelled document (a section with its subsections): a line of `corpus.jsonl`."""

    model_config = ConfigDict(extra="forbid")

    text: str
    source: str
    title: str
    license: str
    path: str


class ParseFailure(BaseModel):
    """A file that could not be used; the build records it and goes on."""

    model_config = ConfigDict(extra="forbid")

    source: str
    file: str
    reason: str


@dataclass
class Section:
    """One headed section of a parsed document; `body` is plain text, code indented four spaces."""

    level: int
    title: str
    body: str
