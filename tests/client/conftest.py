"""Client-only fixtures: the fake server and small corpora."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.fake_server import FakeServer

DATA = Path(__file__).parent / "data"


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer().start()
    yield server
    server.stop()


def make_text(i: int, chars: int = 900) -> str:
    """A distinct, non-repetitive prose segment of about `chars` characters."""
    words = []
    n = i
    k = 0
    while sum(len(w) + 1 for w in words) < chars:
        k += 1
        n = (n * 1103515245 + 12345) % (2 ** 31)
        words.append(f"w{n % 9973}x{k}")
        if k % 9 == 0:
            words[-1] += "."
    return f"Segment {i}: " + " ".join(words) + "."


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """30 valid JSONL records of distinct prose."""
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": make_text(i), "id": i}) + "\n" for i in range(30)))
    return p

