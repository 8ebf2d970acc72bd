"""Append-only JSONL journals: the exactly-once backbone of augment and curate.

A result is appended as one whole line with a single `write(2)` on an `O_APPEND` descriptor, so after
a SIGKILL the file holds complete lines plus at most one torn last line. Opening a journal repairs
that line (truncates to the last newline) and loads the set of finished `custom_id`s; the run then
skips them, so a restart neither loses nor duplicates a line.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Literal, TextIO

FsyncPolicy = Literal["never", "interval", "always"]
_ID_RE = re.compile(rb'"custom_id"\s*:\s*"([0-9a-fA-F]+)"')


class IdSet:
    """A set of hex ids kept as 64-bit ints (~60 bytes per id instead of ~110 for the string)."""

    def __init__(self) -> None:
        self._ids: set[int] = set()

    @staticmethod
    def _key(custom_id: str) -> int:
        return int(custom_id[:16], 16)

    def add(self, custom_id: str) -> None:
        self._ids.add(self._key(custom_id))

    def discard(self, custom_id: str) -> None:
        self._ids.discard(self._key(custom_id))

    def __contains__(self, custom_id: str) -> bool:
        return self._key(custom_id) in self._ids

    def __len__(self) -> int:
        return len(self._ids)


def repair_torn_tail(path: Path) -> int:
    """Truncate a file to its last newline; returns the number of bytes removed (0 if none)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        else:
            keep = 0
        f.truncate(keep)
        os.fsync(f.fileno())
        return size - keep


def _line_id(line: bytes) -> str | None:
    m = _ID_RE.search(line, 0, 256)  # our records put custom_id first: no JSON parse on resume
    if m:
        return m.group(1).decode("ascii")
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


class Journal:
    """An append-only JSONL file of records keyed by `custom_id`.

    fsync: "never" (the OS flushes; survives process kills, not power loss), "interval" (default: at
    most `fsync_interval` seconds of results at risk on power loss) or "always" (one fsync per line).
    """

    def __init__(self, path: str | os.PathLike[str], fsync: FsyncPolicy = "interval",
                 fsync_interval: float = 5.0) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.done = IdSet()
        self.repaired_bytes = 0
        self._fd: int | None = None
        self._last_sync = 0.0

    def open(self) -> Journal:
        """Repair the tail, load the finished ids, and open for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.repaired_bytes = repair_torn_tail(self.path)
            with open(self.path, "rb") as f:
                for line in f:
                    cid = _line_id(line)
                    if cid is not None:
                        self.done.add(cid)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._last_sync = time.monotonic()
        return self

    def append(self, line: str) -> None:
        """Append one record (a JSON object without newline) as one write."""
        assert self._fd is not None, "journal not open"
        data = (line + "\n").encode("utf-8")
        n = os.write(self._fd, data)
        while n < len(data):  # short writes happen only on full disks and signals; finish the line
            n += os.write(self._fd, data[n:])
        if self.fsync == "always" or (self.fsync == "interval"
                                      and time.monotonic() - self._last_sync >= self.fsync_interval):
            os.fsync(self._fd)
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            if self.fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineWriter:
    """A per-run side file (errors, failures): truncated when opened, one JSON line per record."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)  # a stale file from an earlier run would misreport this one
        self._f: TextIO | None = None

    def write(self, line: str) -> None:
        if self._f is None:  # created on first use: a clean run leaves no empty side files
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
