"""`eval scorer` on known answers: fake scorers that rank the human pairs first, last, or not at all,
and the negatives built from the pairs."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client.curate import CurateConfig, ScoreTask
from client.fanout import FanoutConfig
from humpback.cli import main
from humpback.contracts import DEFAULT_URLS, Candidate, InputError, Source
from humpback.evaluation import scorer
from humpback.evaluation.cli import SCORER_DEFAULTS, Server, StageRun
from humpback.evaluation.metrics import Metric
from humpback.evaluation.records import HeldoutPair, ScorerRow
from humpback.settings import flags, from_args, parser_flags
from tests.evaluation.fake_eval_server import EvalFake
from tests.evaluation.fake_stage_server import StageFake
from tests.evaluation.pairs import write_pairs
from tests.subcommand import subcommand

PAIRS = [
    ("How do I list the files in a directory with Perl?",
     "Use opendir and readdir. Open the directory, read its entries in a loop, and close it when done."),
    ("What is the difference between a list and an array in Perl?",
     "An array is a variable that holds a list. A list is a sequence of values that exists only as a value."),
    ("Why does my floating-point sum print 0.30000000000000004?",
     "Computers keep floating-point numbers in binary! There 0.1 has no exact representation, so sums drift."),
    ("How can I install a Debian package from a .deb file?",
     "Run dpkg -i with the file name as root.\nThen run apt-get -f install to fetch any missing dependencies."),
    ("Explain what a Python virtual environment is for.",
     "It keeps the packages of one project apart from the system's and from other projects' packages."),
]
ONE_SENTENCE = 4  # the last response is one sentence: it gives no first_sentence negative
WORDS = ("apt dpkg kernel module driver mirror archive release stable testing package source binary build "
         "patch upstream maintainer bug report policy manual section chapter example config file path "
         "user group shell script daemon service socket network").split()


def _is_positive(prompt: str) -> bool:
    return any(x in prompt and y in prompt for x, y in PAIRS)


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "heldout.jsonl", PAIRS)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    docs = [". ".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(12)) + "." for _ in range(3)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _server(rate: Callable[[str], int]) -> Iterator[StageFake]:
    s = StageFake(rate=rate).start()
    yield s
    s.stop()


@pytest.fixture
def first() -> Iterator[StageFake]:
    yield from _server(lambda prompt: 5 if _is_positive(prompt) else 1)


@pytest.fixture
def last() -> Iterator[StageFake]:
    yield from _server(lambda prompt: 1 if _is_positive(prompt) else 5)


@pytest.fixture
def constant() -> Iterator[StageFake]:
    yield from _server(lambda prompt: 3)


def _fan(server: StageFake) -> FanoutConfig:
    return FanoutConfig(endpoints=[server.url], max_retries=0)


def _rows(path: Path) -> list[ScorerRow]:
    return [ScorerRow.model_validate_json(line) for line in path.read_text().splitlines()]


def _value(m: Metric) -> float | None:
    return None if m.value is None else round(m.value, 6)


async def test_a_scorer_that_ranks_positives_first_has_auc_1(pairs: Path, corpus: Path, first: StageFake,
                                                              tmp_path: Path) -> None:
    m = await scorer.run_scorer_eval(pairs, tmp_path / "s.json", _fan(first), config=scorer.ScorerEvalConfig(
        corpus=corpus))
    n = len(PAIRS)
    # positives, then mismatched, first_sentence (one response is one sentence), passage, generic, boilerplate
    assert m["auc"] == Metric(value=1.0, ci95=(1.0, 1.0), n=n + n + (n - 1) + n + n + n)
    assert {k: _value(v) for k, v in m.items() if k.startswith(("auc_", "mean_score_", "precision", "recall"))} == {
        "precision_at_k": 1.0, "recall_at_k": 1.0, "precision_at_r": 1.0, "mean_score_positive": 5.0,
        **{f"mean_score_{k}": 1.0 for k in scorer.NEGATIVE_KINDS}, **{f"auc_{k}": 1.0 for k in scorer.NEGATIVE_KINDS}}
    assert (m["precision_at_k"].n, m["mean_score_first_sentence"].n, m["mean_score_passage"].n) == (n, n - 1, n)
    # The length alone, beside it: boilerplate responses are longer than some human ones, cut ones shorter.
    assert m["length_auc_first_sentence"].value == 1.0
    assert {k for k in m if k.startswith("length_auc")} == {"length_auc", *(f"length_auc_{k}" for k in
                                                                          scorer.NEGATIVE_KINDS)}
    assert m["kept_length"].value == sum(len(y) for _, y in PAIRS) / n


async def test_a_scorer_that_ranks_positives_last_has_auc_0(pairs: Path, last: StageFake, tmp_path: Path) -> None:
    m = await scorer.run_scorer_eval(pairs, tmp_path / "s.json", _fan(last))
    assert (m["auc"].value, m["precision_at_k"].value, m["recall_at_k"].value) == (0.0, 0.0, 0.0)
    assert m["precision_at_k"].n == 4 * len(PAIRS) - 1  # every negative kept, no positive


async def test_a_constant_scorer_has_auc_one_half_and_keeps_nothing(pairs: Path, constant: StageFake,
                                                                     tmp_path: Path) -> None:
    m = await scorer.run_scorer_eval(pairs, tmp_path / "s.json", _fan(constant))
    assert m["auc"].value == 0.5
    assert m["precision_at_k"] == Metric(value=None, ci95=None, n=0)  # nothing scored >= 4.5
    assert {_value(v) for k, v in m.items() if k.startswith("mean_score_")} == {3.0}
    # Without --corpus there are no passage negatives, and the metrics say nothing about them.
    assert not any("passage" in k for k in m)
    low = await scorer.run_scorer_eval(pairs, tmp_path / "low.json", _fan(constant),
                                       config=scorer.ScorerEvalConfig(threshold=3.0))
    assert (low["precision_at_k"].value, low["recall_at_k"].value) == (pytest.approx(5 / 24), 1.0)


async def test_negatives_are_seeded_and_resumed(pairs: Path, corpus: Path, constant: StageFake,
                                                tmp_path: Path) -> None:
    cfg = scorer.ScorerEvalConfig(corpus=corpus)
    await scorer.run_scorer_eval(pairs, tmp_path / "a.json", _fan(constant), config=cfg, seed=1)
    asked = constant.requests["/v1/chat/completions"]
    await scorer.run_scorer_eval(pairs, tmp_path / "a.json", _fan(constant), config=cfg, seed=1)
    assert constant.requests["/v1/chat/completions"] == asked  # every score came from the journal
    await scorer.run_scorer_eval(pairs, tmp_path / "b.json", _fan(constant), config=cfg, seed=1)
    rows = _rows(tmp_path / "a.rows.jsonl")
    assert rows == _rows(tmp_path / "b.rows.jsonl")
    by_kind: dict[str, list[ScorerRow]] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)
    responses = {y: x for x, y in PAIRS}
    mismatched = by_kind["mismatched"]
    assert len(mismatched) == len(PAIRS)
    assert all(r.instruction != responses[r.output] for r in mismatched)  # never its own instruction
    assert sorted(r.instruction for r in mismatched) == sorted(x for x, _ in PAIRS)  # each given once
    assert [r.line for r in by_kind["first_sentence"]] == [i + 1 for i in range(len(PAIRS)) if i != ONE_SENTENCE]
    assert by_kind["first_sentence"][3].output == "Run dpkg -i with the file name as root."
    texts = {json.loads(line)["text"] for line in corpus.read_text().splitlines()}
    assert {r.output for r in by_kind["passage"]} == texts  # 3 passages for 5 pairs: each used
    await scorer.run_scorer_eval(pairs, tmp_path / "c.json", _fan(constant), config=cfg, seed=2)
    assert [r.instruction for r in _rows(tmp_path / "c.rows.jsonl") if r.kind == "mismatched"] != [
        r.instruction for r in mismatched]


def test_first_sentence() -> None:
    assert scorer.first_sentence("Use it. Then stop.") == "Use it."
    assert scorer.first_sentence("Version 0.1 works? Yes") == "Version 0.1 works?"
    assert scorer.first_sentence("A list:\n- one\n- two") == "A list:"
    assert scorer.first_sentence("One sentence only.") is None


def test_scores_are_keyed_by_the_served_weights() -> None:
    cand = Candidate(custom_id="c", instruction="x", output="y", source=Source(path="p", line=1), model="")
    ids = {scorer.EvalScoreTask(ScoreTask("scorer", root, CurateConfig())).request(cand).custom_id
           for root in ("/ckpt/1", "/ckpt/2")}
    assert len(ids) == 2


def test_a_mismatch_needs_two_pairs() -> None:
    one = [HeldoutPair(line=1, instruction="Q?", response="A. B.")]
    assert [kind for kind, *_ in scorer.negatives(one, 0, None)] == ["first_sentence", "generic", "boilerplate"]


def test_generic_and_boilerplate_negatives_keep_one_side_of_the_pair() -> None:
    pairs = [HeldoutPair(line=i + 1, instruction=x, response=y) for i, (x, y) in enumerate(PAIRS)]
    built = scorer.negatives(pairs, 0, None)
    generic = [(p, x, y) for kind, p, x, y in built if kind == "generic"]
    boiler = [(p, x, y) for kind, p, x, y in built if kind == "boilerplate"]
    assert [y for p, _, y in generic] == [p.response for p in pairs]
    assert all(x in scorer.GENERIC_INSTRUCTIONS for _, x, _ in generic)
    assert [x for p, x, _ in boiler] == [p.instruction for p in pairs]
    assert all(y in scorer.BOILERPLATE for _, _, y in boiler)
    assert built == scorer.negatives(pairs, 0, None)  # seeded


def test_every_field_has_a_flag_and_the_endpoint_is_the_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = subcommand("eval", "scorer")
    assert parser_flags(parser) == (set(flags(Server)) | set(flags(StageRun)) | set(flags(scorer.ScorerEvalConfig))
                                    | {"--scorer", "--mode", "--backward-endpoint", "--calibration", "--min-prob"})
    monkeypatch.delenv("HUMPBACK_EVAL_URL", raising=False)
    args = parser.parse_args(["--pairs", "p", "--out", "o", "--threshold", "4"])
    assert from_args(scorer.ScorerEvalConfig, args).threshold == 4.0
    assert from_args(Server, args, defaults=SCORER_DEFAULTS).endpoint == DEFAULT_URLS["scorer"]


def test_the_command_says_when_passages_are_missing(pairs: Path, first: StageFake, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scorer.json"
    assert main(["eval", "scorer", "--endpoint", first.url, "--pairs", str(pairs), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["auc"] == {"value": 1.0, "ci95": [1.0, 1.0], "n": 24}
    printed = capsys.readouterr().out
    assert "mean_score_mismatched" in printed and "pass --corpus" in printed


@pytest.fixture
def eval_fake() -> Iterator[EvalFake]:
    s = EvalFake().start()
    yield s
    s.stop()


async def test_a_likelihood_scorer_is_measured_with_its_signals_and_resumed(pairs: Path, eval_fake: EvalFake,
                                                                            tmp_path: Path) -> None:
    # The fake's log-probabilities ignore the context: every PMI is 0, so no signal tells anything.
    score = CurateConfig(scorer="reverse_pmi", backward_endpoint=eval_fake.url)
    m = await scorer.run_scorer_eval(pairs, tmp_path / "s.json", _fan(eval_fake), score=score)
    assert m["auc"].value == 0.5 and m["signal_auc_reverse_pmi"].value == 0.5
    assert "precision_at_k" not in m and m["precision_at_r"].n == len(PAIRS)  # no threshold on a model's scale
    rows = _rows(tmp_path / "s.rows.jsonl")
    assert all(r.signals is not None and r.score == r.signals["reverse_pmi"] for r in rows)
    asked = eval_fake.requests["/v1/completions"]
    await scorer.run_scorer_eval(pairs, tmp_path / "s.json", _fan(eval_fake), score=score)
    assert eval_fake.requests["/v1/completions"] == asked


async def test_calibrate_fits_a_combiner_that_eval_scorer_refuses_to_measure_on_its_own_pairs(
        pairs: Path, eval_fake: EvalFake, tmp_path: Path) -> None:
    from humpback.evaluation.calibrate import run_calibration

    combiner = await run_calibration(pairs, tmp_path / "combiner.json", _fan(eval_fake), eval_fake.url)
    assert (combiner.pairs, combiner.data) == (len(PAIRS), str(pairs))
    assert combiner.negatives == {"mismatched": 5, "first_sentence": 4, "generic": 5, "boilerplate": 5}
    score = CurateConfig(scorer="combined", backward_endpoint=eval_fake.url, calibration=tmp_path / "combiner.json")
    with pytest.raises(InputError, match="fitted on 5 of the pairs"):
        await scorer.run_scorer_eval(pairs, tmp_path / "s.json", _fan(eval_fake), score=score)
    other = write_pairs(tmp_path / "other.jsonl", [(x + " Please.", y + " Done.") for x, y in PAIRS])
    m = await scorer.run_scorer_eval(other, tmp_path / "s.json", _fan(eval_fake), score=score)
    assert all(0.0 <= r.score <= 1.0 for r in _rows(tmp_path / "s.rows.jsonl"))
    assert "precision_at_k" in m  # kept at P >= 0.5 when no --min-prob is given


async def test_calibrations_sharing_a_terms_journal_ask_the_scorer_again_for_new_weights(
        pairs: Path, eval_fake: EvalFake, tmp_path: Path) -> None:
    """The loop's calibrate_1 and calibrate_2: one terms' journal, the scorer's weights swapped in between
    (its served root unchanged, as after a reload), the backward model's the same."""
    from humpback.evaluation.calibrate import run_calibration

    back = EvalFake().start()
    try:
        terms = tmp_path / "terms.jsonl"
        await run_calibration(pairs, tmp_path / "c1.json", _fan(eval_fake), back.url, terms=terms, checkpoint="m0")
        forward, reverse = eval_fake.requests["/v1/completions"], back.requests["/v1/completions"]
        assert forward and reverse
        await run_calibration(pairs, tmp_path / "c2.json", _fan(eval_fake), back.url, terms=terms, checkpoint="m1")
        assert eval_fake.requests["/v1/completions"] == 2 * forward  # M1's terms: every one asked again
        assert back.requests["/v1/completions"] == reverse  # M_yx's: none
        await run_calibration(pairs, tmp_path / "c3.json", _fan(eval_fake), back.url, terms=terms, checkpoint="m1")
        assert eval_fake.requests["/v1/completions"] == 2 * forward  # the same weights again: nothing asked
    finally:
        back.stop()


def test_a_scorer_without_its_backward_model_is_refused_in_one_line(pairs: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "scorer", "--pairs", str(pairs), "--out", str(tmp_path / "s.json"),
                 "--scorer", "combined"]) == 2
    assert capsys.readouterr().err == ("humpback: error: --scorer combined needs --backward-endpoint URL (the "
                                       "backward model's server)\n")
