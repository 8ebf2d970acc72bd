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
from humpback.contracts import API_KEY_ENV
from humpback.evaluation import ifeval, nll, pairwise
from humpback.evaluation.common import GenerationConfig, subset
from humpback.evaluation.records import IFEvalRow, NllRow, PairwiseRow
from tests.evaluation.pairs import write_pairs

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


PAIRS = [
    ("How do I undo the last git commit?", "Run git reset --soft HEAD~1. The commit goes and its changes stay staged."),
    ("What is Debian?", "Debian is a free operating system. It is built and maintained by volunteers around the world."),
    ("How can I count the lines of a file in Python?", "Sum one for each line: sum(1 for _ in open(path)). The file "
     "is read a line at a time, so memory stays flat."),
    ("What does the Perl function chomp do?", "chomp removes the trailing newline from a string. It returns the "
     "number of characters it removed."),
]
# Real prose (pip's documentation, MIT) for the scorer's passage negatives.
CORPUS = Path(__file__).parents[1] / "client" / "data" / "pip_docs.jsonl"


def test_eval_backward_and_scorer_commands_on_the_real_servers(servers: Any, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The two stage commands as a user runs them. What the 135M model writes is not known, but its
    NLL of an instruction is: the true instructions are far likelier than their words reversed."""
    from humpback.cli import main

    true = write_pairs(tmp_path / "true.jsonl", PAIRS)
    reversed_ = write_pairs(tmp_path / "reversed.jsonl", [(" ".join(reversed(x.split())), y) for x, y in PAIRS])
    if servers.api_key:  # keys travel in the environment, never on a command line
        monkeypatch.setenv(API_KEY_ENV, servers.api_key)
    for pairs, out in ((true, "true.json"), (reversed_, "reversed.json")):
        assert main(["eval", "backward", "--endpoint", servers.backward_url, "--model", servers.backward_model,
                     "--pairs", str(pairs), "--out", str(tmp_path / out), "--max-tokens", "48"]) == 0
    good, bad = (json.loads((tmp_path / f).read_text()) for f in ("true.json", "reversed.json"))
    assert set(good) == {"instruction_nll", "rouge_l", "usable_rate", "distinct_2"}
    assert good["instruction_nll"]["n"] == len(PAIRS) and good["rouge_l"]["n"] == len(PAIRS)
    assert bad["instruction_nll"]["value"] > good["instruction_nll"]["value"] + 1.0
    assert "instruction_nll" in capsys.readouterr().out

    assert main(["eval", "scorer", "--endpoint", servers.scorer_url, "--model", servers.scorer_model, "--pairs",
                 str(true), "--out", str(tmp_path / "scorer.json"), "--corpus", str(CORPUS)]) == 0
    m = json.loads((tmp_path / "scorer.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "scorer.rows.jsonl").read_text().splitlines()]
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("positive", "mismatched", "first_sentence", "passage")}
    # Each pair gives one negative of each kind: every response here has two sentences.
    assert kinds == {"positive": 4, "mismatched": 4, "first_sentence": 4, "passage": 4}
    assert m["auc"]["n"] == len(rows) and all(1.0 <= r["score"] <= 5.0 for r in rows)
    positives = [r["score"] for r in rows if r["kind"] == "positive"]
    assert m["mean_score_positive"]["value"] == pytest.approx(statistics.fmean(positives))
