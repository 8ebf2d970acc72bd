"""What every request-per-record command shares: the run summary, side-file names, and `dispatch`,
the bounded, resumable fan-out of one request per record into a journal."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from client.fanout import Fanout, RequestFailed
from client.journal import Journal, LineWriter
from client.progress import Progress
from humpback.contracts import Failure, Source

T = TypeVar("T")


@dataclass
class RunSummary:
    """What a run did, per stage; written next to the output as `<out>.summary.json`."""

    input: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    prepare: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: it mangles Counters
        d = {k: dict(v) if isinstance(v, Counter) else v for k, v in d.items()}
        d["elapsed_s"] = round(self.elapsed_s, 3)
        return d

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def side_path(out: Path, kind: str) -> Path:
    """`out.jsonl` -> `out.<kind>` (errors.jsonl, failed.jsonl, summary.json ...)."""
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{kind}")


def reason_key(reason: str) -> str:
    """A failure reason without the variable parts (URLs, bodies), for counting in a summary."""
    return reason.split(":", 1)[0].split(" from ", 1)[0][:80]


@dataclass(slots=True)
class Job(Generic[T]):
    """One request of a run: its `custom_id`, body, the record it came from, and the input bytes read
    so far (for progress)."""

    custom_id: str
    body: dict[str, Any]
    item: T
    source: Source | None
    pos: int


async def dispatch(fan: Fanout, path: str, jobs: Iterable[Job[T]], check: Callable[[dict[str, Any]], Any],
                   record: Callable[[Job[T], Any], str], journal: Journal, failed: LineWriter,
                   summary: RunSummary, progress: Progress) -> None:
    """POST every job not yet in `journal`, at most `fan.max_inflight` at once (the producer waits, so
    memory stays flat); append `record(job, check(response))` as each answer arrives, or a `Failure` to
    `failed` (retried on the next run). A `custom_id` is claimed when sent, so duplicates go once."""
    pending = asyncio.Semaphore(fan.max_inflight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(job: Job[T]) -> None:
        try:
            journal.append(record(job, await fan.post(path, job.body, check)))
            summary.results["written"] += 1
            progress.advance(job.pos, done=1)
        except RequestFailed as exc:
            summary.failures[reason_key(exc.reason)] += 1
            failed.write(Failure(custom_id=job.custom_id, source=job.source, reason=exc.reason,
                                 attempts=exc.attempts).model_dump_json())
            progress.advance(job.pos, failed=1)
        finally:
            pending.release()

    for job in jobs:
        if job.custom_id in journal.done:
            summary.results["skipped_done"] += 1
            progress.advance(job.pos)
            continue
        journal.done.add(job.custom_id)
        await pending.acquire()
        task = asyncio.create_task(one(job))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
