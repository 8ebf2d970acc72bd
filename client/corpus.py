"""Streaming corpus readers: JSONL, plain text (blank-line paragraphs) and Parquet, each optionally gzip'd.

Readers yield one `Segment` (a document, before preparation) or one `Rejected` per input record and
hold at most one record in memory, so memory stays flat whatever the corpus size. A bad record never
raises: every record that cannot be used comes back as a `Rejected` naming the file, line and reason
(a gzip stream that breaks off ends the file with one, at the line where it broke). A file that
cannot be read at all raises `CorpusError` when its `Corpus` is made, before anything is read or
sent: a missing file, a directory, an unknown format, a `.gz` that is not gzip, a Parquet file that
cannot be opened or has no text column. `open_corpora` checks every file of a run and names them all.

`Lines` is the line reader underneath, shared with the other JSONL inputs (candidates, batch files):
a UTF-8 byte-order mark and CRLF line ends are read as if they were not there.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from humpback.contracts import CorpusError, InputError, Rejected, Segment, Source

DEFAULT_MAX_RECORD_BYTES = 1 << 20  # a 1 MiB record is not a web segment; bigger ones are rejected unread
_EXCERPT = 80
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_TEXT_SUFFIXES = {".txt", ".text", ".md"}
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"


def _is_gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def check_input(path: Path, error: type[InputError] = InputError) -> None:
    """Raise `error` naming `path` and the fix unless it is a readable file (and gzip where it says .gz)."""
    if not path.exists():
        raise error(f"{path}: no such file; check the path")
    if path.is_dir():
        raise error(f"{path}: a directory, not a file; pass the files inside it")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    if _is_gzipped(path) and head != _GZIP_MAGIC:
        raise error(f"{path}: named .gz but not gzip-compressed; compress it with gzip or drop the .gz")


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    gz = _is_gzipped(path)
    ext = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if ext in _JSONL_SUFFIXES:
        return "jsonl"
    if ext in _TEXT_SUFFIXES:
        return "text"
    if ext == ".parquet" and not gz:
        return "parquet"
    raise CorpusError(f"{path}: unknown corpus format {''.join(path.suffixes)!r} "
                      "(expected .jsonl, .txt or .parquet, optionally .gz except Parquet); convert or rename it")


class Lines:
    """The lines of a file, gunzipped as they are read where it ends in .gz: (line number, line)
    pairs, with a UTF-8 byte-order mark and the CR of CRLF line ends removed, and None for a line
    over `max_bytes` (None: no limit), skipped without holding it.

    `bytes_read` is the position in the file on disk (compressed if gzip'd). A stream that breaks off
    (a truncated or corrupt gzip) ends the lines, and `broken()` then says where.
    """

    def __init__(self, path: Path, max_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.bytes_read = 0
        self.lineno = 0
        self.error: str | None = None

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        limit = self.max_bytes
        with open(self.path, "rb") as raw:
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if _is_gzipped(self.path) else raw  # type: ignore[assignment]
            while True:
                try:
                    line = stream.readline(-1 if limit is None else limit + 1)
                    skipped = limit is not None and len(line) > limit and not line.endswith(b"\n")
                    while skipped:
                        rest = stream.readline(1 << 16)
                        if not rest or rest.endswith(b"\n"):
                            break
                except (OSError, EOFError) as exc:  # a corrupt or truncated gzip stream ends the file, not the run
                    self.error = f"unreadable file: {exc}"
                    return
                if not line:
                    return
                if self.lineno == 0 and line.startswith(_BOM):
                    line = line[len(_BOM):]
                self.lineno += 1
                self.bytes_read = raw.tell()
                if skipped:
                    yield self.lineno, None
                    continue
                if line.endswith(b"\r\n"):
                    line = line[:-2] + b"\n"
                yield self.lineno, line

    def broken(self) -> Rejected | None:
        """Where and why the stream broke off (the line it broke in), or None if it was read to its end."""
        if self.error is None:
            return None
        return Rejected(source=str(self.path), line=self.lineno + 1, reason=self.error)


def open_corpora(paths: Iterable[str | os.PathLike[str] | Corpus], text_field: str = "text") -> list[Corpus]:
    """A `Corpus` of each path (a `Corpus` is taken as it is): every file checked before any is read,
    and one `CorpusError` naming each that cannot be read."""
    corpora: list[Corpus] = []
    problems: list[str] = []
    for path in paths:
        try:
            corpora.append(path if isinstance(path, Corpus) else Corpus(path, text_field=text_field))
        except CorpusError as exc:
            problems.append(str(exc))
    if problems:
        raise CorpusError("\n".join(problems))
    return corpora


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
    """One corpus file, read as a stream of documents; checked when made (see the module docstring).

    `bytes_read` and `total_bytes` (both of the file on disk, compressed if gzip'd) drive progress
    bars and ETAs without a counting pass.
    """

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text",
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.path = Path(path)
        self.text_field = text_field
        self.max_record_bytes = max_record_bytes
        check_input(self.path, CorpusError)
        self.format = _format_of(self.path)
        if self.format == "parquet":
            self._check_parquet()
        self.total_bytes = self.path.stat().st_size
        self.bytes_read = 0

    def _check_parquet(self) -> None:
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.path) as pf:
                columns = pf.schema_arrow.names
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise CorpusError(f"{self.path}: not a readable Parquet file ({exc}); check the file") from None
        if self.text_field not in columns:
            raise CorpusError(f"{self.path}: no column {self.text_field!r} (columns: {columns}); pass --text-field")

    def __iter__(self) -> Iterator[Segment | Rejected]:
        if self.format == "parquet":
            yield from self._parquet()
            return
        lines = Lines(self.path, self.max_record_bytes)
        try:
            for rec in self._jsonl(lines) if self.format == "jsonl" else self._paragraphs(lines):
                self.bytes_read = lines.bytes_read
                yield rec
            broken = lines.broken()
            if broken is not None:
                yield broken
        finally:
            self.bytes_read = self.total_bytes

    def _reject(self, line: int, reason: str, field: str | None = None, excerpt: bytes | str | None = None) -> Rejected:
        return Rejected(source=str(self.path), line=line, reason=reason, field=field,
                        excerpt=None if excerpt is None else _excerpt(excerpt))

    def _jsonl(self, lines: Lines) -> Iterator[Segment | Rejected]:
        field = self.text_field
        for lineno, line in lines:
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

    def _paragraphs(self, lines: Lines) -> Iterator[Segment | Rejected]:
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

        for lineno, line in lines:
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
        rec = flush() if lines.error is None else None  # a paragraph the stream broke off in is not whole
        if rec is not None:
            yield rec

    def _parquet(self) -> Iterator[Segment | Rejected]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as pf:  # opened and its columns checked when the corpus was made
            rows = max(1, pf.metadata.num_rows)
            lineno = 0
            for batch in pf.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    lineno += 1
                    text = row.pop(self.text_field, None)
                    if isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > self.max_record_bytes:
                        yield self._reject(lineno, f"record larger than {self.max_record_bytes} bytes",
                                           self.text_field)
                    else:
                        yield self._record(lineno, text, True, row)
                self.bytes_read = self.total_bytes * lineno // rows
        self.bytes_read = self.total_bytes
