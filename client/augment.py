"""Self-augmentation: stream a corpus, ask the backward model M_yx for one instruction per segment.

`augment()` is the whole `humpback augment` command as an async function. Results are appended to a
journal as they arrive; running it again with the same arguments resumes (finished `custom_id`s are
skipped, failed ones retried), and a kill at any moment loses no finished line and duplicates none.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from client.completions import chat_choice
from client.corpus import Corpus
from client.dispatch import Job, RunSummary, dispatch, side_path
from client.fanout import Fanout, FanoutConfig, RequestFailed
from client.journal import FsyncPolicy, Journal, LineWriter
from client.prepare import PrepareConfig, Preparer
from client.progress import Progress
from humpback.contracts import Candidate, Rejected, Segment, content_id
from humpback.contracts import CHAT_PATH, AUGMENT_TEMPERATURE, AUGMENT_TOP_P, backward_messages

log = logging.getLogger(__name__)



@dataclass
class AugmentConfig:
    """Generation settings of a self-augmentation run.

    model: served model name; None takes the first model the endpoint lists.
    checkpoint: version label recorded with each candidate; None records the model's `root` (its
        weights path) from `/v1/models`.
    max_tokens: cap on the instruction's length; an instruction cut at the cap is not a candidate.
    temperature, top_p: nucleus sampling (paper §3.1: 0.7, 0.9).
    seed: per-request sampling seed, for reproducible runs.
    limit: take only the first `limit` kept segments (done ones included, so a resumed run takes the
        same ones): a trial run, or a fixed CPU budget.
    fsync: journal durability policy (see `client.journal.Journal`).
    progress: show a progress bar on stderr.
    """

    model: str | None = None
    checkpoint: str | None = None
    max_tokens: int = 256
    temperature: float = AUGMENT_TEMPERATURE
    top_p: float = AUGMENT_TOP_P
    seed: int | None = None
    limit: int | None = None
    fsync: FsyncPolicy = "interval"
    progress: bool = True


def prepared_segments(corpora: Iterable[Corpus], preparer: Preparer | None, errors: LineWriter,
                      summary: RunSummary) -> Iterator[tuple[Corpus, Segment]]:
    """Kept segments of the corpora; rejected records go to `errors` and are counted by reason."""
    for corpus in corpora:
        for rec in corpus:
            summary.input["records"] += 1
            if isinstance(rec, Rejected):
                summary.input["rejected"] += 1
                summary.rejected[rec.reason.split(" at byte")[0].split(":")[0]] += 1
                errors.write(rec.model_dump_json())
                continue
            if preparer is None:
                yield corpus, rec
            else:
                for seg in preparer(rec):
                    yield corpus, seg


def augment_request(text: str, model: str, cfg: AugmentConfig) -> tuple[str, dict[str, Any]]:
    """The `custom_id` and chat-completions body for one segment (shared with batch export)."""
    messages = backward_messages(text)
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": cfg.temperature,
                            "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    return content_id("augment", messages, model, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed), body


def parse_instruction(data: dict[str, Any]) -> tuple[str, str]:
    """(instruction, finish_reason) from a chat completion; aborted -> retry; truncated/empty -> fail."""
    choice, text = chat_choice(data)
    finish = choice.get("finish_reason")
    if finish == "length":
        raise RequestFailed("instruction truncated (finish_reason=length)", 1)
    if finish not in ("stop", None):
        raise RequestFailed(f"unusable finish_reason={finish!r}", 1)
    text = text.strip()
    if not text:
        raise RequestFailed("empty instruction", 1)
    return text, finish or "stop"


def candidate_line(cid: str, seg: Segment, result: tuple[str, str], model: str, checkpoint: str | None) -> str:
    """The journal line of a candidate: the segment with the instruction `parse_instruction` returned."""
    instruction, finish = result
    return Candidate(custom_id=cid, instruction=instruction, output=seg.text, source=seg.source, model=model,
                     checkpoint=checkpoint, finish_reason=finish).model_dump_json()


async def served_model(fan: Fanout, model: str | None) -> tuple[str, str | None]:
    """(served name, weights root) of `model`, or of the first model listed when None."""
    listing = (await fan.get_json("/v1/models")).get("data") or []
    for entry in listing:
        if model is None or entry.get("id") == model:
            return entry["id"], entry.get("root")
    if model is not None:
        return model, None  # hosted APIs may not list every model they serve
    raise RequestFailed("the endpoint lists no model; pass --model", 1)


async def augment(corpus: Iterable[str | os.PathLike[str] | Corpus], out: str | os.PathLike[str],
                  fanout: FanoutConfig, config: AugmentConfig | None = None,
                  prepare: PrepareConfig | None = None, text_field: str = "text") -> RunSummary:
    """Backtranslate every kept segment of `corpus` into `out` (a candidates journal); resumable.

    `prepare=None` applies the paper's default preparation; pass `PrepareConfig(...)` to change it.
    Side files: `<out>.errors.jsonl` (rejected input records), `<out>.failed.jsonl` (requests that
    failed this run; retried next run), `<out>.summary.json`.
    """
    cfg = config or AugmentConfig()
    out = Path(out)
    corpora = [c if isinstance(c, Corpus) else Corpus(c, text_field=text_field) for c in corpus]
    summary = RunSummary()
    preparer = Preparer(prepare)
    errors = LineWriter(side_path(out, "errors.jsonl"))
    failed = LineWriter(side_path(out, "failed.jsonl"))
    start = time.monotonic()
    journal = Journal(out, fsync=cfg.fsync).open()
    summary.results["already_done"] = len(journal.done)
    summary.extra["repaired_bytes"] = journal.repaired_bytes
    progress = Progress(sum(c.total_bytes for c in corpora), "augment", cfg.progress)
    try:
        async with Fanout(fanout) as fan:
            model, root = await served_model(fan, cfg.model)
            checkpoint = cfg.checkpoint or root
            summary.extra.update(model=model, checkpoint=checkpoint)

            def check(data: dict[str, Any]) -> tuple[str, str]:
                # Every answer's tokens count (truncated ones too): that is the work the server did.
                summary.results["completion_tokens"] += int((data.get("usage") or {}).get("completion_tokens") or 0)
                return parse_instruction(data)

            def record(job: Job[Segment], result: tuple[str, str]) -> str:
                return candidate_line(job.custom_id, job.item, result, model, checkpoint)

            def jobs() -> Iterator[Job[Segment]]:
                offset, last = 0, None  # bytes of the corpora before `last`, the one being read
                for corp, seg in islice(prepared_segments(corpora, preparer, errors, summary), cfg.limit):
                    if corp is not last:
                        offset += last.total_bytes if last is not None else 0
                        last = corp
                    cid, body = augment_request(seg.text, model, cfg)
                    yield Job(cid, body, seg, seg.source, offset + corp.bytes_read)

            await dispatch(fan, CHAT_PATH, jobs(), check, record, journal, failed, summary, progress)
            progress.advance(sum(c.total_bytes for c in corpora))
            summary.extra["retries"] = fan.retries
            summary.extra["endpoints"] = {e.url: {"completed": e.completed, "errors": e.errors, "window": e.window}
                                          for e in fan.endpoints}
    finally:
        progress.close()
        journal.close()
        errors.close()
        failed.close()
        summary.prepare.update(preparer.counts)
        summary.results["failed"] = sum(summary.failures.values())
        summary.elapsed_s = time.monotonic() - start
        summary.write(side_path(out, "summary.json"))
    return summary
