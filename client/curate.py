"""Self-curation: score candidates with the scorer on the paper's 5-point rubric, select A_k.

Two scoring modes share the rubric prefix (so vLLM's prefix cache serves it once per server):
- "logprobs" (default): the answer is constrained to one digit "1".."5" and the top log-probabilities
  give a distribution over the digits and an expected score, so "score >= 4.5" is well defined;
- "free_text": the paper's prompt, a brief reasoning ending in "Score: N", parsed; the parse rate is
  reported.
Scored candidates go to a resumable journal; the curated set is rewritten from it on every run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.augment import served_model
from client.completions import chat_choice, choice_mass
from client.dispatch import Job, RunSummary, dispatch, side_path
from client.fanout import Fanout, FanoutConfig, RequestFailed
from client.journal import FsyncPolicy, Journal, LineWriter
from client.progress import Progress
from humpback.contracts import (
    AUGMENTED_SYSTEM_PROMPT,
    BAND_LABELS,
    CHAT_PATH,
    SCORE_CHOICES,
    UNPARSED,
    Rejected,
    ScoredCandidate,
    Source,
    band_of,
    content_id,
    ScoreMode,
    parse_free_text_score,
    rubric_messages,
    tagged_example,
)

log = logging.getLogger(__name__)

HIST_BINS = 40


@dataclass
class CurateConfig:
    """Scoring and selection settings.

    mode: "logprobs" (expected score from digit probabilities) or "free_text" (the paper's format).
    min_score: select pairs with score >= min_score (paper's A_5 is "score >= 4.5").
    top_fraction: instead, select the best-scored fraction of pairs: k becomes the score of the last
        pair of that fraction (ties kept) and is reported; for scorers whose scale is off, such as a
        small model after a few CPU steps.
    model, checkpoint: served scorer name (None: the first listed) and recorded version label.
    max_tokens: budget of the free-text reasoning.
    temperature: 0 makes scores reproducible; the paper does not say how it sampled.
    scored: path of the scored-candidates journal; None puts it next to `out` as `<out>.scored.jsonl`.
    histogram: draw `<out>.scores.png`.
    """

    mode: ScoreMode = "logprobs"
    min_score: float = 4.5
    top_fraction: float | None = None
    model: str | None = None
    checkpoint: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    scored: str | os.PathLike[str] | None = None
    histogram: bool = True
    fsync: FsyncPolicy = "interval"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must lie in (0, 1], got {self.top_fraction}")


@dataclass
class Pair:
    """One (instruction, output) pair to score, as read from a candidates file."""

    candidate_id: str
    instruction: str
    output: str
    source: Source
    pos: int = 0  # bytes of the candidates file read so far, for progress


def read_pairs(path: Path, errors: LineWriter, summary: RunSummary) -> Iterator[Pair]:
    """Candidates from a JSONL file: `instruction` and `output` strings; other fields optional."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            summary.input["records"] += 1
            reason, field = None, None
            obj: Any = None
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                reason = f"invalid JSON: {exc}"
            if reason is None and not isinstance(obj, dict):
                reason = "expected a JSON object"
            if reason is None:
                for field in ("instruction", "output"):
                    v = obj.get(field)
                    if not isinstance(v, str) or not v.strip():
                        reason = f"field {field!r} missing, empty or not a string"
                        break
            if reason is not None:
                summary.input["rejected"] += 1
                summary.rejected[reason.split(":")[0]] += 1
                errors.write(Rejected(source=str(path), line=lineno, reason=reason, field=field,
                                      excerpt=raw[:80].decode("utf-8", "replace")).model_dump_json())
                continue
            src = obj.get("source")
            try:
                source = Source.model_validate(src) if isinstance(src, dict) else Source(path=str(path), line=lineno)
            except ValueError:
                source = Source(path=str(path), line=lineno)
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid:
                cid = content_id("pair", obj["instruction"], obj["output"])
            yield Pair(cid, obj["instruction"], obj["output"], source, f.tell())


def score_request(pair: Pair, model: str, cfg: CurateConfig) -> tuple[str, dict[str, Any]]:
    """The `custom_id` and chat-completions body that score one pair (shared with batch export)."""
    messages = rubric_messages(pair.instruction, pair.output, cfg.mode)
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": cfg.temperature}
    if cfg.mode == "logprobs":
        body.update(max_tokens=1, logprobs=True, top_logprobs=len(SCORE_CHOICES),
                    structured_outputs={"choice": list(SCORE_CHOICES)})
    else:
        body["max_tokens"] = cfg.max_tokens
    return content_id("score", cfg.mode, messages, model, body.get("max_tokens"), cfg.temperature), body


def parse_logprob_score(data: dict[str, Any]) -> tuple[float, dict[str, float], str]:
    """(expected score, distribution over "1".."5", chosen digit) from a constrained chat completion."""
    choice, content = chat_choice(data)
    content = content.strip()
    mass = choice_mass(choice, SCORE_CHOICES)
    total = sum(mass.values())
    if total <= 0:  # no log-probabilities returned: fall back on the chosen digit
        if content not in mass:
            raise RequestFailed(f"no score digit in the answer {content[:40]!r}", 1)
        mass[content], total = 1.0, 1.0
    dist = {k: v / total for k, v in mass.items()}
    return sum(int(k) * p for k, p in dist.items()), dist, content


def parse_free_text(data: dict[str, Any]) -> tuple[float | None, str]:
    """(parsed score or None, raw text) from a free-text rubric answer."""
    _, text = chat_choice(data)
    score = parse_free_text_score(text)
    return (None if score is None else float(score)), text


def score_parser(mode: ScoreMode) -> Any:
    """The response parser of a scoring mode."""
    return parse_logprob_score if mode == "logprobs" else parse_free_text


def scored_line(cid: str, pair: Pair, result: Any, mode: ScoreMode, model: str, checkpoint: str | None) -> str:
    """The scored-journal line of a pair, from what `parse_logprob_score` / `parse_free_text` returned."""
    score, dist, raw = result if mode == "logprobs" else (result[0], None, result[1])
    return ScoredCandidate(custom_id=cid, candidate_id=pair.candidate_id, instruction=pair.instruction,
                           output=pair.output, source=pair.source, mode=mode, score=score, distribution=dist,
                           raw=raw, scorer_model=model, scorer_checkpoint=checkpoint).model_dump_json()


def _scored(scored: Path, mode: str, scorer_model: str) -> Iterator[ScoredCandidate]:
    """This mode's and scorer's records of a scored journal (it may hold others)."""
    with open(scored, encoding="utf-8") as src:
        for line in src:
            rec = ScoredCandidate.model_validate_json(line)
            if rec.mode == mode and rec.scorer_model == scorer_model:
                yield rec


def threshold(scored: Path, cfg: CurateConfig, scorer_model: str) -> float:
    """k: cfg.min_score, or the score of the last pair in the top cfg.top_fraction."""
    if cfg.top_fraction is None:
        return cfg.min_score
    ranked = sorted((r.score for r in _scored(scored, cfg.mode, scorer_model) if r.score is not None), reverse=True)
    if not ranked:
        return cfg.min_score
    return ranked[max(1, math.ceil(cfg.top_fraction * len(ranked))) - 1]


def select(scored: Path, out: Path, cfg: CurateConfig, scorer_model: str, summary: RunSummary,
           histogram: Path | None) -> None:
    """Rewrite the curated chat-format set from the scored journal; count bands; draw the histogram."""
    k = threshold(scored, cfg, scorer_model)
    bins = [0] * HIST_BINS
    bands = dict.fromkeys([*BAND_LABELS, UNPARSED], 0)
    kept = 0
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as dst:
        for rec in _scored(scored, cfg.mode, scorer_model):
            bands[band_of(rec.score)] += 1
            if rec.score is None:
                continue
            bins[min(HIST_BINS - 1, max(0, int((rec.score - 1.0) / 4.0 * HIST_BINS)))] += 1
            if rec.score >= k:
                dst.write(tagged_example(rec.instruction, rec.output, AUGMENTED_SYSTEM_PROMPT).model_dump_json() + "\n")
                kept += 1
    os.replace(tmp, out)
    total = sum(bands.values())
    summary.extra["bands"] = bands
    summary.extra["selected"] = kept
    summary.extra["min_score"] = k
    summary.extra["top_fraction"] = cfg.top_fraction
    summary.extra["scored_total"] = total
    if cfg.mode == "free_text":
        summary.extra["parse_rate"] = round((total - bands[UNPARSED]) / total, 4) if total else None
    if histogram is not None and total:
        from client.plot import score_histogram

        rule = f"top {cfg.top_fraction:.0%}: " if cfg.top_fraction is not None else ""
        score_histogram(bins, 1.0, 5.0, k, histogram,
                        f"{scorer_model} ({cfg.mode}): {rule}{kept} of {total} pairs >= {k:.3g}")


async def curate(candidates: str | os.PathLike[str], out: str | os.PathLike[str], fanout: FanoutConfig,
                 config: CurateConfig | None = None) -> RunSummary:
    """Score every pair of `candidates`, then write A_k (score >= min_score) to `out` as chat JSONL.

    Resumable like `augment`: the scored journal (`<out>.scored.jsonl` unless `config.scored`) keeps
    every finished score; a re-run scores only what is missing and rewrites `out` from the journal.
    """
    cfg = config or CurateConfig()
    out = Path(out)
    candidates = Path(candidates)
    scored_path = Path(cfg.scored) if cfg.scored is not None else side_path(out, "scored.jsonl")
    summary = RunSummary()
    errors = LineWriter(side_path(out, "errors.jsonl"))
    failed = LineWriter(side_path(out, "failed.jsonl"))
    start = time.monotonic()
    journal = Journal(scored_path, fsync=cfg.fsync).open()
    summary.results["already_done"] = len(journal.done)
    summary.extra["repaired_bytes"] = journal.repaired_bytes
    progress = Progress(candidates.stat().st_size, f"curate[{cfg.mode}]", cfg.progress)
    model = cfg.model or ""
    try:
        async with Fanout(fanout) as fan:
            model, root = await served_model(fan, cfg.model)
            checkpoint = cfg.checkpoint or root
            summary.extra.update(model=model, checkpoint=checkpoint, mode=cfg.mode)

            def record(job: Job[Pair], result: Any) -> str:
                return scored_line(job.custom_id, job.item, result, cfg.mode, model, checkpoint)

            jobs = (Job(*score_request(pair, model, cfg), pair, pair.source, pair.pos)
                    for pair in read_pairs(candidates, errors, summary))
            await dispatch(fan, CHAT_PATH, jobs, score_parser(cfg.mode), record, journal, failed, summary, progress)
            summary.extra["retries"] = fan.retries
    finally:
        progress.close()
        journal.close()
        errors.close()
        failed.close()
        summary.results["failed"] = sum(summary.failures.values())
    if model:
        select(scored_path, out, cfg, model, summary, side_path(out, "scores.png") if cfg.histogram else None)
    summary.elapsed_s = time.monotonic() - start
    summary.write(side_path(out, "summary.json"))
    return summary
