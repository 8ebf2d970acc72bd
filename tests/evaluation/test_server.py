"""`humpback eval` against the real vLLM servers (135M model): the answers are not good ones, so these
tests hold what the known inputs decide (which prompts, how many instructions, the reference side)
and that every summary agrees with the rows it was computed from."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from client.fanout import FanoutConfig
from humpback.evaluation import ifeval, nll, pairwise
from humpback.evaluation.common import GenerationConfig, subset
from humpback.evaluation.records import IFEvalRow, NllRow, PairwiseRow

pytestmark = pytest.mark.server


def _fan(url: str, servers: Any) -> FanoutConfig:
    return FanoutConfig(endpoints=[url], api_key=servers.api_key, max_retries=2)


def _rows(path: Path, model: type) -> list:
    return [model.model_validate_json(line) for line in path.read_text().splitlines()]


async def test_ifeval_on_three_prompts(servers: Any, tmp_path: Path) -> None:
    s = await ifeval.run_ifeval(tmp_path, _fan(servers.backward_url, servers), servers.backward_model,
                                GenerationConfig(max_tokens=64), limit=3)
    prompts = ifeval.load_prompts()
    chosen = [prompts[i] for i in subset(len(prompts), 3, 0)]
    rows = _rows(tmp_path / "ifeval.rows.jsonl", IFEvalRow)
    assert [r.key for r in rows] == [p.key for p in chosen]
    assert all(r.response for r in rows)
    assert (s.model, s.max_tokens, s.prompt_level.n) == (servers.backward_model, 64, 3)
    assert s.instruction_level.n == sum(len(p.instruction_id_list) for p in chosen)
    # The saved verdicts are the official checkers' on the saved responses, and the summary counts them.
    for p, r in zip(chosen, rows):
        assert ifeval.score(p, r.response) == (r.strict, r.loose)
    assert s.prompt_level.strict == pytest.approx(sum(all(r.strict) for r in rows) / 3)
    assert s.prompt_level.loose == pytest.approx(sum(all(r.loose) for r in rows) / 3)
    assert s.truncated == sum(r.finish_reason == "length" for r in rows)


async def test_pairwise_on_two_prompts(servers: Any, tmp_path: Path) -> None:
    cfg = pairwise.PairwiseConfig(limit=2)
    s = await pairwise.run_pairwise(tmp_path, pairwise.Contender(fanout=_fan(servers.backward_url, servers),
                                                                  model=servers.backward_model),
                                    pairwise.Contender(), _fan(servers.scorer_url, servers), servers.scorer_model,
                                    GenerationConfig(max_tokens=64), cfg)
    alpaca = pairwise.load_alpaca()
    chosen = [alpaca[i] for i in subset(len(alpaca), 2, cfg.seed)]
    rows = _rows(tmp_path / "pairwise.rows.jsonl", PairwiseRow)
    # B defaults to AlpacaEval's reference answers; the judge is the scorer.
    assert [r.index for r in rows] == [p.index for p in chosen]
    assert [r.output_b for r in rows] == [p.reference.output for p in chosen]
    assert (s.model_a, s.model_b, s.judge_model) == (servers.backward_model, chosen[0].reference.generator,
                                                     servers.scorer_model)
    scores = [r.score for r in rows]
    assert scores == [pairwise.prompt_score(r.a_won_first, r.a_won_second) for r in rows]
    assert (s.n, s.wins, s.ties, s.losses) == (2, scores.count(1.0), scores.count(0.5), scores.count(0.0))
    assert s.win_rate == pytest.approx(statistics.fmean(scores))
    assert (s.ci_low, s.ci_high) == pytest.approx(pairwise.confidence_interval(scores, cfg.ci_level, cfg.ci,
                                                                               cfg.n_boot, cfg.seed))
    assert s.soft_win_rate == pytest.approx(statistics.fmean((r.p_a_first + r.p_a_second) / 2 for r in rows))
    firsts = sum(r.a_won_first for r in rows) + sum(not r.a_won_second for r in rows)
    assert s.first_position_rate == pytest.approx(firsts / 4)


async def test_nll_tells_a_sentence_from_its_words_reversed(servers: Any, tmp_path: Path) -> None:
    answer = "Debian is a free operating system built by volunteers."
    scrambled = " ".join(reversed(answer.split()))
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in [
        ("What is Python?", "Python is an interpreted, object-oriented programming language."),
        ("How do I undo the last git commit?", "Run git reset --soft HEAD~1 to keep the changes staged."),
        ("What is Debian?", answer),
        ("What is Debian?", scrambled),
    ]))
    s = await nll.run_nll(seed, tmp_path, _fan(servers.scorer_url, servers), servers.scorer_model)
    rows = _rows(tmp_path / "nll.rows.jsonl", NllRow)
    assert (s.pairs, s.skipped) == (4, 0)
    sums = [r.nll_sum for r in rows]
    assert None not in sums
    # The same words reversed are far less likely than the sentence (2.8 against 7.5 nats per token
    # with transformers in fp32): the number reads the model, not the request.
    assert rows[3].nll_mean > rows[2].nll_mean + 2.0
    assert [r.nll_mean for r in rows] == pytest.approx([x / r.response_tokens for x, r in zip(sums, rows)])
    assert s.tokens == sum(r.response_tokens for r in rows)
    assert s.nll_per_token == pytest.approx(math.fsum(sums) / s.tokens)
    assert s.perplexity == pytest.approx(math.exp(s.nll_per_token))
