"""What the data builders' parsers share: a parsed document's headed section, and the seeded draw
that splits pairs into seed and held-out. The records they write (`SeedPair`, `CorpusDoc`,
`ParseFailure`) are contracts: `humpback.contracts.records`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def split_bucket(record_id: str, purpose: str = "heldout") -> float:
    """A uniform number in [0, 1) fixed by the id, for a held-out split that never reshuffles;
    each `purpose` draws independently (subsampling must not pick the held-out pairs first)."""
    return int(hashlib.sha256(f"{purpose}:{record_id}".encode("ascii")).hexdigest()[:8], 16) / 2**32


@dataclass
class Section:
    """One headed section of a parsed document; `body` is plain text, code indented four spaces."""

    level: int
    title: str
    body: str
