"""A tqdm bar over the corpus bytes (rate and ETA without a counting pass) with live result counts.

A bar may also be relayed (`relayed`): a shard of a Ray run sends its position and counts to the
driver, which shows one bar over every shard (`client.cluster`)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm import tqdm

# (position, total bytes, counts) of a bar, sent at most every RELAY_INTERVAL seconds and when it closes.
Relay = Callable[[int, int, dict[str, int]], None]
RELAY_INTERVAL = 0.5
_relay: ContextVar[Relay | None] = ContextVar("progress_relay", default=None)


@contextmanager
def relayed(relay: Relay) -> Iterator[None]:
    """Every bar made inside the block (in this context: an `asyncio.run` started in it too) also
    reports to `relay`."""
    token = _relay.set(relay)
    try:
        yield
    finally:
        _relay.reset(token)


class Progress:
    """Advances to the furthest corpus byte whose segments are finished; shows done/failed counts."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True) -> None:
        self.counts: Counter[str] = Counter()
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=not enabled, dynamic_ncols=True, smoothing=0.05)
        self._total = total_bytes
        self._relay = _relay.get()
        self._pos = 0
        self._last_postfix = 0.0

    def advance(self, pos: int, **counts: int) -> None:
        self.counts.update(counts)
        if pos > self._pos:
            self._bar.update(pos - self._pos)
            self._pos = pos
        now = time.monotonic()
        if now - self._last_postfix > RELAY_INTERVAL:  # postfix formatting is the costly part of tqdm
            self._bar.set_postfix(dict(self.counts), refresh=False)
            self._last_postfix = now
            if self._relay is not None:
                self._relay(self._pos, self._total, dict(self.counts))

    def close(self) -> None:
        self._bar.set_postfix(dict(self.counts), refresh=False)
        self._bar.close()
        if self._relay is not None:
            self._relay(self._pos, self._total, dict(self.counts))
