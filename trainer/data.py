"""Data builders: seed pairs into OpenAI fine-tuning JSONL for the forward and the backward model.

The tags are applied here, never inside the trainer: the trainer fits whatever messages it is
given. The curated augmented set (tagged S_w) is built by the client.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from services.contracts import SEED_SYSTEM_PROMPT, ChatExample, backward_example, tagged_example

Pair = tuple[str, str]  # (instruction, response)


def seed_forward_examples(pairs: Iterable[Pair]) -> list[ChatExample]:
    """Seed pairs for M0 / M_t: instruction -> response, tagged S_a (paper §2.3)."""
    return [tagged_example(instruction, response, SEED_SYSTEM_PROMPT) for instruction, response in pairs]


def seed_backward_examples(pairs: Iterable[Pair]) -> list[ChatExample]:
    """Reversed seed pairs for M_yx: response -> instruction, in the prompt the client uses at inference."""
    return [backward_example(instruction, response) for instruction, response in pairs]


def write_jsonl(examples: Iterable[ChatExample], path: Path) -> Path:
    """One `{"messages": [...]}` per line, the format `POST /v1/files` accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(example.model_dump_json() + "\n")
    return path
