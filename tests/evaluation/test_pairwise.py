"""Win-rate and interval math on known verdicts, and the judging flow against a fake judge."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.fanout import FanoutConfig
from humpback.contracts import Failure, RequestFailed
from humpback.evaluation import pairwise
from humpback.evaluation.common import AnswerTask, GenerationConfig
from humpback.evaluation.records import JournaledAnswer, PairwiseRow, Verdict
from tests.client.fake_server import _completion
from tests.evaluation.fake_eval_server import EvalFake


def _row(won_first: bool, won_second: bool, p_first: float = 0.5, p_second: float = 0.5) -> PairwiseRow:
    return PairwiseRow(index=0, dataset="d", instruction="i", output_a="a", output_b="b", p_a_first=p_first,
                       p_a_second=p_second, a_won_first=won_first, a_won_second=won_second,
                       score=pairwise.prompt_score(won_first, won_second))


def test_prompt_score_counts_a_split_as_a_tie() -> None:
    assert [pairwise.prompt_score(*v) for v in [(True, True), (True, False), (False, True), (False, False)]] == \
        [1.0, 0.5, 0.5, 0.0]


def test_summary_on_known_verdicts() -> None:
    rows = [_row(True, True, 0.9, 0.8), _row(True, False, 0.6, 0.2), _row(False, False, 0.1, 0.3),
            _row(True, True, 0.7, 0.9)]
    s = pairwise.summarize(rows, "a", "b", "judge", None, pairwise.PairwiseConfig(ci="normal"))
    assert (s.n, s.wins, s.ties, s.losses) == (4, 2, 1, 1)
    assert s.win_rate == pytest.approx(0.625)
    assert s.soft_win_rate == pytest.approx((0.85 + 0.4 + 0.2 + 0.8) / 4)
    # Verdicts for the first-shown answer: A first and won (3), A second and lost (2): 5 of 8.
    assert s.first_position_rate == pytest.approx(5 / 8)
    # One prompt's verdict flips with the order (the second: the judge chose the first shown both times).
    assert s.position_flip_rate == pytest.approx(0.25) and s.informative
    half = 1.959963984540054 * 0.5 / 2  # z_0.975 * stdev([0, 1, 0, 0]) / sqrt(4)
    assert (s.flip_ci_low, s.flip_ci_high) == (0.0, pytest.approx(0.25 + half))
    half = 1.959963984540054 * 0.4787135538781691 / 2  # z_0.975 * stdev([1, .5, 0, 1]) / sqrt(4)
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.625 - half), pytest.approx(min(1.0, 0.625 + half)))


@pytest.mark.parametrize(("n", "flips", "max_flip_rate", "informative"), [
    (10, 0, 0.5, True), (10, 5, 0.5, True), (10, 6, 0.5, False),  # above the threshold
    (10, 6, 0.6, True), (10, 10, 1.0, False),  # no prompt judged the same in both orders, whatever the threshold
    (0, 0, 0.5, False),  # nothing judged
])
def test_judge_informative_rule(n: int, flips: int, max_flip_rate: float, informative: bool) -> None:
    assert pairwise.judge_informative(n, flips, max_flip_rate) is informative


def test_normal_interval_is_clipped_to_unit_range() -> None:
    assert pairwise.confidence_interval([1.0, 1.0, 0.5], method="normal")[1] == 1.0


def test_bootstrap_interval() -> None:
    assert pairwise.confidence_interval([1.0] * 10) == (1.0, 1.0)
    scores = [1.0] * 30 + [0.0] * 30
    lo, hi = pairwise.confidence_interval(scores, n_boot=4000)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(60), abs=0.03)
    assert pairwise.confidence_interval(scores, n_boot=4000) == (lo, hi)  # seeded
    assert pairwise.confidence_interval([1.0]) == (0.0, 1.0)


def test_unknown_interval_method_is_named() -> None:
    with pytest.raises(ValueError, match="'wald'"):
        pairwise.confidence_interval([0.0, 1.0], method="wald")


def test_parse_verdict_reads_the_two_token_distribution() -> None:
    data = {"choices": [{"message": {"content": "2"}, "finish_reason": "length", "logprobs": {"content": [
        {"token": "2", "logprob": math.log(0.75), "top_logprobs": [{"token": "2", "logprob": math.log(0.75)},
                                                                  {"token": "1", "logprob": math.log(0.25)}]}]}}]}
    choice, p1 = pairwise.parse_verdict(data)
    assert choice == "2" and p1 == pytest.approx(0.25)


def test_load_alpaca() -> None:
    prompts = pairwise.load_alpaca()
    assert len(prompts) == 805
    assert len(pairwise.load_alpaca("vicuna")) == 80
    with pytest.raises(ValueError, match="'nope'"):
        pairwise.load_alpaca("nope")


@pytest.fixture
def judge() -> Iterator[EvalFake]:
    server = EvalFake().start()
    yield server
    server.stop()


async def test_judging_flow_both_orders(judge: EvalFake, tmp_path: Path) -> None:
    """A (the fake's "good answer") against a baseline file: one prompt where B is good too (a tie, as
    the fake judge then always picks the first shown), two where only A is (wins in both orders)."""
    cfg = pairwise.PairwiseConfig(limit=3, seed=7)
    chosen = [pairwise.load_alpaca()[i] for i in pairwise.subset(805, 3, 7)]
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"instruction": p.instruction, "output": "also good" if k == 0 else "meh"})
                                + "\n" for k, p in enumerate(chosen)))
    fan = FanoutConfig(endpoints=[judge.url], concurrency=4, max_retries=0)
    s = await pairwise.run_pairwise(tmp_path / "out", pairwise.Contender(fanout=fan),
                                    pairwise.Contender(answers=baseline), fan, None, GenerationConfig(), cfg)
    assert (s.n, s.wins, s.ties, s.losses) == (3, 2, 1, 0)
    assert s.win_rate == pytest.approx(5 / 6)
    assert s.soft_win_rate == pytest.approx((0.9 + 0.9 + 0.5) / 3, abs=1e-6)
    assert s.first_position_rate == pytest.approx(4 / 6)
    assert s.model_b == "baseline" and s.judge_model == "fake"
    assert judge.requests["/v1/chat/completions"] == 3 + 6  # A's answers, then two verdicts per prompt
    rows = [json.loads(line) for line in (tmp_path / "out" / "pairwise.rows.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [p.index for p in chosen]
    assert [r["score"] for r in rows] == [0.5, 1.0, 1.0]
    answers = (tmp_path / "out" / "pairwise.answers_a.jsonl").read_text().splitlines()
    assert len(answers) == 3 and json.loads(answers[0])["output"] == "good answer"
    assert json.loads((tmp_path / "out" / "pairwise.summary.json").read_text())["wins"] == 2


def _outputs(out: Path) -> tuple[list[str], list[str], dict]:
    """(rows lines, A's answers lines, summary less its timing) of a pairwise run."""
    summary = json.loads((out / "pairwise.summary.json").read_text())
    del summary["elapsed_s"]
    return ((out / "pairwise.rows.jsonl").read_text().splitlines(),
            (out / "pairwise.answers_a.jsonl").read_text().splitlines(), summary)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def test_an_interrupted_run_resumes_asking_only_what_is_missing(judge: EvalFake, tmp_path: Path) -> None:
    """The server refuses one of A's answers, then, on the second run, one verdict: each run fails
    naming its failures, keeps what finished, and the next asks only for what is missing; the last
    writes what a clean run writes."""
    cfg = pairwise.PairwiseConfig(limit=3, seed=7)
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"instruction": p.instruction, "output": f"meh {k}"}) + "\n"
                                for k, p in enumerate(pairwise.load_alpaca())))
    fan = FanoutConfig(endpoints=[judge.url], concurrency=4, max_retries=0)

    async def run(out: Path) -> pairwise.PairwiseSummary:
        return await pairwise.run_pairwise(out, pairwise.Contender(fanout=fan), pairwise.Contender(answers=baseline),
                                           fan, None, GenerationConfig(), cfg)

    def asked() -> int:
        n = judge.requests["/v1/chat/completions"]
        judge.requests.clear()
        return n

    await run(tmp_path / "clean")
    assert asked() == 3 + 6
    out = tmp_path / "out"

    judge.script.extend(["400"])  # the first request of the run: one of A's answers
    with pytest.raises(RequestFailed, match="1 of 3 requests failed, the first: HTTP 400"):
        await run(out)
    assert asked() == 3  # no judging without every answer
    assert len(_lines(out / "pairwise.answers_a.journal.jsonl")) == 2
    assert [Failure.model_validate_json(x).attempts for x in _lines(out / "pairwise.answers_a.failed.jsonl")] == [1]

    judge.script.extend(["ok", "400"])  # the missing answer, then the first verdict
    with pytest.raises(RequestFailed, match="1 of 6 requests failed"):
        await run(out)
    assert asked() == 1 + 6
    assert not (out / "pairwise.answers_a.failed.jsonl").exists()  # a per-run file: this run's answers all came
    assert len(_lines(out / "pairwise.judge.journal.jsonl")) == 5
    assert not (out / "pairwise.rows.jsonl").exists()

    s = await run(out)
    assert asked() == 1
    assert (s.n, s.wins) == (3, 3)
    assert _outputs(out) == _outputs(tmp_path / "clean")
    assert len(_lines(out / "pairwise.judge.journal.jsonl")) == 6  # nothing asked twice
    assert [JournaledAnswer.model_validate_json(x).answer.output
            for x in _lines(out / "pairwise.answers_a.journal.jsonl")] == ["good answer"] * 3
    assert {Verdict.model_validate_json(x).choice for x in _lines(out / "pairwise.judge.journal.jsonl")} == {"1", "2"}


def test_request_ids_cover_what_decides_the_answer() -> None:
    """A changed model, checkpoint, prompt or generation setting is new work, never a journaled answer."""
    gen = GenerationConfig()
    ids = {AnswerTask(m, c, g).request(p).custom_id
           for m, c, g, p in [("m", "/w", gen, "p"), ("n", "/w", gen, "p"), ("m", "/v", gen, "p"),
                              ("m", "/w", gen, "q"), ("m", "/w", GenerationConfig(max_tokens=9), "p"),
                              ("m", "/w", GenerationConfig(system_prompt="s"), "p")]}
    assert len(ids) == 6
    assert AnswerTask("m", "/w", GenerationConfig()).request("p").custom_id in ids
    judge = pairwise.JudgeTask("j", "/w", 2000)
    first, second = pairwise.Ordering("i", "a" * 50, "b"), pairwise.Ordering("i", "b", "a" * 50)
    # The other order, and a cut that shortens an answer, are other prompts; a cut that does not is the same.
    assert len({judge.request(first).custom_id, judge.request(second).custom_id,
                pairwise.JudgeTask("j", "/w", 10).request(first).custom_id}) == 3
    assert pairwise.JudgeTask("j", "/w", 60).request(first).custom_id == judge.request(first).custom_id


async def test_missing_baseline_answer_names_the_file(judge: EvalFake, tmp_path: Path) -> None:
    baseline = tmp_path / "b.jsonl"
    baseline.write_text(json.dumps({"instruction": "unrelated", "output": "x"}) + "\n")
    fan = FanoutConfig(endpoints=[judge.url], max_retries=0)
    with pytest.raises(ValueError, match="b.jsonl: no answer for AlpacaEval prompts"):
        await pairwise.run_pairwise(tmp_path, pairwise.Contender(fanout=fan), pairwise.Contender(answers=baseline),
                                    fan, config=pairwise.PairwiseConfig(limit=2))


def test_bad_answer_record_names_file_and_line(tmp_path: Path) -> None:
    from humpback.evaluation.common import read_answers

    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match="a.jsonl line 2"):
        read_answers(path)


class FirstPositionJudge(EvalFake):
    """A judge that answers "1" whatever it is shown: all position, no content."""

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        if "structured_outputs" not in body:
            return super().answer(body)
        top = [{"token": "1", "logprob": -0.1053605}, {"token": "2", "logprob": -2.3025851}]
        return _completion("1", logprobs={"content": [{"token": "1", "logprob": -0.1, "top_logprobs": top}]})


def _answer_files(tmp_path: Path, a_better: list[bool]) -> tuple[Path, Path]:
    """Answer files for A and B on the first prompts of the `PairwiseConfig(limit=len(a_better))` subset:
    on each prompt the better answer (the one the content judge picks) is A's where `a_better` says so."""
    alpaca = pairwise.load_alpaca()
    prompts = [alpaca[i] for i in pairwise.subset(len(alpaca), len(a_better), 0)]
    files = []
    for side, good in (("a", a_better), ("b", [not g for g in a_better])):
        path = tmp_path / f"{side}.jsonl"
        path.write_text("".join(json.dumps({"instruction": p.instruction, "output": "good" if g else "meh"}) + "\n"
                                for p, g in zip(prompts, good)))
        files.append(path)
    return files[0], files[1]


def _cells(text: str) -> dict[str, str]:
    """The printed summary table as header -> value (cells are separated by two spaces or more)."""
    header, _, row = text.splitlines()
    return dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", row)))


async def _judge_files(server: EvalFake, tmp_path: Path, a_better: list[bool]) -> pairwise.PairwiseSummary:
    a, b = _answer_files(tmp_path, a_better)
    fan = FanoutConfig(endpoints=[server.url], max_retries=0)
    return await pairwise.run_pairwise(tmp_path / "out", pairwise.Contender(answers=a), pairwise.Contender(answers=b),
                                       fan, config=pairwise.PairwiseConfig(limit=len(a_better)))


async def test_a_judge_that_always_picks_the_first_position_is_uninformative(tmp_path: Path) -> None:
    server = FirstPositionJudge().start()
    try:
        s = await _judge_files(server, tmp_path, [True, True, False, True])
    finally:
        server.stop()
    assert (s.first_position_rate, s.position_flip_rate, s.informative) == (1.0, 1.0, False)
    assert (s.flip_ci_low, s.flip_ci_high) == (1.0, 1.0)
    assert s.ties == 4 and s.win_rate == 0.5  # the number that must not be read as a result
    cells = _cells(pairwise.format_summary(s))
    assert (cells["win rate"], cells["95% CI"]) == ("judge uninformative (position bias 100%)", "-")
    assert cells["flip rate [95% CI]"] == "1.000 [1.000, 1.000]"
    summary = json.loads((tmp_path / "out" / "pairwise.summary.json").read_text())
    assert (summary["informative"], summary["position_flip_rate"]) == (False, 1.0)


async def test_a_judge_that_picks_the_better_answer_is_informative(judge: EvalFake, tmp_path: Path) -> None:
    s = await _judge_files(judge, tmp_path, [True, True, False, True])
    assert (s.position_flip_rate, s.flip_ci_low, s.flip_ci_high, s.informative) == (0.0, 0.0, 0.0, True)
    assert (s.wins, s.ties, s.losses, s.win_rate) == (3, 0, 1, 0.75)
    assert s.first_position_rate == 0.5
    cells = _cells(pairwise.format_summary(s))
    assert (cells["win rate"], cells["95% CI"]) == ("0.750", f"[{s.ci_low:.3f}, {s.ci_high:.3f}]")
    assert cells["flip rate [95% CI]"] == "0.000 [0.000, 0.000]"
