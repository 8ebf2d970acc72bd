"""The stage metrics' statistics on known answers, the pairs reader, and (against the real servers)
both stage commands end to end on held-out pairs of the demo build."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from humpback.cli import main
from humpback.contracts import SeedPair
from humpback.evaluation import metrics
from humpback.evaluation.metrics import Metric


def _width(m: Metric) -> float:
    assert m.ci95 is not None
    return m.ci95[1] - m.ci95[0]


def test_mean_interval_holds_the_value_and_narrows_with_n() -> None:
    small = metrics.mean_metric([0, 1, 1, 0, 1] * 4)
    large = metrics.mean_metric([0, 1, 1, 0, 1] * 400)
    for m in (small, large):
        assert m.value == pytest.approx(0.6)
        assert m.ci95 is not None and m.ci95[0] < m.value < m.ci95[1]
    assert (small.n, large.n) == (20, 2000)
    assert _width(large) < _width(small) / 5  # about 1/sqrt(100) as wide
    assert metrics.mean_metric([0, 1, 1, 0, 1] * 4, seed=0) == small  # seeded: reruns agree


def test_nothing_measured_is_undefined_not_zero() -> None:
    assert metrics.mean_metric([]) == Metric(value=None, ci95=None, n=0)
    assert metrics.ratio_metric([0.0, 0.0], [0, 0]) == Metric(value=None, ci95=None, n=2)
    assert metrics.auc_metric([1.0], []) == Metric(value=None, ci95=None, n=1)


def test_ratio_is_a_ratio_of_sums() -> None:
    m = metrics.ratio_metric([3.0, 1.0, 6.0], [3, 1, 2])
    assert m.value == pytest.approx(10 / 6)
    assert m.ci95 is not None and m.ci95[0] <= m.value <= m.ci95[1]


def _brute_auc(pos: list[float], neg: list[float]) -> float:
    return sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_counts_ties_half() -> None:
    assert metrics.roc_auc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert metrics.roc_auc(np.array([1.0]), np.array([1.0, 1.0])) == 0.5
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(1, 6, 40).astype(float), rng.integers(1, 6, 70).astype(float)
    assert metrics.roc_auc(pos, neg) == pytest.approx(_brute_auc(list(pos), list(neg)))


def test_auc_of_perfect_reversed_and_constant_rankings() -> None:
    pos, neg = [4.0, 5.0, 4.5], [1.0, 2.0, 1.5, 3.0]
    assert metrics.auc_metric(pos, neg) == Metric(value=1.0, ci95=(1.0, 1.0), n=7)
    assert metrics.auc_metric(neg, pos).value == 0.0
    assert metrics.auc_metric([3.0] * 3, [3.0] * 4).value == 0.5
    mixed = metrics.auc_metric([4.0, 2.0, 5.0, 3.0], [1.0, 3.5, 2.5, 1.0])
    assert mixed.ci95 is not None and mixed.ci95[0] <= mixed.value <= mixed.ci95[1] and mixed.value == 0.8125


def test_distinct_2_of_a_constant_is_low_and_of_distinct_texts_one() -> None:
    constant = metrics.distinct_2(["How can I help you?"] * 20)
    assert constant.value == pytest.approx(1 / 20)
    assert constant.ci95 == pytest.approx((1 / 20, 1 / 20))
    varied = metrics.distinct_2([f"How do I install package number {i}?" for i in range(20)])
    # Each text has 6 bigrams: "how do", "do i", ... repeat in every text, only "number <i>?" differs.
    assert varied.value == pytest.approx((5 + 20) / (6 * 20))
    assert varied.ci95 is not None and varied.ci95[0] <= varied.value <= varied.ci95[1]
    assert metrics.distinct_2(["a b c", "d e"]).value == 1.0
    assert metrics.distinct_2(["one", ""]).value is None  # no bigram at all


def test_read_pairs_takes_seed_records_and_names_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "heldout.jsonl"
    path.write_text(SeedPair.make("What is Debian?", "A free OS.", "debian-faq", "GPL").model_dump_json() + "\n\n"
                    + json.dumps({"instruction": "Hi?", "output": "Hello."}) + "\n")
    assert [(p.line, p.instruction, p.response) for p in metrics.read_pairs(path)] == [
        (1, "What is Debian?", "A free OS."), (3, "Hi?", "Hello.")]
    path.write_text(json.dumps({"instruction": "Hi?", "response": "Hello."}) + "\n"
                    + json.dumps({"instruction": " ", "response": "x"}) + "\n")
    with pytest.raises(ValueError, match="heldout.jsonl line 2"):
        metrics.read_pairs(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no pairs"):
        metrics.read_pairs(path)


def test_metrics_file_round_trips_and_prints(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    ms = {"auc": metrics.auc_metric([2.0], [1.0]), "precision_at_k": metrics.mean_metric([])}
    metrics.write_metrics(out, ms)
    assert json.loads(out.read_text()) == {"auc": {"value": 1.0, "ci95": [1.0, 1.0], "n": 2},
                                           "precision_at_k": {"value": None, "ci95": None, "n": 0}}
    assert metrics.read_metrics(out) == ms
    text = metrics.format_metrics("scorer", ms)
    assert "auc" in text and "[1.0000, 1.0000]" in text and "precision_at_k  -" in text
    assert metrics.beside(out, "rows.jsonl") == tmp_path / "m.rows.jsonl"


@pytest.mark.server
def test_both_stage_commands_on_demo_pairs(servers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from humpback.data.build import BuildConfig, build_demo

    demo = build_demo(BuildConfig(out=tmp_path / "demo", max_corpus_docs=10)).out
    monkeypatch.setenv("HUMPBACK_API_KEY", servers.api_key or "")
    common = ["--pairs", str(demo / "heldout.jsonl"), "--limit", "4", "--seed", "1"]
    assert main(["eval", "backward", "--endpoint", servers.backward_url, "--model", servers.backward_model,
                 "--out", str(tmp_path / "backward.json"), "--max-tokens", "64", *common]) == 0
    assert main(["eval", "scorer", "--endpoint", servers.scorer_url, "--model", servers.scorer_model,
                 "--out", str(tmp_path / "scorer.json"), "--corpus", str(demo / "corpus.jsonl"), *common]) == 0
    printed = capsys.readouterr().out
    assert "usable_rate" in printed and "auc" in printed

    backward = metrics.read_metrics(tmp_path / "backward.json")
    assert list(backward) == ["instruction_nll", "rouge_l", "usable_rate", "distinct_2"]
    assert backward["rouge_l"].n == backward["usable_rate"].n == 4
    assert backward["instruction_nll"].value is not None and 0 < backward["instruction_nll"].value < 20
    for name in ("rouge_l", "usable_rate", "distinct_2"):
        m = backward[name]
        assert m.value is not None and m.ci95 is not None and 0 <= m.ci95[0] <= m.value <= m.ci95[1] <= 1, name
    assert len((tmp_path / "backward.rows.jsonl").read_text().splitlines()) == 4

    scorer = metrics.read_metrics(tmp_path / "scorer.json")
    kinds = ("positive", "mismatched", "first_sentence", "passage", "generic", "boilerplate")
    assert {"auc", "precision_at_k", "recall_at_k", *(f"mean_score_{k}" for k in kinds)} <= set(scorer)
    assert scorer["mean_score_positive"].n == scorer["mean_score_mismatched"].n == scorer["mean_score_passage"].n == 4
    assert scorer["mean_score_generic"].n == scorer["mean_score_boilerplate"].n == 4
    assert scorer["auc"].value is not None and 0 <= scorer["auc"].value <= 1
    for k in kinds:
        value = scorer[f"mean_score_{k}"].value
        assert value is not None and 1 <= value <= 5, k
    rows = (tmp_path / "scorer.rows.jsonl").read_text().splitlines()
    assert len(rows) == sum(scorer[f"mean_score_{k}"].n for k in kinds)
