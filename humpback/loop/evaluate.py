"""Evaluate one served model on IFEval, pairwise win rate and held-out NLL; measure the loop's stages
(the backward model, each scorer, the candidates) against held-out human pairs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from client.augment import AugmentConfig
from client.curate import CurateConfig
from client.fanout import FanoutConfig
from client.instructions import ISSUE_KINDS
from humpback.contracts import SEED_SYSTEM_PROMPT, Candidate, read_jsonl
from humpback.evaluation.backward import run_backward_eval
from humpback.evaluation.common import GenerationConfig, normal_interval
from humpback.evaluation.diversity import diversity_metrics, plot_verb_objects, verb_object_pairs
from humpback.evaluation.ifeval import run_ifeval
from humpback.evaluation.metrics import Metric, mean_metric
from humpback.evaluation.nll import run_nll
from humpback.evaluation.pairwise import Contender, PairwiseConfig, run_pairwise
from humpback.evaluation.records import IFEvalSummary, NllRow, PairwiseSummary
from humpback.evaluation.scorer import ScorerEvalConfig, run_scorer_eval
from humpback.loop.config import EvalSection
from humpback.loop.records import (
    CandidateQuality, Evaluation, IfevalScores, NllScores, PairwiseScores, ScorerMetrics, StageMetrics,
)


def evaluate_model(fan: FanoutConfig, model: str, name: str, cfg: EvalSection, out: Path,
                   heldout: Path | None = None) -> Evaluation:
    """The metrics of `model` (the fine-tuned `name`) served where `fan` sends requests, its rows and
    summaries written under `out`.

    The pairwise judge is `cfg.judge_url` (or the same servers); NLL is measured on `heldout` when
    `cfg.nll` is on and the file exists."""
    judge = FanoutConfig(endpoints=[cfg.judge_url], api_key=cfg.judge_api_key) if cfg.judge_url else fan
    # The paper's best inference-time tag (Table 8): answer in the seed's AI-assistant style.
    gen = GenerationConfig(max_tokens=cfg.max_tokens, system_prompt=SEED_SYSTEM_PROMPT)

    async def both() -> tuple[IFEvalSummary, PairwiseSummary]:
        ife = await run_ifeval(out, fan, model=model, gen=gen, limit=cfg.ifeval_limit)
        pw = await run_pairwise(out, Contender(fanout=fan, model=model), Contender(), judge,
                                judge_model=cfg.judge_model, gen=gen, config=PairwiseConfig(limit=cfg.pairwise_limit))
        return ife, pw

    ife, pw = asyncio.run(both())
    result = Evaluation(
        model=name,
        ifeval=IfevalScores(n=ife.prompt_level.n, prompt_strict=ife.prompt_level.strict,
                            prompt_loose=ife.prompt_level.loose, instruction_strict=ife.instruction_level.strict,
                            instruction_loose=ife.instruction_level.loose),
        pairwise=PairwiseScores(n=pw.n, win_rate=pw.win_rate, ci=(pw.ci_low, pw.ci_high), wins=pw.wins, ties=pw.ties,
                                losses=pw.losses, judge=pw.judge_model, baseline=pw.model_b,
                                position_flip_rate=pw.position_flip_rate, informative=pw.informative))
    if cfg.nll and heldout is not None and heldout.is_file():
        nll = asyncio.run(run_nll(heldout, out, fan, model=model, limit=cfg.nll_limit,
                                  system_prompt=SEED_SYSTEM_PROMPT))
        # Mean over pairs of each pair's per-token NLL, so that the interval (over pairs) fits it.
        ci = normal_interval(_pair_means(out / "nll.rows.jsonl"))
        result.nll = NllScores(n=nll.pairs, mean=nll.nll_per_pair, per_token=nll.nll_per_token, ci=ci,
                               perplexity=nll.perplexity)
    return result


def _pair_means(rows: Path) -> list[float]:
    with rows.open(encoding="utf-8") as f:
        return [row.nll_mean for row in map(NllRow.model_validate_json, f) if row.nll_mean is not None]


# --- stage metrics: each a `Metric` per name, as `humpback eval` writes them ---


def measure_backward(fan: FanoutConfig, model: str, name: str, pairs: Path, out: Path, generation: AugmentConfig,
                     limit: int | None) -> StageMetrics:
    """`eval backward` of the backward model (`name`) served where `fan` sends requests on `limit` held-out
    `pairs`, its instructions sampled as augment samples them (`generation`); written to `out`."""
    metrics = asyncio.run(run_backward_eval(pairs, out, fan, model, generation, limit))
    return StageMetrics(model=name, metrics=metrics, out=out)


def measure_scorer(fan: FanoutConfig, model: str, name: str, pairs: Path, out: Path, corpus: Path | None,
                   threshold: float, limit: int | None, score: CurateConfig) -> ScorerMetrics:
    """`eval scorer` of the scorer (`name`) served where `fan` sends requests, scoring as `score` says (the
    run's curate settings: its scorer, and the backward model's server for the reverse signal), on
    `limit` held-out `pairs` and negatives built from them (the `passage` kind from `corpus`),
    precision counted at `threshold`; written to `out`. A likelihood scorer's metrics hold each
    signal's AUC (`signal_auc_*`), which the report shows per iteration."""
    metrics = asyncio.run(run_scorer_eval(pairs, out, fan, model, ScorerEvalConfig(threshold=threshold, corpus=corpus),
                                          limit, score=score))
    return ScorerMetrics(model=name, scoring=score.scorer, metrics=metrics, threshold=threshold, out=out)


def candidate_quality(model: str, candidates: Path, quality: dict[str, int | float | None], plot: Path
                      ) -> CandidateQuality:
    """What augment's candidates (written by the backward model `model`) are worth: its `quality` counts
    (`client.augment.instruction_quality`) as `usable_rate` with an interval and the count of each
    rejection kind, the diversity of the candidates' instructions, and their root verbs and objects
    drawn to `plot`."""
    instructions = [c.instruction for c in read_jsonl(candidates, Candidate)]
    metrics: dict[str, Metric] = {}
    usable, sent = int(quality.get("usable") or 0), int(quality.get("sent") or 0)
    if sent:
        metrics["usable_rate"] = mean_metric([True] * usable + [False] * (sent - usable))
    metrics.update(diversity_metrics(instructions))
    plot_verb_objects(verb_object_pairs(instructions), plot,
                      title=f"Root verbs and their direct objects of the {len(instructions)} candidates")
    counts = ("sent", "usable", *ISSUE_KINDS, "resampled", "rescued")
    return CandidateQuality(model=model, metrics=metrics, instructions=len(instructions),
                            rejections={k: int(v) for k in counts if (v := quality.get(k)) is not None}, plot=plot)
