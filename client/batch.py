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
from contextlib import nullcontext
from itertools import islice, zip_longest
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from client.augment import AugmentConfig, AugmentTask, load_demonstrations, prepared_segments
from client.corpus import Lines, check_input, open_corpora
from client.calibration import Combiner
from client.curate import (Contamination, CurateConfig, ScoreTask, backward_fanout, check_scorer, decontaminator,
                           likelihood_scorer, read_candidates, record_combiner, select, terms_file)
from client.extras import CurateExtra
from client.fanout import Fanout, FanoutConfig
from client.likelihood import (CHUNK, LikelihoodScorer, ScorerSpec, Term, TermTask, append_scores, read_terms,
                               term_jobs)
from client.journal import Journal, LineWriter, output_lock
from client.prepare import PrepareConfig, Preparer
from client.rewrite import RewriteConfig, RewriteTask
from client.runner import CorruptLines, OpenRun, RunSummary, open_run, run, served_model, side_path
from client.tasks import Item, Job, Parsed, Task
from humpback.contracts import (BatchRequest, BatchResult, Candidate, InputError, Rejected, RequestFailed,
                                RetryableError, Segment, Source)

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

    @property
    def source(self) -> Source:
        return self.segment.source


class CandidateMeta(BaseModel):
    """A line of a curate or rewrite export's meta file: the candidate request `custom_id` scores or
    rewrites."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    candidate: Candidate

    @property
    def item(self) -> Candidate:
        return self.candidate

    @property
    def source(self) -> Source:
        return self.candidate.source


class TermMeta(BaseModel):
    """A line of a likelihood scorer's export meta file: the term (tokenized) request `custom_id`
    asks the log-probability of (`client.likelihood`)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    term: Term

    @property
    def item(self) -> Term:
        return self.term

    @property
    def source(self) -> None:
        return None


Meta = type[SegmentMeta] | type[CandidateMeta] | type[TermMeta]


def _meta_path(requests: Path) -> Path:
    return side_path(requests, "meta.jsonl")


def _spec_path(requests: Path) -> Path:
    """Where a likelihood scorer's export records the scorer (`ScorerSpec`)."""
    return side_path(requests, "likelihood.json")


def _candidates_path(requests: Path) -> Path:
    """Where a likelihood scorer's export keeps the candidates its terms score."""
    return side_path(requests, "candidates.jsonl")


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


def export_curate(candidates: PathLike, out: PathLike, model: str, config: CurateConfig | None = None,
                  fanout: FanoutConfig | None = None) -> RunSummary[CurateExtra]:
    """Batch scoring requests for every candidate of a candidates file (one per distinct `custom_id`),
    but the contaminated ones (`config.decontaminate`), which go to `<out>.contaminated.jsonl` as
    `curate` sets them aside: they are never asked, so an import never selects them.

    A likelihood scorer (`config.scorer` pmi, reverse_pmi, combined) exports one completion request
    per distinct term, its tokens rendered by the servers' chat templates (`fanout` reaches the
    scorer, `config.backward_endpoint` the backward model; each request names the model that answers
    it), and beside the requests the scorer (`<out>.likelihood.json`) and the candidates
    (`<out>.candidates.jsonl`) the import scores from the terms' answers."""
    cfg = config or CurateConfig()
    candidates, out = Path(candidates), Path(out)
    summary = RunSummary(extra=CurateExtra())
    check_input(candidates)
    check_scorer(cfg)
    if cfg.scorer != "rubric" and fanout is None:
        raise InputError(f"--scorer {cfg.scorer}: the term requests are tokenized by the servers' chat templates; "
                         "pass the scorer's --endpoint URL")
    found = decontaminator(cfg)
    with (output_lock(out), LineWriter(side_path(out, "errors.jsonl")) as errors,
          LineWriter(side_path(out, "contaminated.jsonl")) as contaminated):
        clean = Contamination(found, contaminated, summary).clean
        cands = (cand for cand, _ in clean(read_candidates(candidates, errors, summary, cfg.max_field_chars)))
        if cfg.scorer == "rubric":
            _export(ScoreTask(model, None, cfg), cands, out,
                    lambda cid, cand: CandidateMeta(custom_id=cid, candidate=cand), summary)
        else:
            assert fanout is not None
            asyncio.run(_export_terms(cands, out, cfg.model_copy(update={"model": cfg.model or model}), fanout,
                                      summary))
    return summary


async def _export_terms(cands: Iterable[Candidate], out: Path, cfg: CurateConfig, fanout: FanoutConfig,
                        summary: RunSummary) -> None:
    """Write the request of every distinct term of `cands` (tokenized by its model's server), its meta
    line, the scorer and the candidates."""
    back_cfg = backward_fanout(fanout, cfg)
    async with Fanout(fanout) as fan, Fanout(back_cfg) if back_cfg is not None else nullcontext(None) as back:
        model, root = await served_model(fan, cfg.model)
        scorer = await likelihood_scorer(cfg, fan, model, root, back)
        out.parent.mkdir(parents=True, exist_ok=True)
        _spec_path(out).write_text(scorer.spec().model_dump_json() + "\n", encoding="utf-8")
        seen: set[str] = set()
        it = iter(cands)
        with (open(out, "w", encoding="utf-8") as req, open(_meta_path(out), "w", encoding="utf-8") as side,
              open(_candidates_path(out), "w", encoding="utf-8") as kept):
            while chunk := list(islice(it, CHUNK)):
                kept.writelines(c.model_dump_json() + "\n" for c in chunk)
                jobs, unusable = await term_jobs(scorer, chunk, seen)
                for _, job in jobs:
                    req.write(job.request.model_dump_json() + "\n")
                    side.write(TermMeta(custom_id=job.request.custom_id, term=job.item).model_dump_json() + "\n")
                summary.results["requests"] += len(jobs)
                summary.results["unusable_terms"] += len(unusable)


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


def _jobs(requests: Path, meta: Meta) -> Iterator[Job[Any]]:
    """Each exported request with the item of its meta line."""
    meta_path = _meta_path(requests)
    for n, (request, row) in enumerate(zip_longest(_lines(requests, BatchRequest), _lines(meta_path, meta)), 1):
        if request is None or row is None or request.custom_id != row.custom_id:
            raise InputError(f"{meta_path}:{n}: does not match line {n} of {requests}; "
                             "export the requests again with `humpback batch export`")
        yield Job(request, row.item, row.source)


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


def _import(task: Task[Any, Any], requests: Path, meta: Meta, exported: set[str], results: Path,
            opened: OpenRun) -> None:
    """Append the task's record of each exported request's answer to `opened`'s journal (skipping ids
    already there); the result lines that are no answer go to its errors, the requests without a
    usable answer to its failures."""
    answers = BatchAnswers(results, exported, opened.errors, opened.summary)
    asyncio.run(run(task, _jobs(requests, meta), answers, opened.journal, opened.failed, opened.summary,
                    opened.progress))


def _import_journal(task: Callable[[str], Task[Any, Any]], meta: Meta,
                    requests: PathLike, results: PathLike, out: PathLike) -> RunSummary:
    """Append the records of the batch's answers to the `out` journal (skipping ids already there);
    `task(model)` is the task of the model the requests name. A run as an online one is
    (`client.runner.open_run`): `<out>.summary.json` is written however it ends."""
    requests, results, out = Path(requests), Path(results), Path(out)
    _check_import(requests, results)
    exported, model = _exported(requests)
    with open_run(out, "import", 0, progress=False) as opened:
        _import(task(model), requests, meta, exported, results, opened)
    return opened.summary


def import_augment(requests: PathLike, results: PathLike, out: PathLike, checkpoint: str | None = None) -> RunSummary:
    """Append the batch's candidates to the `out` journal (skipping ids already there)."""
    return _import_journal(lambda model: AugmentTask(model, checkpoint), SegmentMeta, requests, results, out)


def import_curate(requests: PathLike, results: PathLike, out: PathLike,
                  config: CurateConfig | None = None) -> RunSummary[CurateExtra]:
    """Append the batch's scores to the scored journal, then write the curated set to `out`."""
    cfg = config or CurateConfig()
    requests, results, out = Path(requests), Path(results), Path(out)
    _check_import(requests, results)
    exported, first_model = _exported(requests)
    model = cfg.model or first_model
    scored_path = Path(cfg.scored) if cfg.scored is not None else side_path(out, "scored.jsonl")
    if _spec_path(requests).exists():
        return _import_terms(requests, results, out, scored_path, exported, cfg)
    # select() reports the scored journal's lines that are no record, so the journal's opening does not.
    with open_run(out, "import", 0, journal=scored_path, progress=False,
                  corrupt_lines=False, extra=CurateExtra()) as opened:
        _import(ScoreTask(model, cfg.checkpoint, cfg), requests, CandidateMeta, exported, results, opened)
        opened.journal.close()
        if model:
            select(scored_path, out, cfg, model, opened.summary,
                   side_path(out, "scores.png") if cfg.histogram else None, opened.errors)
    return opened.summary


def _import_terms(requests: Path, results: Path, out: Path, scored_path: Path, exported: set[str],
                  cfg: CurateConfig) -> RunSummary[CurateExtra]:
    """A likelihood scorer's import: the terms' answers to the terms' journal (their failures to
    `<terms>.failed.jsonl`), then each exported candidate whose terms are all in to the scored journal
    (the others to `<out>.failed.jsonl`), then the selection, as the export's scorer."""
    for path in (_spec_path(requests), _candidates_path(requests)):
        check_input(path)
    spec = ScorerSpec.model_validate_json(_spec_path(requests).read_bytes())
    cfg = cfg.model_copy(update={"scorer": spec.scorer})
    if spec.scorer == "combined" and cfg.calibration is None:
        raise InputError("the export's scorer is combined: pass its --calibration FILE")
    combine = Combiner.load(cfg.calibration) if cfg.calibration is not None else None
    scorer = LikelihoodScorer.from_spec(spec, combine)
    terms = terms_file(cfg, scored_path)
    with open_run(out, "import", 0, journal=scored_path, locks=[terms], progress=False,
                  corrupt_lines=False, extra=CurateExtra()) as opened:
        summary, term_summary = opened.summary, RunSummary()
        with (Journal(terms, on_corrupt=CorruptLines(terms, opened.errors)) as term_journal,
              LineWriter(side_path(terms, "failed.jsonl")) as term_failed):
            _import(TermTask(spec.model, spec.checkpoint), requests, TermMeta, exported, results,
                    OpenRun(term_summary, term_journal, opened.errors, term_failed, opened.progress))
        term_summary.results["failed"] = sum(term_summary.failures.values())
        summary.extra.terms = dict(term_summary.results)
        cands = ((c, 0) for c in _lines(_candidates_path(requests), Candidate))
        append_scores(scorer, cands, opened.journal, read_terms(terms), {}, opened.failed, summary, opened.progress)
        opened.journal.close()
        record_combiner(cfg, out, summary)
        select(scored_path, out, cfg, spec.model, summary, side_path(out, "scores.png") if cfg.histogram else None,
               opened.errors)
    return summary


def import_rewrite(requests: PathLike, results: PathLike, out: PathLike, checkpoint: str | None = None) -> RunSummary:
    """Append the batch's rewrites to the `out` journal (skipping ids already there)."""
    return _import_journal(lambda model: RewriteTask(model, checkpoint, RewriteConfig()), CandidateMeta, requests,
                           results, out)
