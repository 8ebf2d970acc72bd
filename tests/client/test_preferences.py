"""`export_dpo`: the best- and worst-scored responses of each instruction, across journals, as TRL's
conversational preference rows; one-response instructions and small margins left out, counted."""

from __future__ import annotations

import json
from pathlib import Path

from client.preferences import PreferenceConfig, export_dpo
from humpback.contracts import PreferencePair, ScoredCandidate, Source


def _scored(instruction: str, output: str, score: float | None, cid: str, scorer: str = "scorer",
            mode: str = "logprobs") -> str:
    return ScoredCandidate(custom_id="s" + cid, candidate_id=cid, instruction=instruction, output=output,
                           source=Source(path="c.jsonl", line=1), mode=mode, score=score,  # type: ignore[arg-type]
                           scorer_model=scorer).model_dump_json() + "\n"


def test_pairs_take_the_best_and_worst_response_of_each_instruction(tmp_path: Path) -> None:
    originals, rewrites = tmp_path / "orig.scored.jsonl", tmp_path / "rew.scored.jsonl"
    originals.write_text(_scored("Q1?", "raw web text 1", 2.0, "o1") + _scored("Q2?", "raw web text 2", 3.9, "o2")
                         + _scored("Q3?", "only one", 4.0, "o3") + _scored("Q4?", "raw 4", 3.0, "o4")
                         + "not a record\n" + _scored("Q5?", "raw 5", None, "o5"))
    rewrites.write_text(_scored("Q1?", "assistant answer 1", 4.5, "r1") + _scored("Q2?", "assistant answer 2", 3.2, "r2")
                        + _scored("Q1?", "a middling answer", 3.0, "m1") + _scored("Q4?", "assistant 4", 3.2, "r4"))
    out = tmp_path / "dpo.jsonl"
    summary = export_dpo([originals, rewrites], out, PreferenceConfig(min_margin=0.5))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) >= {"prompt", "chosen", "rejected"} for r in rows] == [True, True]
    q1, q2 = (PreferencePair.model_validate(r) for r in rows)
    assert q1.prompt[0].model_dump() == {"role": "user", "content": "Q1?"}
    assert (q1.chosen[0].content, q1.rejected[0].content) == ("assistant answer 1", "raw web text 1")
    assert (q1.chosen_id, q1.rejected_id, q1.margin) == ("r1", "o1", 2.5)
    assert (q2.chosen[0].content, q2.rejected[0].content) == ("raw web text 2", "assistant answer 2")  # the scorer decides
    assert summary.results["one_response"] == 1 and summary.results["below_margin"] == 1  # Q3; Q4 (0.2)
    assert summary.results["unscored"] == 1 and summary.results["pairs"] == 2
    errors = (tmp_path / "dpo.errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and json.loads(errors[0])["line"] == 5


def test_a_system_prompt_goes_first_and_margin_zero_keeps_any_difference(tmp_path: Path) -> None:
    scored = tmp_path / "s.jsonl"
    scored.write_text(_scored("Q?", "a", 3.0, "a") + _scored("Q?", "b", 3.01, "b"))
    export_dpo([scored], tmp_path / "dpo.jsonl", PreferenceConfig(min_margin=0, system="Be brief."))
    (row,) = [PreferencePair.model_validate_json(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert [m.role for m in row.prompt] == ["system", "user"] and row.chosen[0].content == "b"


def test_other_scorers_or_modes_never_meet_and_contaminated_responses_are_left_out(tmp_path: Path) -> None:
    """A pair compares the scores of one scorer in one mode; a response the curate run dropped as
    contaminated (after an earlier run had scored it) is no side of a pair."""
    from client.curate import ContaminatedCandidate

    scored = tmp_path / "run.scored.jsonl"
    scored.write_text(_scored("Q1?", "low by the base scorer", 2.0, "a1")
                      + _scored("Q1?", "high by a fine-tune", 4.9, "b1", scorer="ft:scorer")
                      + _scored("Q2?", "logprob score", 2.0, "a2")
                      + _scored("Q2?", "free-text score", 5.0, "b2", mode="free_text")
                      + _scored("Q3?", "fine answer", 3.0, "a3") + _scored("Q3?", "copied from AlpacaEval", 5.0, "c3")
                      + _scored("Q3?", "poor answer", 1.0, "d3"))
    contaminated = ContaminatedCandidate(custom_id="c3", model="backward", instruction="Q3?",
                                         output="copied from AlpacaEval", source=Source(path="c.jsonl", line=1),
                                         contaminated_set="alpaca_eval", contaminated_field="output",
                                         ngram="copied from alpacaeval")
    (tmp_path / "run.contaminated.jsonl").write_text(contaminated.model_dump_json() + "\n")
    out = tmp_path / "dpo.jsonl"
    summary = export_dpo([scored], out, PreferenceConfig(min_margin=0.5))
    pairs = [PreferencePair.model_validate_json(line) for line in out.read_text().splitlines()]
    assert [(p.chosen_id, p.rejected_id) for p in pairs] == [("a3", "d3")]
    assert summary.results["contaminated"] == 1 and summary.results["one_response"] == 3
    assert summary.results["other_scorer"] == 1  # the free-text score ranks with no logprobs score


def test_only_one_scorer_s_scores_rank(tmp_path: Path) -> None:
    # A PMI of 40 nats is no better than a rubric 4.5: the two scales never meet in one pair.
    scored = tmp_path / "mixed.scored.jsonl"
    scored.write_text(_scored("Q?", "a", 4.5, "a") + _scored("Q?", "b", 40.0, "b", mode="pmi")
                      + _scored("Q?", "c", 2.0, "c") + _scored("Q?", "d", -5.0, "d", mode="pmi"))
    first = export_dpo([scored], tmp_path / "first.jsonl")
    assert first.results["other_scorer"] == 2 and first.extra.scorer == "logprobs"
    pmi = export_dpo([scored], tmp_path / "pmi.jsonl", PreferenceConfig(scorer="pmi"))
    pair = PreferencePair.model_validate_json((tmp_path / "pmi.jsonl").read_text())
    assert (pair.chosen_id, pair.rejected_id, pair.margin) == ("b", "d", 45.0) and pmi.results["other_scorer"] == 2
