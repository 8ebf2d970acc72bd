"""The likelihood scorers (`client.likelihood`) on known answers: the signals' arithmetic, a fake
server whose log-probabilities do not depend on the context (so every PMI is 0 and every
log-probability is known), the shared unconditional terms, resume, batch round trips and the
combiner; then the real model (marked `server`)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

from client.batch import export_curate, import_curate
from client.calibration import FEATURES, Combiner, features, fit
from client.curate import CurateConfig, curate, scored_records
from client.fanout import FanoutConfig
from client.likelihood import TermLogprob, pmi_signals
from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, InputError, backward_messages
from tests.evaluation.fake_eval_server import EvalFake, logprob, render

PAIRS = [
    ("How do I list the files in a directory with Perl?",
     "Use opendir and readdir. Open the directory, read its entries in a loop, and close it when done."),
    ("Why does my floating-point sum print 0.30000000000000004?",
     "Computers keep floating-point numbers in binary, where 0.1 has no exact representation, so sums drift."),
    ("How can I install a Debian package from a .deb file?",
     "Run dpkg -i with the file name as root, then apt-get -f install to fetch any missing dependencies."),
    ("What does the git stash command do?",
     "It saves your uncommitted changes away and reverts the working tree to the last commit, so you can "
     "switch branches; git stash pop brings the changes back."),
]


def _candidates(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"instruction": x, "output": y}) + "\n" for x, y in pairs))
    return path


def _mismatched(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each response under the next pair's instruction."""
    return [(pairs[(i + 1) % len(pairs)][0], y) for i, (_, y) in enumerate(pairs)]


def _known_logprob(prompt: list[dict[str, str]], target: str) -> float:
    """The fake's log p(target | prompt): the target's tokens (characters) and end-of-turn."""
    full = render([*prompt, {"role": "assistant", "content": target}], False)
    start = len(render(prompt, True))
    return math.fsum(logprob(ord(c)) for c in full[start:])


def test_pmi_signals_known_answer() -> None:
    s = pmi_signals("pmi", TermLogprob(custom_id="c", logprob=-10.0, tokens=5),
                    TermLogprob(custom_id="u", logprob=-15.0, tokens=5))
    assert s == {"pmi": 5.0, "pmi_per_token": 1.0, "ifd": pytest.approx(math.exp(-1.0)), "pmi_target_tokens": 5.0,
                 "pmi_logp_conditional": -10.0, "pmi_logp_unconditional": -15.0}
    r = pmi_signals("reverse_pmi", TermLogprob(custom_id="c", logprob=-4.0, tokens=2),
                    TermLogprob(custom_id="u", logprob=-3.0, tokens=2))
    assert (r["reverse_pmi"], r["reverse_pmi_per_token"], r["reverse_ifd"]) == (-1.0, -0.5, pytest.approx(math.exp(0.5)))


@pytest.fixture
def eval_fake():
    server = EvalFake().start()
    yield server
    server.stop()


def _fan(server: EvalFake) -> FanoutConfig:
    return FanoutConfig(endpoints=[server.url], max_retries=0)


async def test_pmi_on_a_context_free_model_is_zero_and_shares_the_unconditional_term(eval_fake: EvalFake,
                                                                                      tmp_path: Path) -> None:
    pairs = PAIRS + _mismatched(PAIRS)  # every response twice: its unconditional term is asked once
    cands = _candidates(tmp_path / "c.jsonl", pairs)
    out = tmp_path / "curated.jsonl"
    cfg = CurateConfig(scorer="pmi", top_fraction=0.5, histogram=False, progress=False, decontaminate=False)
    summary = await curate(cands, out, _fan(eval_fake), cfg)
    assert summary.results["written"] == len(pairs) and summary.results.get("failed", 0) == 0
    assert eval_fake.requests["/v1/completions"] == len(pairs) + len(PAIRS)  # conditional each, unconditional once
    assert summary.extra.mode == "pmi" and summary.extra.bands is None
    recs = list(scored_records(tmp_path / "curated.scored.jsonl", "pmi"))
    assert len(recs) == len(pairs)
    for rec in recs:
        prompt = [{"role": "system", "content": AUGMENTED_SYSTEM_PROMPT}, {"role": "user", "content": rec.instruction}]
        assert rec.signals is not None
        assert rec.signals["pmi_logp_conditional"] == pytest.approx(_known_logprob(prompt, rec.output))
        assert rec.signals["pmi_target_tokens"] == len(rec.output) + len("<end>")
        assert rec.score == rec.signals["pmi"] == pytest.approx(0.0)
        assert rec.signals["ifd"] == pytest.approx(1.0)
    # Resumed: nothing is asked again, and the selection is rewritten from the journal.
    asked = {k: eval_fake.requests[k] for k in ("/tokenize", "/v1/completions")}
    again = await curate(cands, out, _fan(eval_fake), cfg)
    assert {k: eval_fake.requests[k] for k in asked} == asked
    assert again.results["skipped_done"] == len(pairs) and again.results.get("written", 0) == 0
    assert again.extra.selected == summary.extra.selected == len(pairs)  # all tie at 0: all kept


async def test_reverse_pmi_asks_the_backward_server(eval_fake: EvalFake, tmp_path: Path) -> None:
    back = EvalFake().start()
    try:
        cands = _candidates(tmp_path / "c.jsonl", PAIRS)
        cfg = CurateConfig(scorer="reverse_pmi", backward_endpoint=back.url, top_fraction=0.5, histogram=False,
                           progress=False, decontaminate=False)
        summary = await curate(cands, tmp_path / "out.jsonl", _fan(eval_fake), cfg)
        assert eval_fake.requests["/v1/completions"] == 0 and back.requests["/v1/completions"] == 2 * len(PAIRS)
        rec = next(scored_records(tmp_path / "out.scored.jsonl", "reverse_pmi"))
        assert rec.signals is not None and rec.scorer_model == summary.extra.model
        assert rec.signals["reverse_pmi_logp_conditional"] == pytest.approx(
            _known_logprob(backward_messages(rec.output), rec.instruction))
        assert rec.signals["reverse_pmi_logp_unconditional"] == pytest.approx(
            _known_logprob(backward_messages(""), rec.instruction))
    finally:
        back.stop()


async def test_runs_sharing_a_terms_journal_ask_each_term_once(eval_fake: EvalFake, tmp_path: Path) -> None:
    """The loop's iterations: another output and scored journal, the same model's terms (`terms`)."""
    back = EvalFake().start()
    try:
        cands = _candidates(tmp_path / "c.jsonl", PAIRS)
        cfg = CurateConfig(scorer="reverse_pmi", backward_endpoint=back.url, terms=tmp_path / "terms.jsonl",
                           top_fraction=0.5, histogram=False, progress=False, decontaminate=False)
        first = await curate(cands, tmp_path / "A1.jsonl", _fan(eval_fake), cfg)
        assert first.extra.terms_asked == back.requests["/v1/completions"] == 2 * len(PAIRS)
        assert not (tmp_path / "A1.scored.terms.jsonl").exists()
        second = await curate(cands, tmp_path / "A2.jsonl", _fan(eval_fake), cfg)
        assert second.results["written"] == len(PAIRS) and (second.extra.terms_asked or 0) == 0
        assert back.requests["/v1/completions"] == 2 * len(PAIRS)
        scores = [{r.candidate_id: r.score for r in scored_records(tmp_path / f"A{t}.scored.jsonl", "reverse_pmi")}
                  for t in (1, 2)]
        assert scores[0] == scores[1]
        # Without `terms` each run keeps its own, beside its scored journal, and asks them itself.
        own = await curate(cands, tmp_path / "A3.jsonl", _fan(eval_fake), cfg.model_copy(update={"terms": None}))
        assert own.extra.terms_asked == 2 * len(PAIRS) and (tmp_path / "A3.scored.terms.jsonl").exists()
    finally:
        back.stop()


async def test_a_scorer_without_what_it_needs_is_refused_before_anything_is_sent(eval_fake: EvalFake,
                                                                                  tmp_path: Path) -> None:
    cands = _candidates(tmp_path / "c.jsonl", PAIRS)
    for cfg, says in [(CurateConfig(scorer="reverse_pmi"), "--backward-endpoint"),
                      (CurateConfig(scorer="combined", backward_endpoint=eval_fake.url), "--calibration"),
                      (CurateConfig(scorer="pmi", min_prob=0.5), "--min-prob")]:
        with pytest.raises(InputError, match=says):
            await curate(cands, tmp_path / "out.jsonl", _fan(eval_fake), cfg)
    assert sum(eval_fake.requests.values()) == 0


async def test_a_term_over_the_context_fails_its_pair_only(tmp_path: Path) -> None:
    lengths = sorted(len(render([{"role": "system", "content": AUGMENTED_SYSTEM_PROMPT}, {"role": "user", "content": x},
                                 {"role": "assistant", "content": y}], False)) for x, y in PAIRS)
    server = EvalFake(max_model_len=lengths[-1]).start()  # the longest conversation leaves no room to generate
    try:
        cands = _candidates(tmp_path / "c.jsonl", PAIRS)
        cfg = CurateConfig(scorer="pmi", min_score=-1e9, histogram=False, progress=False, decontaminate=False)
        summary = await curate(cands, tmp_path / "out.jsonl", _fan(server), cfg)
    finally:
        server.stop()
    assert summary.results["failed"] == 1 and summary.results["written"] == len(PAIRS) - 1
    failure = json.loads((tmp_path / "out.failed.jsonl").read_text().splitlines()[0])
    assert f"do not fit max_model_len {lengths[-1]}" in failure["reason"]


def _run_batch(requests: Path, results: Path, urls: dict[str, str], headers: dict[str, str] | None = None) -> None:
    """What `vllm run-batch` does: each request posted to the server of the model it names."""
    with open(requests) as f, open(results, "w") as out, httpx.Client(headers=headers, timeout=600) as client:
        for line in f:
            req = json.loads(line)
            body = client.post(urls.get(req["body"]["model"], urls["*"]) + req["url"], json=req["body"]).json()
            out.write(json.dumps({"custom_id": req["custom_id"], "response": {"status_code": 200, "body": body}}) + "\n")


def _combiner(path: Path) -> Path:
    """A combiner that trusts the forward PMI alone: P = sigmoid(pmi)."""
    Combiner(features=list(FEATURES), mean=[0.0] * 5, scale=[1.0] * 5, coef=[1.0, 0, 0, 0, 0], intercept=0.0,
             data="pairs.jsonl", pairs=4, negatives={"mismatched": 4}, pair_ids=[], scorer_model="fake",
             backward_endpoint="http://b").write(path)
    return path


@pytest.mark.parametrize("scorer", ["pmi", "reverse_pmi", "combined"])
def test_batch_round_trip_gives_the_live_path_s_scores(scorer: str, eval_fake: EvalFake, tmp_path: Path) -> None:
    cands = _candidates(tmp_path / "c.jsonl", PAIRS + _mismatched(PAIRS))
    calibration = _combiner(tmp_path / "combiner.json") if scorer == "combined" else None
    cfg = CurateConfig(scorer=scorer, backward_endpoint=eval_fake.url, calibration=calibration, top_fraction=0.5,
                       histogram=False, progress=False, decontaminate=False)
    live = asyncio.run(curate(cands, tmp_path / "live.jsonl", _fan(eval_fake), cfg))
    req, res = tmp_path / "req.jsonl", tmp_path / "res.jsonl"
    exported = export_curate(cands, req, "fake", cfg, _fan(eval_fake))
    assert exported.results["requests"] == eval_fake.requests["/v1/completions"]  # the same distinct terms
    _run_batch(req, res, {"*": eval_fake.url})
    summary = import_curate(req, res, tmp_path / "batch.jsonl", cfg.model_copy(update={"backward_endpoint": None}))
    assert summary.results["written"] == 2 * len(PAIRS) and summary.results["failed"] == 0
    assert summary.extra.selected == live.extra.selected
    key = {(r.candidate_id, r.custom_id, r.score) for r in scored_records(tmp_path / "live.scored.jsonl", scorer)}
    assert {(r.candidate_id, r.custom_id, r.score) for r in scored_records(tmp_path / "batch.scored.jsonl",
                                                                           scorer)} == key
    again = import_curate(req, res, tmp_path / "batch.jsonl", cfg.model_copy(update={"backward_endpoint": None}))
    assert again.results.get("written", 0) == 0 and again.results["skipped_done"] == 2 * len(PAIRS)
    if scorer == "combined":
        assert json.loads((tmp_path / "batch.combiner.json").read_text())["data"] == "pairs.jsonl"
        assert summary.extra.combiner.path.endswith("batch.combiner.json")
        assert all(r.score == pytest.approx(0.5) for r in scored_records(tmp_path / "batch.scored.jsonl", scorer))


def test_the_combiner_applies_its_fit_and_refuses_a_bad_file(tmp_path: Path) -> None:
    # Positives have a higher PMI; the fit ranks them first, and the written combiner reproduces it.
    rows = [{"pmi": p, "pmi_per_token": p / 10, "reverse_pmi": p / 2, "reverse_pmi_per_token": p / 20,
             "pmi_target_tokens": 10.0} for p in (5.0, 6.0, 7.0, -1.0, 0.0, 1.0, 0.5)]
    labels = [True, True, True, False, False, False, False]
    mean, scale, coef, intercept = fit(rows, labels)
    c = Combiner(features=list(FEATURES), mean=mean, scale=scale, coef=coef, intercept=intercept, data="d", pairs=3,
                 negatives={"mismatched": 4}, pair_ids=[], scorer_model="m", backward_endpoint="b")
    probs = [c(r) for r in rows]
    assert min(probs[:3]) > 0.5 > max(probs[3:])
    assert features(rows[0])[-1] == pytest.approx(math.log(10.0))
    c.write(tmp_path / "c.json")
    assert Combiner.load(tmp_path / "c.json")(rows[0]) == probs[0]
    (tmp_path / "bad.json").write_text('{"features": []}')
    with pytest.raises(InputError, match="bad.json: not a combiner"):
        Combiner.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="missing.json: cannot read"):
        Combiner.load(tmp_path / "missing.json")


# --- the real model ---------------------------------------------------------------------------------

@pytest.mark.server
async def test_on_the_real_model_another_pair_s_instruction_lowers_the_pmi(servers, tmp_path: Path) -> None:
    fan = FanoutConfig(endpoints=[servers.scorer_url], api_key=servers.api_key)
    cands = _candidates(tmp_path / "c.jsonl", PAIRS + _mismatched(PAIRS))
    cfg = CurateConfig(scorer="pmi", top_fraction=0.5, progress=False, decontaminate=False)
    summary = await curate(cands, tmp_path / "out.jsonl", fan, cfg)
    assert summary.results["written"] == 2 * len(PAIRS) and summary.results["failed"] == 0
    pmi = {(r.instruction, r.output): r.score for r in scored_records(tmp_path / "out.scored.jsonl", "pmi")}
    for (x, y), (other, _) in zip(PAIRS, _mismatched(PAIRS)):
        assert pmi[(x, y)] > pmi[(other, y)], (x, y, pmi[(x, y)], pmi[(other, y)])
    # Across responses the summed PMI also grows with the response: the top half need not be the true pairs.
    assert summary.extra.selected == len(PAIRS)


@pytest.mark.server
@pytest.mark.parametrize("scorer", ["reverse_pmi", "combined"])
def test_on_the_real_model_every_scorer_runs_resumes_and_round_trips_a_batch(scorer: str, servers,
                                                                                   tmp_path: Path) -> None:
    fan = FanoutConfig(endpoints=[servers.scorer_url], api_key=servers.api_key)
    cands = _candidates(tmp_path / "c.jsonl", PAIRS + _mismatched(PAIRS))
    calibration = _combiner(tmp_path / "combiner.json") if scorer == "combined" else None
    cfg = CurateConfig(scorer=scorer, backward_endpoint=servers.backward_url, calibration=calibration,
                       top_fraction=0.5, progress=False, decontaminate=False)
    live = asyncio.run(curate(cands, tmp_path / "live.jsonl", fan, cfg))
    assert live.results["written"] == 2 * len(PAIRS) and live.results["failed"] == 0
    again = asyncio.run(curate(cands, tmp_path / "live.jsonl", fan, cfg))
    assert again.results["skipped_done"] == 2 * len(PAIRS) and (again.extra.terms_asked or 0) == 0
    req, res = tmp_path / "req.jsonl", tmp_path / "res.jsonl"
    export_curate(cands, req, "scorer", cfg, fan)
    _run_batch(req, res, {"*": servers.scorer_url, "backward": servers.backward_url}, servers.headers)
    summary = import_curate(req, res, tmp_path / "batch.jsonl", cfg)
    assert summary.results["written"] == 2 * len(PAIRS) and summary.results["failed"] == 0
    live_scores = {r.custom_id: r.score for r in scored_records(tmp_path / "live.scored.jsonl", scorer)}
    batch_scores = {r.custom_id: r.score for r in scored_records(tmp_path / "batch.scored.jsonl", scorer)}
    assert batch_scores.keys() == live_scores.keys()
    for k, v in live_scores.items():
        assert batch_scores[k] == pytest.approx(v, abs=0.05)  # same prefill, batched differently
