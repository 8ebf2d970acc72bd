"""The pieces of bench/bench_selection.py: equal-size arms from the same scored candidates, the
training set of an arm, the NLL interval."""

from __future__ import annotations

import pytest

from bench.bench_selection import at_random, best, nll_interval, paired_difference, training_examples
from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, SEED_SYSTEM_PROMPT, ScoredCandidate, SeedPair, Source


def _rec(cid: str, score: float | None) -> ScoredCandidate:
    return ScoredCandidate(custom_id="s" + cid, candidate_id=cid, instruction=f"Q {cid}?", output=f"A {cid}.",
                           source=Source(path="c.jsonl", line=1), mode="pmi", score=score, scorer_model="scorer")


def test_best_keeps_the_k_best_scored_with_ties_broken_by_id() -> None:
    recs = [_rec("d", 1.0), _rec("a", 3.0), _rec("c", 3.0), _rec("b", None), _rec("e", 2.0)]
    assert [r.candidate_id for r in best(recs, 3)] == ["a", "c", "e"]


def test_the_random_arm_is_seeded_and_ignores_the_journal_order() -> None:
    recs = [_rec(c, float(i)) for i, c in enumerate("abcdefgh")]
    one = at_random(recs, 3, 0)
    assert len(one) == 3 and one == at_random(list(reversed(recs)), 3, 0)
    assert len(at_random(recs, 20, 0)) == len(recs)


def test_an_arm_trains_on_the_seed_and_its_pairs_tagged_as_the_loop_tags_them() -> None:
    seed = [SeedPair(id="s1", instruction="Seed?", response="Seed answer.", source="t", license="MIT")]
    rows = training_examples(seed, [_rec("a", 1.0)])
    assert [r.messages[0].content for r in rows] == [SEED_SYSTEM_PROMPT, AUGMENTED_SYSTEM_PROMPT]
    assert rows[1].messages[1].content == "Q a?" and rows[1].messages[2].content == "A a."


def test_nll_interval() -> None:
    mean, ci = nll_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci is not None and ci[0] < 2.0 < ci[1]
    assert nll_interval([1.5]) == (1.5, None)
    with pytest.raises(ZeroDivisionError):
        nll_interval([])


def test_the_paired_difference_sees_a_shift_the_arms_own_intervals_hide() -> None:
    # Pairs that vary a lot, and an arm lower than the baseline by 0.1 on every one of them.
    baseline = {i: float(i) for i in range(10)}
    arm = {i: v - 0.1 for i, v in baseline.items()}
    _, own = nll_interval(list(arm.values()))
    _, base_ci = nll_interval(list(baseline.values()))
    assert own is not None and base_ci is not None and own[1] > base_ci[0]  # the two intervals overlap
    diff, ci = paired_difference(arm | {99: 5.0}, baseline)  # a pair only one arm scored is left out
    assert diff == pytest.approx(-0.1) and ci is not None and ci[1] < 0
