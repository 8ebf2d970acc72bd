"""OpenAI batch JSONL round trips: export, a simulated batch run, import into the same journals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client.batch import (CandidateMeta, export_augment, export_curate, export_rewrite, import_augment, import_curate,
                          import_rewrite)
from client.curate import CurateConfig
from humpback.cli import main
from humpback.contracts import Candidate, Failure, InputError, Rejected, RewrittenCandidate, ScoredCandidate
from tests.client.conftest import make_text
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


def _batch_candidates(corpus: Path, tmp_path: Path) -> Path:
    """The candidates of `corpus`, through augment's batch round trip (what curate and rewrite read)."""
    cands = tmp_path / "cands.jsonl"
    req, res = tmp_path / "a_req.jsonl", tmp_path / "a_res.jsonl"
    export_augment([corpus], req, "backward")
    _run_batch(req, res)
    import_augment(req, res, cands)
    return cands


def test_curate_batch_round_trip(corpus: Path, tmp_path: Path) -> None:
    cands = _batch_candidates(corpus, tmp_path)
    sreq, sres, out = tmp_path / "s_req.jsonl", tmp_path / "s_res.jsonl", tmp_path / "curated.jsonl"
    cfg = CurateConfig(min_score=3.0)
    assert export_curate(cands, sreq, "scorer", cfg).results["requests"] == 30
    assert json.loads(sreq.read_text().splitlines()[0])["body"]["structured_outputs"]
    meta = [CandidateMeta.model_validate_json(x) for x in (tmp_path / "s_req.meta.jsonl").read_text().splitlines()]
    assert [m.candidate for m in meta] == [Candidate.model_validate_json(x) for x in cands.read_text().splitlines()]
    _run_batch(sreq, sres)
    summary = import_curate(sreq, sres, out, cfg)
    scored = [ScoredCandidate.model_validate_json(x) for x in (tmp_path / "curated.scored.jsonl").read_text().splitlines()]
    assert len(scored) == 30 and all(1 <= s.score <= 5 for s in scored)  # type: ignore[operator]
    assert summary.extra.selected == len(out.read_text().splitlines()) == sum(s.score >= 3.0 for s in scored)  # type: ignore[operator]


def test_rewrite_batch_round_trip_gives_the_live_path_s_records(corpus: Path, tmp_path: Path) -> None:
    cands = _batch_candidates(corpus, tmp_path)
    rreq, rres, out = tmp_path / "r_req.jsonl", tmp_path / "r_res.jsonl", tmp_path / "rewritten.jsonl"
    assert export_rewrite(cands, rreq, "scorer").results["requests"] == 30
    _run_batch(rreq, rres, fail={0})
    first = import_rewrite(rreq, rres, out, checkpoint="rw1")
    assert first.results["written"] == 29 and first.results["failed"] == 1
    _run_batch(rreq, rres)
    assert import_rewrite(rreq, rres, out).results["written"] == 1
    recs = [RewrittenCandidate.model_validate_json(x) for x in out.read_text().splitlines()]
    originals = {c.custom_id: c for c in map(Candidate.model_validate_json, cands.read_text().splitlines())}
    assert len(recs) == 30 and {r.candidate_id for r in recs} == set(originals)
    assert all(r.original_output == originals[r.candidate_id].output and r.model == "scorer" for r in recs)


def _result(custom_id: str, body: dict[str, Any] | None, status: int = 200) -> str:
    return json.dumps({"id": "r", "custom_id": custom_id, "response": {"status_code": status, "body": body},
                       "error": None})


def test_import_sets_aside_bad_result_lines_and_fails_missing_answers(corpus: Path, tmp_path: Path) -> None:
    req, res, out = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "cands.jsonl"
    export_augment([corpus], req, "backward")
    _run_batch(req, res, fail={3})
    ids = [json.loads(x)["custom_id"] for x in req.read_text().splitlines()]
    lines = res.read_text().splitlines()
    truncated = {"choices": [{"message": {"content": "What is"}, "finish_reason": "length"}]}
    lines[5] = _result(ids[5], truncated)
    del lines[7]  # request 7 gets no answer at all
    lines += ["{broken",  # line 30
              json.dumps({"response": {"status_code": 200, "body": {}}}),  # 31: no custom_id
              _result("f" * 32, FakeServer().answer({"messages": [{"content": "x"}]})),  # 32: not exported
              _result(ids[0], {"choices": [{"message": {"content": "second answer"}, "finish_reason": "stop"}]})]
    res.write_text("\n".join(lines) + "\n")

    summary = import_augment(req, res, out)
    errors = [Rejected.model_validate_json(x) for x in (tmp_path / "cands.errors.jsonl").read_text().splitlines()]
    assert [(e.source, e.line, e.field) for e in errors] == [
        (str(res), 30, None), (str(res), 31, "custom_id"), (str(res), 32, "custom_id"), (str(res), 33, "custom_id")]
    assert [e.reason.split(":")[0] for e in errors] == [
        "invalid JSON", "not a batch result", "unknown custom_id", "duplicate custom_id"]
    assert errors[1].reason == "not a batch result: field 'custom_id': Field required"
    assert errors[3].reason == "duplicate custom_id: first at line 1" and errors[0].excerpt == "{broken\n"
    assert summary.input == {"results": 33, "rejected": 4}
    assert summary.rejected == {"invalid JSON": 1, "not a batch result": 1, "unknown custom_id": 1,
                                "duplicate custom_id": 1}

    failed = [Failure.model_validate_json(x) for x in (tmp_path / "cands.failed.jsonl").read_text().splitlines()]
    assert [(f.custom_id, f.reason, f.attempts) for f in failed] == [
        (ids[3], "batch error: 500", 1), (ids[5], "unusable instruction (truncated): 'What is'", 1),
        (ids[7], "no result in the batch output", 0)]
    assert all(f.source is not None and f.source.path == str(corpus) for f in failed)
    assert summary.results == {"already_done": 0, "written": 27, "failed": 3}  # counted as an online run counts
    assert summary.failures == {"batch error": 1, "unusable instruction (truncated)": 1,
                                "no result in the batch output": 1}
    cands = [Candidate.model_validate_json(x) for x in out.read_text().splitlines()]
    assert len({c.custom_id for c in cands}) == 27 and "second answer" not in {c.instruction for c in cands}

    # The command says so: exit status 3, as a live run with failed requests; a re-run skips the done ones.
    assert main(["batch", "import", "augment", "--requests", str(req), "--results", str(res),
                 "--out", str(out)]) == 3
    assert len((tmp_path / "cands.errors.jsonl").read_text().splitlines()) == 4
    assert len((tmp_path / "cands.failed.jsonl").read_text().splitlines()) == 3
    assert len(out.read_text().splitlines()) == 27


def test_curate_import_fails_unusable_answers(corpus: Path, tmp_path: Path) -> None:
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"instruction": f"Explain {i}", "output": make_text(i)}) + "\n"
                             for i in range(4)))
    req, res, out = tmp_path / "s_req.jsonl", tmp_path / "s_res.jsonl", tmp_path / "curated.jsonl"
    export_curate(cands, req, "scorer", CurateConfig())
    _run_batch(req, res)
    lines = res.read_text().splitlines()
    ids = [json.loads(x)["custom_id"] for x in lines]
    lines[1] = _result(ids[1], {"choices": [{"message": {"content": ""}, "finish_reason": "abort"}]})
    lines[2] = _result(ids[2], {"choices": [{"message": {"content": "great"}, "finish_reason": "stop"}]})
    res.write_text("\n".join(lines) + "\n")
    summary = import_curate(req, res, out, CurateConfig(min_score=1.0))
    failed = [Failure.model_validate_json(x) for x in (tmp_path / "curated.failed.jsonl").read_text().splitlines()]
    assert [(f.custom_id, f.reason) for f in failed] == [
        (ids[1], "generation aborted by the server"), (ids[2], "no score digit in the answer 'great'")]
    assert summary.results["failed"] == 2 and summary.results["written"] == 2
    scored = [ScoredCandidate.model_validate_json(x) for x in (tmp_path / "curated.scored.jsonl").read_text().splitlines()]
    assert [s.custom_id for s in scored] == [ids[0], ids[3]]
    assert [(s.source.path, s.source.line) for s in scored] == [(str(cands), 1), (str(cands), 4)]
    assert summary.extra.selected == 2 and not (tmp_path / "curated.errors.jsonl").exists()


def test_import_refuses_a_meta_file_out_of_step(corpus: Path, tmp_path: Path) -> None:
    req, res = tmp_path / "req.jsonl", tmp_path / "res.jsonl"
    export_augment([corpus], req, "backward")
    _run_batch(req, res)
    meta = tmp_path / "req.meta.jsonl"
    meta.write_text("".join(meta.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(InputError, match=r"req\.meta\.jsonl:1: does not match line 1 of .*export the requests again"):
        import_augment(req, res, tmp_path / "cands.jsonl")


def test_import_reads_bom_and_crlf_and_names_the_line_of_a_bad_byte(corpus: Path, tmp_path: Path) -> None:
    req, res, out = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "cands.jsonl"
    export_augment([corpus], req, "backward")
    _run_batch(req, res)
    for path in (req, tmp_path / "req.meta.jsonl", res):  # as a Windows editor saves them
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    summary = import_augment(req, res, out)
    assert summary.results == {"already_done": 0, "written": 30, "failed": 0} and summary.input == {"results": 30}
    assert not (tmp_path / "cands.errors.jsonl").exists()
    lines = req.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"Segment", b"Segm\xe9nt", 1)  # one Latin-1 byte
    req.write_bytes(b"".join(lines))
    with pytest.raises(InputError, match=r"req\.jsonl:3: not a BatchRequest line \(.*\); export the requests again"):
        import_augment(req, res, tmp_path / "other.jsonl")
