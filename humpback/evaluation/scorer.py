"""`humpback eval scorer`: how well the curation scorer tells good pairs from bad ones.

Positives are the held-out human pairs (x, y). Negatives are built from them, deterministically from
`--seed`, one of each kind per pair where the kind applies:
- `mismatched`: x of another pair with y (each pair gives its instruction to the next in one seeded
  cycle, so none keeps its own);
- `first_sentence`: x with y cut to its first sentence (left out where y is one sentence);
- `passage`: x with a passage of `--corpus` in place of y, prepared as `augment` prepares segments
  (JSONL with "text", or plain-text paragraphs; a seeded sample). Without `--corpus` this kind is
  left out, and the command says so;
- `generic`: a generic or meta instruction ("How can I help you?") with y: what a weak backward
  model writes;
- `boilerplate`: x with web boilerplate (navigation, cookie notice, license, table of contents) as
  the response: what a crawled corpus holds.
Each pair is scored as `curate` scores it, with the same `--scorer` (and `--mode`, or
`--backward-endpoint` and `--calibration`).

- `auc`: ROC AUC of the score, positives against all negatives (ties count half); `auc_<kind>`
  against one kind; `length_auc` and `length_auc_<kind>`: the same for the response's length in
  characters alone, so no scorer is credited for what length already tells;
- `signal_auc_<signal>` (likelihood scorers): the AUC of each signal the scorer computed;
- `precision_at_k`: share of positives among the pairs scored >= `--threshold` (curate's
  `--min-score` for the rubric, `--min-prob` for combined, 0.5 without one), the paper's Table 7 measure; here a fifth
  of the pairs or fewer are positives, so a scorer that keeps everything scores about 0.2;
  `recall_at_k`: share of positives kept; `precision_at_r`: share of positives among as many
  best-scored pairs as there are positives (scale-free: every scorer has one);
- `kept_length` and `all_length`: mean response characters of the pairs kept at the threshold (at
  `precision_at_r`'s cut where there is none) and of all pairs (summed likelihoods favour length);
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
from client.curate import CurateConfig, ScoreTask, check_scorer, likelihood_records
from client.fanout import Fanout, FanoutConfig
from client.prepare import Preparer
from client.runner import served_model, side_path
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

NEGATIVE_KINDS = ("mismatched", "first_sentence", "passage", "generic", "boilerplate")

# What a backward model writes when it cannot tell what a passage answers (measured: SmolLM2-135M's
# meta-answers), and requests that fit any response.
GENERIC_INSTRUCTIONS = (
    "How can I help you?",
    "Write a response.",
    "Tell me more.",
    "Can you explain this?",
    "What is the answer?",
    "Please provide a detailed response to the instruction.",
    "Write the text.",
    "What do you think?",
)
# Text a crawl keeps beside the content: navigation, cookie notices, licenses, tables of contents.
BOILERPLATE = (
    "Home | About Us | Products | Services | Blog | Contact | Login | Register | Privacy Policy | Terms of Use | "
    "Sitemap",
    "This website uses cookies to ensure you get the best experience on our website. By continuing to browse the "
    "site you are agreeing to our use of cookies. Learn more. Accept all cookies. Manage preferences.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated "
    "documentation files, to deal in the Software without restriction, subject to the following conditions: The "
    "above copyright notice and this permission notice shall be included in all copies or substantial portions of "
    "the Software.",
    "Table of Contents\n1. Introduction\n2. Getting Started\n2.1 Installation\n2.2 Configuration\n3. Usage\n"
    "4. Advanced Topics\n5. Troubleshooting\n6. Index",
    "Copyright (c) 2024 All rights reserved. No part of this publication may be reproduced, distributed, or "
    "transmitted in any form or by any means without the prior written permission of the publisher.",
    "Previous page | Next page | Back to top | Print this page | Share on Facebook | Share on Twitter | Email a "
    "friend | Subscribe to our newsletter",
)


class ScorerEvalConfig(BaseModel):
    """What `eval scorer` keeps and which passages make negatives."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = setting(None, "precision_at_k and recall_at_k keep the pairs scored >= this; unset: "
                                            "curate's --min-score for the rubric, --min-prob for combined, none for "
                                            "pmi and reverse_pmi (their scale is the model's)")
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
    rng = random.Random(f"{seed}:generic")
    out += [("generic", p, x, p.response) for p in pairs
            if (x := rng.choice(GENERIC_INSTRUCTIONS)) != p.instruction]
    rng = random.Random(f"{seed}:boilerplate")
    out += [("boilerplate", p, p.instruction, rng.choice(BOILERPLATE)) for p in pairs]
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


# The signals whose AUC `eval scorer` reports (higher = a better pair); IFD ranks as the per-token PMI.
SIGNALS = ("pmi", "pmi_per_token", "reverse_pmi", "reverse_pmi_per_token")


def _auc_by_kind(name: str, value: dict[str, list[float]], seed: int) -> dict[str, Metric]:
    """`name` (the AUC of `value`'s positives against all negatives) and `name_<kind>` for each kind."""
    positives = value.get("positive", [])
    kinds = [k for k in NEGATIVE_KINDS if k in value]
    metrics = {name: auc_metric(positives, [v for k in kinds for v in value[k]], seed)}
    metrics.update({f"{name}_{k}": auc_metric(positives, value[k], seed) for k in kinds})
    return metrics


def scorer_metrics(rows: list[ScorerRow], threshold: float | None, seed: int = 0) -> dict[str, Metric]:
    by_kind: dict[str, list[float]] = {}
    length: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r.score)
        length.setdefault(r.kind, []).append(float(len(r.output)))
    positives = by_kind.get("positive", [])
    kinds = [k for k in NEGATIVE_KINDS if k in by_kind]
    ranked = sorted(rows, key=lambda r: r.score, reverse=True)
    top = ranked[:len(positives)]
    kept = [r for r in rows if r.score >= threshold] if threshold is not None else top
    metrics = _auc_by_kind("auc", by_kind, seed)
    metrics["precision_at_r"] = mean_metric([r.kind == "positive" for r in top], seed)
    if threshold is not None:
        metrics["precision_at_k"] = mean_metric([r.kind == "positive" for r in kept], seed)
        metrics["recall_at_k"] = mean_metric([s >= threshold for s in positives], seed)
    metrics["kept_length"] = mean_metric([float(len(r.output)) for r in kept], seed)
    metrics["all_length"] = mean_metric([float(len(r.output)) for r in rows], seed)
    metrics.update(_auc_by_kind("length_auc", length, seed))
    for signal in SIGNALS:
        if all(r.signals is not None and signal in r.signals for r in rows):
            value: dict[str, list[float]] = {}
            for r in rows:
                value.setdefault(r.kind, []).append(r.signals[signal])  # type: ignore[index]  # checked above
            metrics[f"signal_auc_{signal}"] = _auc_by_kind("auc", value, seed)["auc"]
    metrics.update({f"mean_score_{k}": mean_metric(by_kind[k], seed) for k in ("positive", *kinds)})
    return metrics


def default_threshold(score: CurateConfig) -> float | None:
    """The threshold `eval scorer` keeps pairs at when none is given: curate's own for its scorer."""
    if score.scorer == "rubric":
        return score.min_score
    if score.scorer == "combined":
        return score.min_prob if score.min_prob is not None else 0.5
    return None


async def score_pairs(pairs_path: Path, out: Path, fanout: FanoutConfig, model: str | None, cfg: ScorerEvalConfig,
                      limit: int | None, seed: int, score: CurateConfig
                      ) -> tuple[list[tuple[str, HeldoutPair, str, str]], list[ScoredCandidate], CurateConfig]:
    """(every pair built: the held-out positives of `pairs_path`, a `limit` subset drawn with `seed`,
    and the negatives built from them with `seed`; its score, in order; the scoring settings with the
    served model's name), each scored by the served `model` as `score` says and journaled beside `out`."""
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
        curate_cfg = score.model_copy(update={"model": name})
        # The weights' version, as curate records it: a server that reloads other weights keeps its root.
        checkpoint = curate_cfg.checkpoint or root
        if curate_cfg.scorer == "rubric":
            task = EvalScoreTask(ScoreTask(name, checkpoint, curate_cfg))
            scored = await run_journaled(task, candidates, fan, beside(out, "scores"), ScoredCandidate)
        else:
            scored = await likelihood_records(candidates, fan, name, checkpoint, curate_cfg, fanout,
                                              side_path(beside(out, "scores"), "journal.jsonl"))
    return built, scored, curate_cfg


def pair_ids(pairs: list[HeldoutPair]) -> list[str]:
    """The content ids of held-out pairs: what a combiner records of the pairs it was fitted on."""
    return [content_id("pair", p.instruction, p.response) for p in pairs]


def check_calibration(score: CurateConfig, pairs_path: Path) -> None:
    """`InputError` when the combined scorer's combiner was fitted on a pair of `pairs_path`: it is
    never measured on the pairs it learnt from."""
    if score.scorer != "combined" or score.calibration is None:
        return
    from client.calibration import Combiner

    seen = set(Combiner.load(score.calibration).pair_ids) & set(pair_ids(read_pairs(pairs_path)))
    if seen:
        raise InputError(f"{score.calibration} was fitted on {len(seen)} of the pairs of {pairs_path}: measure it "
                         "on pairs held out of its calibration")


async def run_scorer_eval(pairs_path: Path, out: Path, fanout: FanoutConfig, model: str | None = None,
                          config: ScorerEvalConfig | None = None, limit: int | None = None,
                          seed: int = 0, score: CurateConfig | None = None) -> dict[str, Metric]:
    """The scorer metrics of the served `model` (scoring as `score` says: curate's scorer, mode,
    backward endpoint and calibration) on the held-out pairs of `pairs_path` (a `limit` subset drawn
    with `seed`) and the negatives built from them with `seed`, written to `out` (JSON) with the rows
    beside it."""
    cfg = config or ScorerEvalConfig()
    score = score or CurateConfig()
    check_scorer(score)
    check_calibration(score, pairs_path)
    built, scored, curate_cfg = await score_pairs(pairs_path, out, fanout, model, cfg, limit, seed, score)
    rows = [ScorerRow(line=p.line, kind=kind, instruction=instruction, output=output, score=s.score,
                      signals=s.signals)
            for (kind, p, instruction, output), s in zip(built, scored)]
    write_jsonl(beside(out, "rows.jsonl"), rows)
    threshold = cfg.threshold if cfg.threshold is not None else default_threshold(curate_cfg)
    metrics = scorer_metrics(rows, threshold, seed)
    write_metrics(out, metrics)
    return metrics
