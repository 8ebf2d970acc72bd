"""What the data builders' parsers share: a parsed document's headed section, and the seeded draws
that split pairs into seed and held-out and cap the seed. The records they write (`SeedPair`, `CorpusDoc`,
`ParseFailure`) are contracts: `humpback.contracts.records`."""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass

from humpback.contracts import SeedPair


def split_bucket(record_id: str, purpose: str = "heldout") -> float:
    """A uniform number in [0, 1) fixed by the id, for a held-out split that never reshuffles;
    each `purpose` draws independently (subsampling must not pick the held-out pairs first)."""
    return int(hashlib.sha256(f"{purpose}:{record_id}".encode("utf-8")).hexdigest()[:8], 16) / 2**32


def cap_seed(seed: list[SeedPair], max_seed: int | None) -> tuple[list[SeedPair], list[SeedPair]]:
    """(kept, rest), each in input order: at most `max_seed` pairs, those of smallest id hash (a draw
    independent of the held-out split, so every source stays represented); None keeps them all."""
    if max_seed is None or len(seed) <= max_seed:
        return seed, []
    chosen = {p.id for p in heapq.nsmallest(max_seed, seed, key=lambda p: split_bucket(p.id, "subsample"))}
    return [p for p in seed if p.id in chosen], [p for p in seed if p.id not in chosen]


@dataclass
class Section:
    """One headed section of a parsed document; `body` is plain text, code indented four spaces."""

    level: int
    title: str
    body: str
