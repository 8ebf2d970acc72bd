"""Preference pairs from the scorer's judgements (`humpback export dpo`), as self-rewarding models
reuse them: for each instruction with two or more scored responses (an original and its rewrite, say,
each scored by `curate`), the best-scored response is chosen and the worst rejected.

The scored journals are streamed and only the best and the worst response of each instruction are
held, so memory grows with the number of instructions, not of responses. Responses are grouped by
the exact instruction text and by who scored them (scorer model and mode: two scorers' scores do
not compare; only one scorer's scores rank, `scorer` or that of the first record, and the others
are counted as `other_scorer`); a pair needs two different responses, and its score margin must
reach `min_margin` (a scorer's small differences are noise: 0.5 is half a rubric point). A response
that the curate run of its journal dropped as contaminated (its `<out>.contaminated.jsonl`) is left
out, whatever score an earlier run gave it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from client.curate import contaminated_ids, scored_records
from client.extras import PreferencesExtra
from client.journal import LineWriter, output_lock
from client.runner import CorruptLines, RunSummary, side_path
from humpback.contracts import ChatMessage, PreferencePair, ScoredCandidate
from humpback.settings import setting


class PreferenceConfig(BaseModel):
    """Which scored responses make a preference pair."""

    model_config = ConfigDict(extra="forbid")

    min_margin: float = setting(0.5, "keep a pair only when the chosen response outscores the rejected one by at "
                                     "least this much (rubric points)", ge=0)
    system: str | None = setting(None, "system prompt put before the instruction in each pair's prompt")
    scorer: str | None = setting(None, "rank by this scorer's scores only (a scored record's mode: logprobs, "
                                       "free_text, pmi, reverse_pmi or combined); unset: the first record's (the "
                                       "margin is in that scorer's unit: rubric points, nats, probability)")


@dataclass
class _Extremes:
    best: ScoredCandidate
    worst: ScoredCandidate
    responses: int = 1


def preference_pairs(records: Iterable[ScoredCandidate], cfg: PreferenceConfig,
                     summary: RunSummary[PreferencesExtra]) -> list[PreferencePair]:
    """The pairs of `records` (see the module doc), in the order their instructions first appear."""
    groups: dict[tuple[str, str, str], _Extremes] = {}
    scorer = cfg.scorer
    for rec in records:
        scorer = scorer or rec.mode
        if rec.mode != scorer:
            summary.results["other_scorer"] += 1
            continue
        if rec.score is None:
            summary.results["unscored"] += 1
            continue
        key = (rec.instruction, rec.scorer_model, rec.mode)
        g = groups.get(key)
        if g is None:
            groups[key] = _Extremes(rec, rec)
            continue
        g.responses += 1
        if rec.score > g.best.score:  # type: ignore[operator]
            g.best = rec
        if rec.score < g.worst.score:  # type: ignore[operator]
            g.worst = rec
    pairs = []
    prompt_head = [] if cfg.system is None else [ChatMessage(role="system", content=cfg.system)]
    for (instruction, _, _), g in groups.items():
        if g.responses < 2:
            summary.results["one_response"] += 1
            continue
        margin = g.best.score - g.worst.score  # type: ignore[operator]
        if margin == 0 or g.best.output == g.worst.output:  # no preference between them
            summary.results["tied"] += 1
            continue
        if margin < cfg.min_margin:
            summary.results["below_margin"] += 1
            continue
        pairs.append(PreferencePair(
            prompt=[*prompt_head, ChatMessage(role="user", content=instruction)],
            chosen=[ChatMessage(role="assistant", content=g.best.output)],
            rejected=[ChatMessage(role="assistant", content=g.worst.output)],
            score_chosen=g.best.score, score_rejected=g.worst.score, margin=margin,  # type: ignore[arg-type]
            chosen_id=g.best.candidate_id, rejected_id=g.worst.candidate_id))
    summary.results["instructions"] = len(groups)
    summary.extra.scorer = scorer
    summary.results["pairs"] = len(pairs)
    return pairs


def _records(scored: Iterable[Path], errors: LineWriter, summary: RunSummary) -> Iterator[ScoredCandidate]:
    """The records of the `scored` journals, less those the curate run of each dropped as contaminated
    (`<out>.contaminated.jsonl` beside its `<out>.scored.jsonl`), counted as `contaminated`."""
    summary.results["contaminated"] = 0
    for path in scored:
        stem = path.name.removesuffix(".scored.jsonl")
        dropped = contaminated_ids(path.with_name(stem + ".contaminated.jsonl")) if stem != path.name else set()
        for rec in scored_records(path, corrupt=CorruptLines(path, errors)):
            if rec.candidate_id in dropped:
                summary.results["contaminated"] += 1
                continue
            yield rec


def export_dpo(scored: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str],
               config: PreferenceConfig | None = None) -> RunSummary[PreferencesExtra]:
    """Write the preference pairs of the `scored` journals to `out` (JSONL, TRL's conversational
    preference format). Journal lines that are no scored record go to `<out>.errors.jsonl`."""
    cfg = config or PreferenceConfig()
    out = Path(out)
    summary = RunSummary(extra=PreferencesExtra())
    with output_lock(out), LineWriter(side_path(out, "errors.jsonl")) as errors:
        records = _records(map(Path, scored), errors, summary)
        pairs = preference_pairs(records, cfg, summary)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(p.model_dump_json() + "\n" for p in pairs), encoding="utf-8")
        os.replace(tmp, out)
    summary.write(side_path(out, "summary.json"))
    return summary
