"""Streaming corpus readers: JSONL, plain text (blank-line paragraphs) and Parquet, each optionally gzip'd.

Readers yield one `Segment` (a document, before preparation) or one `Rejected` per input record and
hold at most one record in memory, so memory stays flat whatever the corpus size. A bad record never
raises: every record that cannot be used comes back as a `Rejected` naming the file, line and reason.
Only a file that cannot be read at all raises `CorpusError` (an unknown format, a Parquet file
without the text column).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from humpback.contracts import CorpusError, Rejected, Segment, Source

DEFAULT_MAX_RECORD_BYTES = 1 << 20  # a 1 MiB record is not a web segment; bigger ones are rejected unread
_EXCERPT = 80
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_TEXT_SUFFIXES = {".txt", ".text", ".md"}


def _format_of(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if ext in _JSONL_SUFFIXES:
        return "jsonl", gz
    if ext in _TEXT_SUFFIXES:
        return "text", gz
    if ext == ".parquet" and not gz:
        return "parquet", False
    raise CorpusError(f"{path}: unknown corpus format {''.join(path.suffixes)!r} "
                      "(expected .jsonl, .txt or .parquet, optionally .gz except Parquet)")


def _excerpt(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text[:_EXCERPT]


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _is_binary(text: str) -> bool:
    # NULs or a high share of control characters mean this is not prose (binary junk that decoded).
    if "\x00" in text:
        return True
    sample = text[:4096]
    return len(_CONTROL.findall(sample)) > max(4, len(sample) // 100)


class Corpus:
    """One corpus file, read as a stream of documents.

    `bytes_read` and `total_bytes` (both of the file on disk, compressed if gzip'd) drive progress
    bars and ETAs without a counting pass.
    """

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text",
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.path = Path(path)
        self.text_field = text_field
        self.max_record_bytes = max_record_bytes
        self.format, self.gzipped = _format_of(self.path)
        self.total_bytes = self.path.stat().st_size
        self.bytes_read = 0
        self._raw: IO[bytes] | None = None

    def __iter__(self) -> Iterator[Segment | Rejected]:
        if self.format == "parquet":
            yield from self._parquet()
            return
        with open(self.path, "rb") as raw:
            self._raw = raw
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if self.gzipped else raw  # type: ignore[assignment]
            try:
                if self.format == "jsonl":
                    yield from self._jsonl(stream)
                else:
                    yield from self._paragraphs(stream)
            except (OSError, EOFError) as exc:  # a corrupt or truncated gzip stream ends the file, not the run
                yield Rejected(source=str(self.path), line=0, reason=f"unreadable file: {exc}")
            finally:
                self.bytes_read = self.total_bytes
                self._raw = None

    def _tick(self) -> None:
        if self._raw is not None:
            self.bytes_read = self._raw.tell()

    def _lines(self, stream: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
        """(line number, line) pairs; None for a line over the size limit, skipped without holding it."""
        limit = self.max_record_bytes
        lineno = 0
        while True:
            line = stream.readline(limit + 1)
            if not line:
                return
            lineno += 1
            if len(line) > limit and not line.endswith(b"\n"):
                while True:
                    rest = stream.readline(1 << 16)
                    if not rest or rest.endswith(b"\n"):
                        break
                self._tick()
                yield lineno, None
                continue
            self._tick()
            yield lineno, line

    def _reject(self, line: int, reason: str, field: str | None = None, excerpt: bytes | str | None = None) -> Rejected:
        return Rejected(source=str(self.path), line=line, reason=reason, field=field,
                        excerpt=None if excerpt is None else _excerpt(excerpt))

    def _jsonl(self, stream: IO[bytes]) -> Iterator[Segment | Rejected]:
        field = self.text_field
        for lineno, line in self._lines(stream):
            if line is None:
                yield self._reject(lineno, f"record larger than {self.max_record_bytes} bytes")
                continue
            if not line.strip():
                continue  # blank lines separate nothing in JSONL; not an error
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield self._reject(lineno, f"invalid UTF-8 at byte {exc.start}", excerpt=line)
                continue
            try:
                obj: Any = json.loads(decoded)
            except json.JSONDecodeError as exc:
                yield self._reject(lineno, f"invalid JSON: {exc.msg} (column {exc.colno})", excerpt=decoded)
                continue
            if not isinstance(obj, dict):
                yield self._reject(lineno, f"expected a JSON object, got {type(obj).__name__}", excerpt=decoded)
                continue
            present = field in obj
            yield self._record(lineno, obj.pop(field, None), present, obj)

    def _record(self, lineno: int, text: Any, present: bool, metadata: dict[str, Any]) -> Segment | Rejected:
        field = self.text_field
        if text is None:
            return self._reject(lineno, f"missing field {field!r}" if not present else f"field {field!r} is null", field)
        if not isinstance(text, str):
            return self._reject(lineno, f"field {field!r} is {type(text).__name__}, not a string", field, str(text))
        if not text.strip():
            return self._reject(lineno, f"field {field!r} is empty", field)
        if _is_binary(text):
            return self._reject(lineno, f"field {field!r} holds binary data", field, text)
        return Segment(text=text, source=Source(path=str(self.path), line=lineno, metadata=metadata))

    def _paragraphs(self, stream: IO[bytes]) -> Iterator[Segment | Rejected]:
        buf: list[bytes] = []
        size = 0
        start = 0
        too_big = False

        def flush() -> Segment | Rejected | None:
            if too_big:
                return self._reject(start, f"paragraph larger than {self.max_record_bytes} bytes")
            if not buf:
                return None
            raw = b"".join(buf)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return self._reject(start, f"invalid UTF-8 at byte {exc.start}", excerpt=raw)
            if _is_binary(text):
                return self._reject(start, "binary data", excerpt=text)
            return Segment(text=text.strip("\n"), source=Source(path=str(self.path), line=start))

        for lineno, line in self._lines(stream):
            if line is not None and not line.strip():
                rec = flush()
                if rec is not None:
                    yield rec
                buf, size, too_big = [], 0, False
                continue
            if not buf and not too_big:
                start = lineno
            if line is None or size + len(line) > self.max_record_bytes:
                too_big, buf, size = True, [], 0
                continue
            if not too_big:
                buf.append(line)
                size += len(line)
        rec = flush()
        if rec is not None:
            yield rec

    def _parquet(self) -> Iterator[Segment | Rejected]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            yield self._reject(0, f"unreadable Parquet file: {exc}")
            self.bytes_read = self.total_bytes
            return
        if self.text_field not in pf.schema_arrow.names:
            raise CorpusError(f"{self.path}: no column {self.text_field!r} (columns: {pf.schema_arrow.names}); "
                              "pass --text-field")
        rows = max(1, pf.metadata.num_rows)
        lineno = 0
        for batch in pf.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                lineno += 1
                text = row.pop(self.text_field, None)
                if isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > self.max_record_bytes:
                    yield self._reject(lineno, f"record larger than {self.max_record_bytes} bytes", self.text_field)
                else:
                    yield self._record(lineno, text, True, row)
            self.bytes_read = self.total_bytes * lineno // rows
        self.bytes_read = self.total_bytes
