"""One loop for every task, online or from a batch: `run` appends each answer's record to a resumable
journal, or a `Failure` to the failures file; `online` answers by POSTing through the fan-out,
`client.batch` by looking the answer up in a batch's results. Also what every run shares: its
set-up and tear-down (`open_run`: lock, journal, side files, progress, and the summary written
however the run ends), its summary, its side-file names, and the served model's name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from client.extras import InstructionQuality, RunExtra
from client.fanout import Fanout
from client.journal import FsyncPolicy, Journal, LineWriter, output_lock
from client.progress import Progress
from client.tasks import Item, Job, Parsed, Task
from humpback.contracts import BatchRequest, Failure, OutputError, Rejected, RequestFailed

log = logging.getLogger(__name__)

E = TypeVar("E", bound=RunExtra)  # a task's extra; a bare `RunSummary` is any task's


@dataclass
class RunSummary(Generic[E]):
    """What a run did, per stage; written next to the output as `<out>.summary.json`. `extra` is what
    the task names beside its counts (`client.extras`: `CurateExtra`, `AugmentExtra` ...); only the
    fields it set are written."""

    input: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    prepare: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    # What the answers were worth, where a task measures it (augment's; written as {} where none).
    quality: InstructionQuality | None = None
    extra: E = field(default_factory=RunExtra)  # type: ignore[assignment]
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: it mangles Counters
        d = {k: dict(v) if isinstance(v, Counter) else v for k, v in d.items()}
        d["quality"] = asdict(self.quality) if self.quality is not None else {}
        d["extra"] = self.extra.model_dump(mode="json", exclude_unset=True)
        d["elapsed_s"] = round(self.elapsed_s, 3)
        return d

    def write(self, path: Path) -> None:
        """Write the summary atomically. A summary that cannot be written (full disk) is logged, not
        raised: the records are safe in the journal, the CLI prints the summary too, and raising here
        (in a run's `finally`) would hide the error that stopped the run."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("%s: summary not written (%s)", path, exc.strerror or exc)


def side_path(out: Path, kind: str) -> Path:
    """`out.jsonl` -> `out.<kind>` (errors.jsonl, failed.jsonl, summary.json ...)."""
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{kind}")


class CorruptLines:
    """Called with each line of `journal` that is no record: writes it to `errors` with its line
    number, and counts it."""

    def __init__(self, journal: Path, errors: LineWriter) -> None:
        self.journal = journal
        self.errors = errors
        self.count = 0

    def __call__(self, lineno: int, line: bytes) -> None:
        self.count += 1
        self.errors.write(Rejected(source=str(self.journal), line=lineno, reason="corrupt journal line: not a record",
                                   excerpt=line[:80].decode("utf-8", "replace")).model_dump_json())


def reason_key(reason: str) -> str:
    """A failure reason without the variable parts (URLs, bodies), for counting in a summary."""
    return reason.split(":", 1)[0].split(" from ", 1)[0][:80]


@dataclass
class OpenRun(Generic[E]):
    """What a run writes to while it runs (see `open_run`)."""

    summary: RunSummary[E]
    journal: Journal
    errors: LineWriter
    failed: LineWriter
    progress: Progress


@contextmanager
def open_run(out: Path, label: str, total: int, *, journal: Path | None = None, locks: Iterable[Path] = (),
             fsync: FsyncPolicy = "interval", progress: bool = True, corrupt_lines: bool = True,
             summary: Path | None = None, finish: Callable[[RunSummary[E]], None] | None = None,
             extra: E | None = None) -> Iterator[OpenRun[E]]:
    """The set-up and tear-down every run shares (augment, curate, rewrite, batch import, the
    evaluations): lock `out`, the journal and `locks` (`InputError` while another run writes one:
    nothing else is touched then), open the journal (`journal`, default `out`; its lines that are no record go to
    `<out>.errors.jsonl` and are counted, unless `corrupt_lines` is off), the side files
    `<out>.errors.jsonl` and `<out>.failed.jsonl`, and a progress bar over `total`. The summary's
    `extra` is `extra` (the task's own, e.g. `CurateExtra()`; default `RunExtra()`).

    However the run ends (done, some requests failed, `OutputError`, interrupted), everything is
    closed, `results["failed"]` counted, `finish(summary)` called (what a task adds once the run has
    ended, well or not: augment's `quality`) and the summary written to `summary` (default
    `<out>.summary.json`): a failed run leaves its summary as a finished one does."""
    start = time.monotonic()
    journal_path = journal or out
    with output_lock(out, journal_path, *locks):
        run_summary: RunSummary[E] = RunSummary(extra=RunExtra() if extra is None else extra)  # type: ignore[arg-type]
        errors = LineWriter(side_path(out, "errors.jsonl"))
        corrupt = CorruptLines(journal_path, errors) if corrupt_lines else None
        opened = OpenRun(run_summary, Journal(journal_path, fsync=fsync, on_corrupt=corrupt), errors,
                         LineWriter(side_path(out, "failed.jsonl")), Progress(total, label, progress))
        try:
            opened.journal.open()
            run_summary.results["already_done"] = len(opened.journal.done)
            run_summary.extra.repaired_bytes = opened.journal.repaired_bytes
            if corrupt is not None:
                run_summary.extra.corrupt_journal_lines = corrupt.count
            yield opened
        finally:
            opened.progress.close()
            opened.journal.close()
            opened.failed.close()
            opened.errors.close()
            run_summary.results["failed"] = sum(run_summary.failures.values())
            if finish is not None:
                finish(run_summary)
            run_summary.elapsed_s = time.monotonic() - start
            run_summary.write(summary or side_path(out, "summary.json"))


class Answer(Protocol):
    """Where answers come from: `parse(body)` of the answer to `request`, or `RequestFailed`."""

    def __call__(self, request: BatchRequest, parse: Callable[[dict[str, Any]], Parsed]) -> Awaitable[Parsed]: ...


def online(fan: Fanout, usage: Counter[str] | None = None) -> Answer:
    """Answers from the servers: POST each request through `fan` (retrying as it is configured).
    `usage` counts the completion tokens of every answer, unusable ones too: that is the work the
    servers did."""

    async def answer(request: BatchRequest, parse: Callable[[dict[str, Any]], Parsed]) -> Parsed:
        def check(body: dict[str, Any]) -> Parsed:
            if usage is not None:
                usage["completion_tokens"] += int((body.get("usage") or {}).get("completion_tokens") or 0)
            return parse(body)

        return await fan.post(request.url, request.body, check)

    return answer


async def run(task: Task[Item, Parsed], jobs: Iterable[Job[Item]], answer: Answer, journal: Journal,
              failed: LineWriter, summary: RunSummary, progress: Progress, max_inflight: int = 1) -> None:
    """Answer every job not yet in `journal`, at most `max_inflight` at once (the producer waits, so
    memory stays flat); append `task.record(...)` of each parsed answer as it arrives, or a `Failure`
    to `failed` (retried on the next run). A `custom_id` is claimed when asked, so duplicates go once.
    An output that cannot be written (`OutputError`: a full disk) stops the run at once: the requests
    in flight are cancelled (the next run asks them again) and the error is raised.

    The record is made where the answer is parsed, inside `answer`: a task's `record` may refuse an
    answer that only its item shows to be unusable (augment: an instruction that copies its passage),
    and an answer function may then ask again (augment's resampling)."""
    pending = asyncio.Semaphore(max_inflight)
    running: set[asyncio.Task[None]] = set()
    unwritable: list[OutputError] = []

    async def one(job: Job[Item]) -> None:
        cid = job.request.custom_id
        try:
            record = await answer(job.request, lambda body: task.record(cid, job.item, task.parse(body)))
            journal.append(record.model_dump_json())
            summary.results["written"] += 1
            progress.advance(job.pos, done=1)
        except RequestFailed as exc:
            summary.failures[reason_key(exc.reason)] += 1
            failed.write(Failure(custom_id=cid, source=job.source, reason=exc.reason,
                                 attempts=exc.attempts).model_dump_json())
            progress.advance(job.pos, failed=1)
        except OutputError as exc:
            unwritable.append(exc)
        finally:
            pending.release()

    for job in jobs:
        if unwritable:
            break
        if job.request.custom_id in journal.done:
            summary.results["skipped_done"] += 1
            progress.advance(job.pos)
            continue
        journal.done.add(job.request.custom_id)
        await pending.acquire()
        t = asyncio.create_task(one(job))
        running.add(t)
        t.add_done_callback(running.discard)
    if unwritable:
        for t in running:
            t.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=bool(unwritable))
    if unwritable:
        raise unwritable[0]


async def served_model(fan: Fanout, model: str | None) -> tuple[str, str | None]:
    """(served name, weights root) of `model`, or of the first model listed when None."""
    listing = (await fan.get_json("/v1/models")).get("data") or []
    for entry in listing:
        if model is None or entry.get("id") == model:
            return entry["id"], entry.get("root")
    if model is not None:
        return model, None  # hosted APIs may not list every model they serve
    raise RequestFailed("the endpoint lists no model; pass --model", 1)
