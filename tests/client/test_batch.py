"""OpenAI batch JSONL round trips: export, a simulated batch run, import into the same journals."""

from __future__ import annotations

import json
from pathlib import Path

from client.batch import export_augment, export_curate, import_augment, import_curate
from client.curate import CurateConfig
from humpback.contracts import Candidate, ScoredCandidate
from tests.client.fake_server import FakeServer


def _run_batch(requests: Path, results: Path, fail: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """What `vllm run-batch` does, answered by the fake server's logic (line numbers in `fail` error)."""
    fake = FakeServer()
    with open(requests) as f, open(results, "w") as out:
        for i, line in enumerate(f):
            req = json.loads(line)
            assert req["method"] == "POST" and req["url"] == "/v1/chat/completions"
            resp = ({"status_code": 500, "body": None} if i in fail
                    else {"status_code": 200, "body": fake.answer(req["body"])})
            out.write(json.dumps({"id": f"r{i}", "custom_id": req["custom_id"], "response": resp, "error": None}) + "\n")


def test_augment_batch_round_trip_and_resume(corpus: Path, tmp_path: Path) -> None:
    req, res, out = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "cands.jsonl"
    summary = export_augment([corpus], req, "backward")
    assert summary.results["requests"] == 30
    _run_batch(req, res, fail={3, 7})
    first = import_augment(req, res, out, checkpoint="v1")
    assert first.results["written"] == 28 and first.results["failed"] == 2
    cands = [Candidate.model_validate_json(x) for x in out.read_text().splitlines()]
    assert all(c.model == "backward" and c.checkpoint == "v1" and c.instruction for c in cands)
    _run_batch(req, res)  # the failed requests are resubmitted and succeed
    second = import_augment(req, res, out)
    assert second.results["written"] == 2 and second.results["skipped_done"] == 28
    assert len({json.loads(x)["custom_id"] for x in out.read_text().splitlines()}) == 30


def test_curate_batch_round_trip(corpus: Path, tmp_path: Path) -> None:
    cands = tmp_path / "cands.jsonl"
    req, res = tmp_path / "a_req.jsonl", tmp_path / "a_res.jsonl"
    export_augment([corpus], req, "backward")
    _run_batch(req, res)
    import_augment(req, res, cands)
    sreq, sres, out = tmp_path / "s_req.jsonl", tmp_path / "s_res.jsonl", tmp_path / "curated.jsonl"
    cfg = CurateConfig(min_score=3.0)
    assert export_curate(cands, sreq, "scorer", cfg).results["requests"] == 30
    assert json.loads(sreq.read_text().splitlines()[0])["body"]["structured_outputs"]
    _run_batch(sreq, sres)
    summary = import_curate(sreq, sres, out, cfg)
    scored = [ScoredCandidate.model_validate_json(x) for x in (tmp_path / "curated.scored.jsonl").read_text().splitlines()]
    assert len(scored) == 30 and all(1 <= s.score <= 5 for s in scored)  # type: ignore[operator]
    assert summary.extra["selected"] == len(out.read_text().splitlines()) == sum(s.score >= 3.0 for s in scored)  # type: ignore[operator]
