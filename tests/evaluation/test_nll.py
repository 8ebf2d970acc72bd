"""Held-out NLL against a fake server whose log-probabilities are known."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.fanout import FanoutConfig
from humpback.contracts import RequestFailed, SeedPair
from humpback.evaluation import nll
from tests.evaluation.fake_eval_server import EvalFake, logprob


@pytest.fixture
def server() -> Iterator[EvalFake]:
    s = EvalFake(max_model_len=120).start()
    yield s
    s.stop()


def _expected(response: str) -> list[float]:
    return [-logprob(ord(c)) for c in response + "<end>"]


async def test_nll_of_known_logprobs(server: EvalFake, tmp_path: Path) -> None:
    seed = tmp_path / "seed.jsonl"
    seed.write_text(
        json.dumps({"instruction": "Hi?", "output": "Hello."}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "Tag."}, {"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "An answer"}]}) + "\n"
        + json.dumps({"instruction": "Long?", "output": "x" * 200}) + "\n"
        + json.dumps({"instruction": "Unread", "output": "beyond the limit"}) + "\n")
    s = await nll.run_nll(seed, tmp_path / "out", FanoutConfig(endpoints=[server.url], max_retries=0), limit=3,
                          system_prompt="Sys.")
    rows = [json.loads(line) for line in (tmp_path / "out" / "nll.rows.jsonl").read_text().splitlines()]
    first, second = _expected("Hello."), _expected("An answer")
    assert rows[0]["prompt_tokens"] == len("<system>Sys.<user>Hi?<assistant>")  # default tag applied
    assert rows[1]["prompt_tokens"] == len("<system>Tag.<user>Q<assistant>")  # the pair's own tag kept
    assert rows[0]["response_tokens"] == len(first)
    assert rows[0]["nll_sum"] == pytest.approx(sum(first))
    assert rows[1]["nll_mean"] == pytest.approx(sum(second) / len(second))
    assert rows[2]["skipped"].startswith("2") and rows[2]["nll_sum"] is None  # over max_model_len 120
    assert (s.pairs, s.skipped, s.tokens) == (2, 1, len(first) + len(second))
    assert s.nll_per_token == pytest.approx((sum(first) + sum(second)) / (len(first) + len(second)))
    assert s.nll_per_pair == pytest.approx((sum(first) / len(first) + sum(second) / len(second)) / 2)
    assert s.perplexity == pytest.approx(math.exp(s.nll_per_token))
    assert server.requests["/v1/completions"] == 2


def test_response_nll_rejects_a_mismatched_answer() -> None:
    with pytest.raises(RequestFailed, match=r"prompt_logprobs\[1\] lacks token 7"):
        nll.response_nll([None, {"8": {"logprob": -1.0}}], [5, 7], 1)


def test_bad_seed_line_is_named(tmp_path: Path) -> None:
    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"question": "a"}) + "\n")
    with pytest.raises(ValueError, match="seed.jsonl line 2"):
        list(nll.read_seed(seed))


async def test_nll_reads_humpback_seed_records(server: EvalFake, tmp_path: Path) -> None:
    seed = tmp_path / "heldout.jsonl"
    seed.write_text(SeedPair.make("Hi?", "Hello.", "perlfaq", "GPL-1+").model_dump_json() + "\n")
    s = await nll.run_nll(seed, tmp_path / "out", FanoutConfig(endpoints=[server.url], max_retries=0))
    assert s.pairs == 1
    assert s.nll_per_token == pytest.approx(sum(_expected("Hello.")) / len(_expected("Hello.")))
