"""Append-only JSONL journals: the exactly-once backbone of augment and curate.

A result is appended as one whole line with a single `write(2)` on an `O_APPEND` descriptor, so after
a SIGKILL the file holds complete lines plus at most one torn last line. Opening a journal repairs
that line (truncates to the last newline) and loads the set of finished `custom_id`s; the run then
skips them, so a restart neither loses nor duplicates a line. A line in the middle that is no record
(not JSON, or no hex `custom_id`: written over, or edited) is skipped and reported; its item is not
done, so the run does it again.

`output_lock` keeps a second run off an output while one writes it.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal, TextIO

from pydantic_core import from_json

from humpback.contracts import InputError, OutputError

FsyncPolicy = Literal["never", "interval", "always"]
_HEX = re.compile(r"[0-9a-fA-F]+")


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
    """The `custom_id` of a whole record line, or None for anything else. Parsing the whole line
    (pydantic-core: ~2 us for a 3 kB line) is what tells a record from a line cut or written over."""
    try:
        obj = from_json(line)
    except ValueError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and _HEX.fullmatch(cid) else None


class Journal:
    """An append-only JSONL file of records keyed by `custom_id`.

    fsync: "never" (the OS flushes; survives process kills, not power loss), "interval" (default: at
    most `fsync_interval` seconds of results at risk on power loss) or "always" (one fsync per line).
    `on_corrupt(line number, line)` is called for each line `open` skips.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: FsyncPolicy = "interval",
                 fsync_interval: float = 5.0, on_corrupt: Callable[[int, bytes], None] | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.on_corrupt = on_corrupt
        self.done = IdSet()
        self.records = 0  # whole records in the file (`done` also holds ids claimed by requests in flight)
        self.repaired_bytes = 0
        self._fd: int | None = None
        self._last_sync = 0.0

    def open(self) -> Journal:
        """Repair the tail, load the finished ids, and open for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.repaired_bytes = repair_torn_tail(self.path)
            with open(self.path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    cid = _line_id(line)
                    if cid is not None:
                        self.done.add(cid)
                        self.records += 1
                    elif self.on_corrupt is not None:
                        self.on_corrupt(lineno, line)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._last_sync = time.monotonic()
        return self

    def append(self, line: str) -> None:
        """Append one record (a JSON object without newline) as one write. A write the file system
        refuses (full disk) takes back the part of the line it took and raises `OutputError`: the
        journal keeps whole records only, and the run can resume once there is room."""
        assert self._fd is not None, "journal not open"
        data = (line + "\n").encode("utf-8")
        n = 0
        try:
            n = os.write(self._fd, data)
            while n < len(data):  # short writes happen only on full disks and signals; finish the line
                n += os.write(self._fd, data[n:])
            if self.fsync == "always" or (self.fsync == "interval"
                                          and time.monotonic() - self._last_sync >= self.fsync_interval):
                os.fsync(self._fd)
                self._last_sync = time.monotonic()
            self.records += 1
        except OSError as exc:
            if 0 < n < len(data):
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - n)
            raise OutputError(
                f"{self.path}: cannot write ({exc.strerror or exc}); it keeps its {self.records} records "
                "whole. Make room and run the same command again: it resumes where this one stopped") from exc

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
        try:
            if self._f is None:  # created on first use: a clean run leaves no empty side files
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "w", encoding="utf-8")
            self._f.write(line + "\n")
            self._f.flush()
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc}). Make room and run the same "
                              "command again") from exc

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> LineWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_path(out: Path) -> Path:
    """`<out>.lock`: the lock file of an output."""
    return out.with_name(out.name + ".lock")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"{out} is in use: the run with pid {holder} is writing it (lock {path}); "
                             "wait for it to end, or choose another --out") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and flock: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no run can take the lock of a removed file
        os.close(fd)


@contextmanager
def output_lock(*outputs: Path) -> Iterator[None]:
    """Hold an exclusive lock on each output for the time of a run, or raise `InputError` naming the
    pid of the run that holds one. Each is an `flock` on `<out>.lock` (written with the holder's pid,
    removed on release): the kernel releases it when the holder's process ends, killed or not, so a
    lock file left behind by a crash is taken over."""
    with ExitStack() as stack:
        for out in dict.fromkeys(outputs):
            stack.enter_context(_locked(out))
        yield
