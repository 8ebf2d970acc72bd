"""rewrite() against the fake server: one rewrite per pair with its original beside it, the request
built from the shared prompt, a truncated rewrite failed and retried on resume, exactly once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from client.fanout import FanoutConfig
from client.rewrite import RewriteConfig, rewrite
from humpback.contracts import RewrittenCandidate, rewrite_messages
from tests.client.conftest import make_text
from tests.client.fake_server import FakeServer

QUIET = RewriteConfig(progress=False)


def _fan(url: str) -> FanoutConfig:
    return FanoutConfig(endpoints=[url], backoff_base=0.01, backoff_max=0.05)


def _candidates(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"{i:032x}", "instruction": f"What is topic {i}?",
                                        "output": make_text(i, 700)}) + "\n" for i in range(n)))
    return path


def _records(path: Path) -> list[RewrittenCandidate]:
    return [RewrittenCandidate.model_validate_json(line) for line in path.read_text().splitlines()]


async def test_each_pair_is_rewritten_once_with_its_original(fake: FakeServer, tmp_path: Path) -> None:
    fake.keep_bodies = True
    cands = _candidates(tmp_path / "cands.jsonl")
    out = tmp_path / "rewritten.jsonl"
    summary = await rewrite(cands, out, _fan(fake.url), QUIET)
    recs = _records(out)
    originals = {json.loads(line)["custom_id"]: json.loads(line) for line in cands.read_text().splitlines()}
    assert summary.results["written"] == len(recs) == 12 and len({r.custom_id for r in recs}) == 12
    for r in recs:
        src = originals[r.candidate_id]
        assert r.instruction == src["instruction"] and r.original_output == src["output"]
        assert r.output != r.original_output and r.model == "fake" and r.checkpoint == "/fake/weights"
    body = fake.bodies[0]
    assert any(body["messages"] == rewrite_messages(c["instruction"], c["output"]) for c in originals.values())
    assert body["temperature"] == 0.0 and body["max_tokens"] == QUIET.max_tokens


async def test_a_truncated_rewrite_fails_and_a_rerun_asks_only_for_it(fake: FakeServer, tmp_path: Path) -> None:
    cands = _candidates(tmp_path / "cands.jsonl")
    out = tmp_path / "rewritten.jsonl"
    fake.script.extend(["length", "empty"])
    first = await rewrite(cands, out, _fan(fake.url), QUIET)
    assert first.results["written"] == 10 and first.results["failed"] == 2
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "rewritten.failed.jsonl").read_text().splitlines()]
    assert sorted(reasons) == ["empty rewrite", "rewrite truncated at max_tokens"]
    asked = fake.requests["/v1/chat/completions"]
    second = await rewrite(cands, out, _fan(fake.url), QUIET)
    assert second.results["written"] == 2 and second.results["skipped_done"] == 10
    assert fake.requests["/v1/chat/completions"] == asked + 2
    assert len({r.candidate_id for r in _records(out)}) == 12 == len(_records(out))


async def test_a_curated_chat_set_is_rewritten_pair_by_pair(fake: FakeServer, tmp_path: Path,
                                                            capsys) -> None:
    """What `curate` writes (chat lines, a system prompt first) is a set of pairs rewrite takes; a file
    of which no line is a pair ends with exit status 2, not as if all went well."""
    from humpback.cli import main
    from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, tagged_example

    curated = tmp_path / "curated.jsonl"
    curated.write_text("".join(tagged_example(f"What is topic {i}?", make_text(i, 700), AUGMENTED_SYSTEM_PROMPT)
                               .model_dump_json() + "\n" for i in range(5)))
    summary = await rewrite(curated, tmp_path / "rewritten.jsonl", _fan(fake.url), QUIET)
    recs = _records(tmp_path / "rewritten.jsonl")
    assert summary.results["written"] == 5 and summary.input["rejected"] == 0
    assert sorted(r.instruction for r in recs) == [f"What is topic {i}?" for i in range(5)]
    assert all(r.original_output == make_text(int(r.instruction.split()[3][:-1]), 700) for r in recs)
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"text": "a corpus line, not a pair"}\n' * 3)
    code = await asyncio.to_thread(main, ["rewrite", "--candidates", str(junk), "--out",
                                          str(tmp_path / "junk.out.jsonl"), "--endpoint", fake.url, "--no-progress"])
    assert code == 2 and "every one of the 3 input records was refused" in capsys.readouterr().err
