"""`humpback eval` against the real vLLM servers: well-formed results, not good ones (135M model)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from humpback.evaluation import ifeval, nll, pairwise
from humpback.evaluation.common import GenerationConfig
from client.fanout import FanoutConfig

pytestmark = pytest.mark.server


def _fan(url: str, servers: Any) -> FanoutConfig:
    return FanoutConfig(endpoints=[url], api_key=servers.api_key, max_retries=2)


async def test_ifeval_on_three_prompts(servers: Any, tmp_path: Path) -> None:
    s = await ifeval.run_ifeval(tmp_path, _fan(servers.backward_url, servers), servers.backward_model,
                                GenerationConfig(max_tokens=64), limit=3)
    assert s.prompt_level.n == 3 and s.instruction_level.n >= 3
    for acc in (s.prompt_level, s.instruction_level, *s.per_instruction.values()):
        assert 0.0 <= acc.strict <= acc.loose <= 1.0
    rows = (tmp_path / "ifeval.rows.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all(json.loads(r)["response"] for r in rows)


async def test_pairwise_on_two_prompts(servers: Any, tmp_path: Path) -> None:
    s = await pairwise.run_pairwise(tmp_path, pairwise.Contender(fanout=_fan(servers.backward_url, servers),
                                                                  model=servers.backward_model),
                                    pairwise.Contender(), _fan(servers.scorer_url, servers), servers.scorer_model,
                                    GenerationConfig(max_tokens=64), pairwise.PairwiseConfig(limit=2))
    assert s.n == 2 and s.wins + s.ties + s.losses == 2
    assert 0.0 <= s.ci_low <= s.win_rate <= s.ci_high <= 1.0
    assert 0.0 <= s.soft_win_rate <= 1.0 and 0.0 <= s.first_position_rate <= 1.0
    assert len((tmp_path / "pairwise.rows.jsonl").read_text().splitlines()) == 2


async def test_nll_on_three_pairs(servers: Any, tmp_path: Path) -> None:
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in [
        ("What is Python?", "Python is an interpreted, object-oriented programming language."),
        ("How do I undo the last git commit?", "Run git reset --soft HEAD~1 to keep the changes staged."),
        ("What is Debian?", "Debian is a free operating system built by volunteers."),
    ]))
    s = await nll.run_nll(seed, tmp_path, _fan(servers.scorer_url, servers), servers.scorer_model)
    assert (s.pairs, s.skipped) == (3, 0) and s.tokens > 20
    assert math.isfinite(s.nll_per_token) and s.nll_per_token > 0 and s.perplexity > 1
    for line in (tmp_path / "nll.rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["response_tokens"] > 0 and math.isfinite(row["nll_mean"]) and row["nll_mean"] > 0
