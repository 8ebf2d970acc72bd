"""OpenAI batch JSONL: export a task's requests, import a batch's results through the live path's loop
(for `vllm run-batch` or a hosted batch API).

Export writes the task's request lines (`humpback.contracts.BatchRequest`), one per distinct
`custom_id`, and beside them `<requests>.meta.jsonl`, line for line, with the item each answer is
joined to (the segment, or the candidate to score). Import runs the task over the result lines
(`BatchResult`) with `client.runner.run`, as the live path does over the servers' answers: the same
parse, the same journals (so online and batch runs mix and resume alike) and the same side files. A
result line that is no result, names an id the export does not hold, or repeats an id goes to
`<out>.errors.jsonl` with its line number and reason; a request without a usable answer goes to
`<out>.failed.jsonl` and counts in `results["failed"]`, as a failed request does online.

Every input file is checked before anything is read or written (`InputError` naming the file), and
the output is locked for the run, as `augment` and `curate` do.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from client.augment import AugmentConfig, AugmentTask, load_demonstrations, prepared_segments
from client.corpus import Lines, check_input, open_corpora
from client.curate import Contamination, CurateConfig, ScoreTask, decontaminator, read_candidates, select
from client.journal import Journal, LineWriter, output_lock
from client.prepare import PrepareConfig, Preparer
from client.progress import Progress
from client.rewrite import RewriteConfig, RewriteTask
from client.runner import CorruptLines, RunSummary, run, side_path
from client.tasks import Item, Job, Parsed, Task
from humpback.contracts import (BatchRequest, BatchResult, Candidate, InputError, Rejected, RequestFailed,
                                RetryableError, Segment)

PathLike = str | os.PathLike[str]
Line = TypeVar("Line", bound=BaseModel)


class SegmentMeta(BaseModel):
    """A line of an augment export's meta file: the segment request `custom_id` backtranslates."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    segment: Segment

    @property
    def item(self) -> Segment:
        return self.segment


class CandidateMeta(BaseModel):
    """A line of a curate or rewrite export's meta file: the candidate request `custom_id` scores or
    rewrites."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    candidate: Candidate

    @property
    def item(self) -> Candidate:
        return self.candidate


def _meta_path(requests: Path) -> Path:
    return side_path(requests, "meta.jsonl")


def _export(task: Task[Item, Any], items: Iterable[Item], out: Path, meta: Callable[[str, Item], BaseModel],
            summary: RunSummary) -> None:
    """Write the request of each item, once per `custom_id` (batch APIs refuse a repeated one), and
    its meta line."""
    seen: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as req, open(_meta_path(out), "w", encoding="utf-8") as side:
        for item in items:
            request = task.request(item)
            if request.custom_id in seen:
                continue
            seen.add(request.custom_id)
            req.write(request.model_dump_json() + "\n")
            side.write(meta(request.custom_id, item).model_dump_json() + "\n")
            summary.results["requests"] += 1


def export_augment(corpus: Iterable[PathLike], out: PathLike, model: str, config: AugmentConfig | None = None,
                   prepare: PrepareConfig | None = None, text_field: str = "text") -> RunSummary:
    """Batch requests for every kept segment (one per distinct `custom_id`)."""
    out = Path(out)
    cfg = config or AugmentConfig()
    summary = RunSummary()
    preparer = Preparer(prepare)
    corpora = open_corpora(corpus, text_field)
    demonstrations = load_demonstrations(cfg)
    with output_lock(out), LineWriter(side_path(out, "errors.jsonl")) as errors:
        segments = (seg for _, seg in prepared_segments(corpora, preparer, errors, summary))
        _export(AugmentTask(model, None, cfg, demonstrations), segments, out,
                lambda cid, seg: SegmentMeta(custom_id=cid, segment=seg), summary)
    summary.prepare.update(preparer.counts)
    return summary


def export_curate(candidates: PathLike, out: PathLike, model: str, config: CurateConfig | None = None) -> RunSummary:
    """Batch scoring requests for every candidate of a candidates file (one per distinct `custom_id`),
    but the contaminated ones (`config.decontaminate`), which go to `<out>.contaminated.jsonl` as
    `curate` sets them aside: they are never asked, so an import never selects them."""
    cfg = config or CurateConfig()
    candidates, out = Path(candidates), Path(out)
    summary = RunSummary()
    check_input(candidates)
    found = decontaminator(cfg)
    with (output_lock(out), LineWriter(side_path(out, "errors.jsonl")) as errors,
          LineWriter(side_path(out, "contaminated.jsonl")) as contaminated):
        clean = Contamination(found, contaminated, summary).clean
        cands = (cand for cand, _ in clean(read_candidates(candidates, errors, summary, cfg.max_field_chars)))
        _export(ScoreTask(model, None, cfg), cands, out,
                lambda cid, cand: CandidateMeta(custom_id=cid, candidate=cand), summary)
    return summary


def export_rewrite(candidates: PathLike, out: PathLike, model: str, config: RewriteConfig | None = None) -> RunSummary:
    """Batch rewriting requests for every pair of a candidates file (one per distinct `custom_id`)."""
    cfg = config or RewriteConfig()
    candidates, out = Path(candidates), Path(out)
    summary = RunSummary()
    check_input(candidates)
    with output_lock(out), LineWriter(side_path(out, "errors.jsonl")) as errors:
        cands = (cand for cand, _ in read_candidates(candidates, errors, summary, cfg.max_field_chars))
        _export(RewriteTask(model, None, cfg), cands, out,
                lambda cid, cand: CandidateMeta(custom_id=cid, candidate=cand), summary)
    return summary


def _lines(path: Path, model: type[Line]) -> Iterator[Line]:
    """The lines of a file this module wrote, each read through its model."""
    lines = Lines(path, max_bytes=None)
    for lineno, line in lines:
        assert line is not None  # no size limit: every line comes whole
        try:
            rec = model.model_validate_json(line)
        except ValidationError as exc:
            raise InputError(f"{path}:{lineno}: not a {model.__name__} line ({exc.errors()[0]['msg']}); "
                             "export the requests again with `humpback batch export`") from None
        yield rec
    if lines.error is not None:
        raise InputError(f"{path}:{lines.lineno + 1}: {lines.error}; export the requests again with "
                         "`humpback batch export`")


def _exported(requests: Path) -> tuple[set[str], str]:
    """The `custom_id`s of an export's requests, and the model they name (the first request's)."""
    ids: set[str] = set()
    model = ""
    for request in _lines(requests, BatchRequest):
        model = model or str(request.body.get("model") or "")
        ids.add(request.custom_id)
    return ids, model


def _jobs(requests: Path, meta: type[SegmentMeta] | type[CandidateMeta]) -> Iterator[Job[Any]]:
    """Each exported request with the item of its meta line."""
    meta_path = _meta_path(requests)
    for n, (request, row) in enumerate(zip_longest(_lines(requests, BatchRequest), _lines(meta_path, meta)), 1):
        if request is None or row is None or request.custom_id != row.custom_id:
            raise InputError(f"{meta_path}:{n}: does not match line {n} of {requests}; "
                             "export the requests again with `humpback batch export`")
        yield Job(request, row.item, row.item.source)


def _invalid(exc: ValidationError) -> tuple[str | None, str]:
    """(field, reason) of a line that is not a batch result."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return None, f"invalid JSON: {err['ctx']['error']}"
    field = ".".join(map(str, err["loc"])) or None
    return field, f"not a batch result: {f'field {field!r}: ' if field else ''}{err['msg']}"


class BatchAnswers:
    """The answers of a batch output file, by `custom_id` (such files are bounded: 50k lines), given
    to `client.runner.run` as the servers' answers are online.

    Reading it sets aside, in `errors`, every line that is not a batch result (invalid JSON, no
    `custom_id`), names a `custom_id` not among `exported`, or repeats one (the first is kept).
    """

    def __init__(self, path: Path, exported: set[str], errors: LineWriter, summary: RunSummary) -> None:
        self.results: dict[str, BatchResult] = {}
        first: dict[str, int] = {}
        lines = Lines(path)
        for lineno, raw in lines:
            summary.input["results"] += 1
            if raw is None:
                field, reason = None, f"record larger than {lines.max_bytes} bytes"
            else:
                try:
                    res = BatchResult.model_validate_json(raw)
                except ValidationError as exc:
                    field, reason = _invalid(exc)
                else:
                    field = "custom_id"
                    if res.custom_id not in exported:
                        reason = "unknown custom_id: not among the exported requests"
                    elif res.custom_id in first:
                        reason = f"duplicate custom_id: first at line {first[res.custom_id]}"
                    else:
                        first[res.custom_id] = lineno
                        self.results[res.custom_id] = res
                        continue
            summary.input["rejected"] += 1
            summary.rejected[reason.split(":")[0]] += 1
            excerpt = None if raw is None else raw[:80].decode("utf-8", "replace")
            errors.write(Rejected(source=str(path), line=lineno, reason=reason, field=field,
                                  excerpt=excerpt).model_dump_json())
        broken = lines.broken()
        if broken is not None:
            summary.input["rejected"] += 1
            summary.rejected["unreadable file"] += 1
            errors.write(broken.model_dump_json())

    async def __call__(self, request: BatchRequest, parse: Callable[[dict[str, Any]], Parsed]) -> Parsed:
        res = self.results.get(request.custom_id)
        if res is None:
            raise RequestFailed("no result in the batch output", 0)
        reason = res.failure()
        if reason is not None:
            raise RequestFailed(reason, 1)
        try:
            return parse(res.response.body or {})  # type: ignore[union-attr]  # failure() saw a response
        except RetryableError as exc:  # nothing retries a batch answer: it failed
            raise RequestFailed(str(exc), 1) from None


def _check_import(requests: Path, results: Path) -> None:
    """The files an import reads, checked before anything is: the export's requests and meta file, the results."""
    for path in (requests, _meta_path(requests), results):
        check_input(path)


def _import(task: Task[Any, Any], requests: Path, meta: type[SegmentMeta] | type[CandidateMeta], exported: set[str],
            results: Path, journal_path: Path, out: Path, summary: RunSummary, errors: LineWriter,
            corrupt: CorruptLines | None) -> None:
    """Append the task's record of each exported request's answer to the journal (skipping ids
    already there, and passing the lines that are no record to `corrupt`); side files next to `out`."""
    failed = LineWriter(side_path(out, "failed.jsonl"))
    progress = Progress(0, "import", enabled=False)
    try:
        answers = BatchAnswers(results, exported, errors, summary)
        with Journal(journal_path, on_corrupt=corrupt) as journal:
            asyncio.run(run(task, _jobs(requests, meta), answers, journal, failed, summary, progress))
    finally:
        progress.close()
        failed.close()
        summary.results["failed"] = sum(summary.failures.values())
    if corrupt is not None:
        summary.extra["corrupt_journal_lines"] = corrupt.count


def _import_journal(task: Callable[[str], Task[Any, Any]], meta: type[SegmentMeta] | type[CandidateMeta],
                    requests: PathLike, results: PathLike, out: PathLike) -> RunSummary:
    """Append the records of the batch's answers to the `out` journal (skipping ids already there);
    `task(model)` is the task of the model the requests name."""
    requests, results, out = Path(requests), Path(results), Path(out)
    _check_import(requests, results)
    exported, model = _exported(requests)
    summary = RunSummary()
    with output_lock(out), LineWriter(side_path(out, "errors.jsonl")) as errors:
        _import(task(model), requests, meta, exported, results, out, out, summary, errors, CorruptLines(out, errors))
    return summary


def import_augment(requests: PathLike, results: PathLike, out: PathLike, checkpoint: str | None = None) -> RunSummary:
    """Append the batch's candidates to the `out` journal (skipping ids already there)."""
    return _import_journal(lambda model: AugmentTask(model, checkpoint), SegmentMeta, requests, results, out)


def import_curate(requests: PathLike, results: PathLike, out: PathLike, config: CurateConfig | None = None) -> RunSummary:
    """Append the batch's scores to the scored journal, then write the curated set to `out`."""
    cfg = config or CurateConfig()
    requests, results, out = Path(requests), Path(results), Path(out)
    _check_import(requests, results)
    exported, first_model = _exported(requests)
    model = cfg.model or first_model
    scored_path = Path(cfg.scored) if cfg.scored is not None else side_path(out, "scored.jsonl")
    summary = RunSummary()
    with output_lock(out, scored_path), LineWriter(side_path(out, "errors.jsonl")) as errors:
        _import(ScoreTask(model, cfg.checkpoint, cfg), requests, CandidateMeta, exported, results, scored_path,
                out, summary, errors, None)  # select() reports the scored journal's lines that are no record
        if model:
            select(scored_path, out, cfg, model, summary, side_path(out, "scores.png") if cfg.histogram else None,
                   errors)
    return summary


def import_rewrite(requests: PathLike, results: PathLike, out: PathLike, checkpoint: str | None = None) -> RunSummary:
    """Append the batch's rewrites to the `out` journal (skipping ids already there)."""
    return _import_journal(lambda model: RewriteTask(model, checkpoint, RewriteConfig()), CandidateMeta, requests,
                           results, out)
