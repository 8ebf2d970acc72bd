"""`humpback eval scorer`: how well the curation scorer tells good pairs from bad ones.

Positives are the held-out human pairs (x, y). Negatives are built from them, deterministically from
`--seed`, one of each kind per pair where the kind applies:
- `mismatched`: x of another pair with y (each pair gives its instruction to the next in one seeded
  cycle, so none keeps its own);
- `first_sentence`: x with y cut to its first sentence (left out where y is one sentence);
- `passage`: x with a passage of `--corpus` in place of y, prepared as `augment` prepares segments
  (JSONL with "text", or plain-text paragraphs; a seeded sample). Without `--corpus` this kind is
  left out, and the command says so.
Each pair is scored as `curate` scores it (`ScoreTask`, the rubric's expected score over the digits).

- `auc`: ROC AUC of the score, positives against all negatives (ties count half); `auc_<kind>`
  against one kind;
- `precision_at_k`: share of positives among the pairs scored >= `--threshold` (curate's
  `--min-score`, 4.5 by default), the paper's Table 7 measure; here a quarter of the pairs or fewer
  are positives, so a scorer that keeps everything scores about 0.25-0.33; `recall_at_k`: share of
  positives kept;
- `mean_score_<kind>` for the positives and each negative kind.

Scores are journaled beside `--out` (`<out>.scores.journal.jsonl`); the rows go to `<out>.rows.jsonl`.
"""

from __future__ import annotations

import heapq
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from client.corpus import Corpus
from client.curate import CurateConfig, ScoreTask
from client.fanout import Fanout, FanoutConfig
from client.prepare import Preparer
from client.runner import served_model
from humpback.contracts import (
    BatchRequest,
    Candidate,
    InputError,
    ScoredCandidate,
    Segment,
    Source,
    content_id,
    write_jsonl,
)
from humpback.evaluation.common import run_journaled, subset
from humpback.evaluation.metrics import Metric, auc_metric, beside, mean_metric, read_pairs, write_metrics
from humpback.evaluation.records import HeldoutPair, ScorerRow
from humpback.settings import setting

log = logging.getLogger(__name__)

NEGATIVE_KINDS = ("mismatched", "first_sentence", "passage")


class ScorerEvalConfig(BaseModel):
    """What `eval scorer` keeps and which passages make negatives."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = setting(CurateConfig.model_fields["min_score"].default,
                               "precision_at_k and recall_at_k keep the pairs scored >= this (curate's --min-score)")
    corpus: Path | None = setting(None, "corpus whose passages replace responses (JSONL with 'text', or plain-text "
                                        "paragraphs; prepared as augment prepares segments); without it, no "
                                        "'passage' negatives")


_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


def first_sentence(text: str) -> str | None:
    """`text` up to its first sentence end (., ! or ? before white space) or line break; None when
    that is all of it."""
    text = text.strip()
    m = _SENTENCE_END.search(text)
    cut = text[:m.end()].strip() if m else text
    return cut if cut and len(cut) < len(text) else None


def sample_passages(corpus: Path, n: int, seed: int) -> list[str]:
    """`n` prepared segments of `corpus` (all when it has fewer), a seeded sample read in one pass."""
    rng = random.Random(f"{seed}:passage")
    keyed = ((rng.random(), seg.text) for seg in _segments(corpus))
    chosen = heapq.nsmallest(n, keyed)
    if not chosen:
        raise InputError(f"{corpus}: no passage of 600-3,000 characters survives augment's preparation; "
                         "pass a corpus with longer paragraphs")
    return [text for _, text in chosen]


def _segments(corpus: Path) -> Iterator[Segment]:
    preparer = Preparer()
    for doc in Corpus(corpus):
        if isinstance(doc, Segment):
            yield from preparer(doc)


def negatives(pairs: list[HeldoutPair], seed: int, passages: list[str] | None) -> list[tuple[str, HeldoutPair, str, str]]:
    """(kind, pair it was built from, instruction, output) of every negative, kind by kind."""
    out = []
    if len(pairs) > 1:
        cycle = list(range(len(pairs)))
        random.Random(f"{seed}:mismatched").shuffle(cycle)
        donor = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
        out += [("mismatched", p, pairs[donor[i]].instruction, p.response) for i, p in enumerate(pairs)
                if pairs[donor[i]].instruction != p.instruction]
    out += [("first_sentence", p, p.instruction, cut) for p in pairs if (cut := first_sentence(p.response))]
    if passages:
        out += [("passage", p, p.instruction, passages[i % len(passages)]) for i, p in enumerate(pairs)]
    return out


@dataclass(frozen=True)
class EvalScoreTask:
    """`curate`'s scoring task, its journal keyed by the served weights too (a swapped checkpoint under
    the same name is asked again)."""

    score: ScoreTask

    def request(self, cand: Candidate) -> BatchRequest:
        req = self.score.request(cand)
        return BatchRequest(custom_id=content_id("eval-scorer", req.body, self.score.checkpoint), body=req.body)

    def parse(self, body: dict[str, Any]) -> tuple[float | None, dict[str, float] | None, str]:
        return self.score.parse(body)

    def record(self, custom_id: str, cand: Candidate,
               parsed: tuple[float | None, dict[str, float] | None, str]) -> ScoredCandidate:
        return self.score.record(custom_id, cand, parsed)


def scorer_metrics(rows: list[ScorerRow], threshold: float, seed: int = 0) -> dict[str, Metric]:
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r.score)
    positives = by_kind.get("positive", [])
    kinds = [k for k in NEGATIVE_KINDS if k in by_kind]
    metrics = {
        "auc": auc_metric(positives, [r.score for r in rows if r.kind != "positive"], seed),
        "precision_at_k": mean_metric([r.kind == "positive" for r in rows if r.score >= threshold], seed),
        "recall_at_k": mean_metric([s >= threshold for s in positives], seed),
    }
    metrics.update({f"mean_score_{k}": mean_metric(by_kind[k], seed) for k in ("positive", *kinds)})
    metrics.update({f"auc_{k}": auc_metric(positives, by_kind[k], seed) for k in kinds})
    return metrics


async def run_scorer_eval(pairs_path: Path, out: Path, fanout: FanoutConfig, model: str | None = None,
                          config: ScorerEvalConfig | None = None, limit: int | None = None,
                          seed: int = 0) -> dict[str, Metric]:
    """The scorer metrics of the served `model` on the held-out pairs of `pairs_path` (a `limit` subset
    drawn with `seed`) and the negatives built from them with `seed`, written to `out` (JSON) with the
    rows beside it."""
    cfg = config or ScorerEvalConfig()
    pairs = read_pairs(pairs_path)
    pairs = [pairs[i] for i in subset(len(pairs), limit, seed)]
    if cfg.corpus is None:
        log.warning("no --corpus: the scorer is measured without 'passage' negatives")
    passages = None if cfg.corpus is None else sample_passages(cfg.corpus, len(pairs), seed)
    built = [("positive", p, p.instruction, p.response) for p in pairs] + negatives(pairs, seed, passages)
    candidates = [Candidate(custom_id=content_id("eval-scorer-pair", instruction, output), instruction=instruction,
                            output=output, source=Source(path=str(pairs_path), line=p.line, metadata={"kind": kind}),
                            model="")
                  for kind, p, instruction, output in built]
    async with Fanout(fanout) as fan:
        name, root = await served_model(fan, model)
        task = EvalScoreTask(ScoreTask(name, root, CurateConfig(model=name)))
        scored = await run_journaled(task, candidates, fan, beside(out, "scores"), ScoredCandidate)
    rows = [ScorerRow(line=p.line, kind=kind, instruction=instruction, output=output, score=s.score)
            for (kind, p, instruction, output), s in zip(built, scored)]
    write_jsonl(beside(out, "rows.jsonl"), rows)
    metrics = scorer_metrics(rows, cfg.threshold, seed)
    write_metrics(out, metrics)
    return metrics
