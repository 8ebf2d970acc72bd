"""The paper's seed (§3.1): Open Assistant oasst1, first turn of each tree, English, the rank-0 reply.

Input is oasst1's message table as the hub ships it (`OpenAssistant/oasst1`: one row per message with
message_id, parent_id, message_tree_id, role "prompter"/"assistant", lang, rank, deleted,
review_result, text...), read from a local JSONL (optionally .gz) or Parquet file, or from the hub
through `datasets` when asked explicitly. Messages are read as a stream; only roots and the
assistant replies are kept until the end, since a tree's rows come in no guaranteed order.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from humpback.contracts import OasstError, ParseFailure, SeedPair

SOURCE = "oasst1"
LICENSE = "Apache-2.0"
_REQUIRED = ("message_id", "parent_id", "role", "text")


@dataclass
class OasstStats:
    """What selection kept and why it dropped the rest; `failures` name the row and field."""

    messages: int = 0
    roots: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    selected: int = 0
    failures: list[ParseFailure] = field(default_factory=list)


def _rows_jsonl(path: Path, stats: OasstStats) -> Iterator[tuple[str, dict[str, Any]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                stats.failures.append(ParseFailure(source=SOURCE, file=f"{path}:{n}", reason=f"bad JSON: {exc}"))
                continue
            if not isinstance(row, dict):
                stats.failures.append(ParseFailure(source=SOURCE, file=f"{path}:{n}", reason="not a JSON object"))
                continue
            yield f"{path}:{n}", row


def _rows_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row


def _rows_hub(name: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:
        raise OasstError("--hub needs the `datasets` package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        raise OasstError(f"cannot load {name!r} split {split!r} from the hub ({type(exc).__name__}: {exc}); "
                         "offline, download the parquet files elsewhere and pass them with --input") from exc
    for n, row in enumerate(ds, 1):
        yield f"{name}[{split}]:{n}", row


def read_messages(inputs: list[Path], hub: str | None, split: str, stats: OasstStats,
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every message of the local files, then of the hub dataset if named."""
    for path in inputs:
        if not path.is_file():
            raise OasstError(f"{path}: no such file")
        suffixes = "".join(path.suffixes[-2:]).lower()
        if suffixes.endswith(".parquet"):
            yield from _rows_parquet(path)
        elif suffixes.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
            yield from _rows_jsonl(path, stats)
        else:
            raise OasstError(f"{path}: unknown format {suffixes!r} (expected .parquet, .jsonl or .jsonl.gz)")
    if hub:
        yield from _rows_hub(hub, split)


def _usable(row: dict[str, Any]) -> bool:
    # review_result False means moderators rejected the message; None means not yet reviewed.
    return not row.get("deleted") and row.get("review_result") is not False and bool(str(row["text"]).strip())


def first_turn_pairs(rows: Iterator[tuple[str, dict[str, Any]]], stats: OasstStats, lang: str = "en",
                     ) -> Iterator[SeedPair]:
    """The (root prompt, best-ranked reply) pair of each tree whose root and reply are in `lang`.

    "Best-ranked" is the lowest `rank` (0 is the annotators' first choice); replies without a rank
    (a prompt answered once, never ranked) are not used, as the paper takes rank-0 responses only.
    """
    roots: dict[str, dict[str, Any]] = {}
    replies: dict[str, list[dict[str, Any]]] = {}
    for where, row in rows:
        stats.messages += 1
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            stats.failures.append(ParseFailure(source=SOURCE, file=where, reason=f"missing field {missing[0]!r}"))
            continue
        if row["parent_id"] is None:
            if row["role"] != "prompter":
                stats.failures.append(ParseFailure(source=SOURCE, file=where,
                                                   reason=f"field 'role' of a root is {row['role']!r}"))
                continue
            stats.roots += 1
            if row.get("lang") != lang:
                stats.dropped["root_not_" + lang] += 1
            elif not _usable(row):
                stats.dropped["root_deleted_or_rejected"] += 1
            else:
                roots[row["message_id"]] = row
        elif row["role"] == "assistant" and _usable(row) and row.get("lang", lang) == lang:
            replies.setdefault(row["parent_id"], []).append(row)
    for message_id in sorted(roots, key=lambda m: str(roots[m].get("message_tree_id", m))):
        ranked = [r for r in replies.get(message_id, []) if r.get("rank") is not None]
        if not ranked:
            stats.dropped["no_ranked_reply" if replies.get(message_id) else "no_reply"] += 1
            continue
        best = min(ranked, key=lambda r: (r["rank"], r["message_id"]))
        stats.selected += 1
        yield SeedPair.make(roots[message_id]["text"], best["text"], SOURCE, LICENSE)
