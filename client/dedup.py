"""Exact and near-duplicate detection over a stream (MinHash LSH from datasketch).

Both indexes grow with the number of kept segments: the exact index by one 64-bit int each, the
MinHash LSH index by its band hashes (a few hundred bytes each). For corpora of many millions of
segments, run near-dedup as its own preparation pass or switch it off (`near=False`).
"""

from __future__ import annotations

import hashlib
import re

_WORD = re.compile(r"\w+")


def _key64(text: str) -> int:
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "big")


class Deduplicator:
    """Remembers kept segments; `check` says whether a new one duplicates one of them (and keeps it if not)."""

    def __init__(self, exact: bool = True, near: bool = True, threshold: float = 0.8,
                 num_perm: int = 64, shingle: int = 5) -> None:
        self.exact = exact
        self.near = near
        self.num_perm = num_perm
        self.shingle = shingle
        self._seen: set[int] = set()
        self._lsh = None
        self._n = 0
        if near:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def _minhash(self, text: str):  # -> datasketch.MinHash
        from datasketch import MinHash

        words = _WORD.findall(text.lower())
        n = self.shingle
        grams = {" ".join(words[i:i + n]).encode("utf-8") for i in range(max(1, len(words) - n + 1))}
        m = MinHash(num_perm=self.num_perm)
        m.update_batch(list(grams))
        return m

    def check(self, text: str) -> str | None:
        """"exact_duplicate", "near_duplicate", or None (new: remembered from now on)."""
        if self.exact:
            key = _key64(text)
            if key in self._seen:
                return "exact_duplicate"
            self._seen.add(key)
        if self._lsh is not None:
            m = self._minhash(text)
            if self._lsh.query(m):
                return "near_duplicate"
            self._lsh.insert(self._n, m, check_duplication=False)
            self._n += 1
        return None
