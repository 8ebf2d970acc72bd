"""A tqdm bar over the corpus bytes (rate and ETA without a counting pass) with live result counts."""

from __future__ import annotations

import time
from collections import Counter

from tqdm import tqdm


class Progress:
    """Advances to the furthest corpus byte whose segments are finished; shows done/failed counts."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True) -> None:
        self.counts: Counter[str] = Counter()
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=not enabled, dynamic_ncols=True, smoothing=0.05)
        self._pos = 0
        self._last_postfix = 0.0

    def advance(self, pos: int, **counts: int) -> None:
        self.counts.update(counts)
        if pos > self._pos:
            self._bar.update(pos - self._pos)
            self._pos = pos
        now = time.monotonic()
        if now - self._last_postfix > 0.5:  # postfix formatting is the costly part of tqdm
            self._bar.set_postfix(dict(self.counts), refresh=False)
            self._last_postfix = now

    def close(self) -> None:
        self._bar.set_postfix(dict(self.counts), refresh=False)
        self._bar.close()
