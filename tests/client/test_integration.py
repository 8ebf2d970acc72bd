"""augment and curate against the real CPU vLLM servers on a few dozen real segments (pip's docs, MIT)."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import pytest

from client.augment import AugmentConfig, augment
from client.instructions import ISSUE_KINDS
from client.corpus import Corpus
from client.curate import CurateConfig, curate
from client.fanout import FanoutConfig
from client.prepare import Preparer
from humpback.contracts import (
    BAND_LABELS,
    UNPARSED,
    Candidate,
    ChatExample,
    ScoredCandidate,
    band_of,
    parse_free_text_score,
)

pytestmark = pytest.mark.server
DATA = Path(__file__).parent / "data" / "pip_docs.jsonl"
N_SEGMENTS = 24


@pytest.fixture(scope="module")
def segments_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prep = Preparer()
    segs = list(islice((s for doc in Corpus(DATA) if not hasattr(doc, "reason") for s in prep(doc)), N_SEGMENTS))
    p = tmp_path_factory.mktemp("corpus") / "segments.jsonl"
    p.write_text("".join(json.dumps({"text": s.text, "doc": s.source.metadata.get("doc")}) + "\n" for s in segs))
    return p


@pytest.fixture(scope="module")
def candidates(servers, segments_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    import asyncio

    out = tmp_path_factory.mktemp("augment") / "cands.jsonl"
    fan = FanoutConfig(endpoints=[servers.backward_url], api_key=servers.api_key, timeout=300)
    summary = asyncio.run(augment([segments_file], out, fan,
                                  AugmentConfig(model=servers.backward_model, max_tokens=128, progress=False)))
    assert summary.prepare["kept"] == N_SEGMENTS
    assert summary.results["written"] + summary.results["failed"] == N_SEGMENTS
    # The only acceptable failures are unusable instructions (client.instructions), after their resamples.
    assert set(summary.failures) <= {f"unusable instruction ({kind})" for kind in ISSUE_KINDS}
    assert summary.quality.usable == summary.results["written"]
    return out


def test_augment_real_server(candidates: Path, servers) -> None:  # noqa: ANN001
    cands = [Candidate.model_validate_json(x) for x in candidates.read_text().splitlines()]
    # The untuned 135M model often rambles past the cap; those are dropped (and retried on a re-run).
    assert len(cands) >= 1
    assert all(c.instruction.strip() and c.model == servers.backward_model for c in cands)
    assert len({c.custom_id for c in cands}) == len(cands)


async def test_augment_rerun_is_a_no_op(candidates: Path, segments_file: Path, servers) -> None:  # noqa: ANN001
    before = candidates.read_text()
    fan = FanoutConfig(endpoints=[servers.backward_url], api_key=servers.api_key, timeout=300, max_retries=0)
    cands_before = len(before.splitlines())
    summary = await augment([segments_file], candidates, fan,
                            AugmentConfig(model=servers.backward_model, max_tokens=128, progress=False))
    assert summary.results["skipped_done"] == cands_before
    lines = candidates.read_text().splitlines()
    assert lines[:cands_before] == before.splitlines() and len({json.loads(x)["custom_id"] for x in lines}) == len(lines)


async def test_curate_logprobs_real_server(candidates: Path, servers, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "curated.jsonl"
    fan = FanoutConfig(endpoints=[servers.scorer_url], api_key=servers.api_key, timeout=300)
    summary = await curate(candidates, out, fan, CurateConfig(model=servers.scorer_model, progress=False))
    scored = [ScoredCandidate.model_validate_json(x) for x in (tmp_path / "curated.scored.jsonl").read_text().splitlines()]
    # A candidate that holds a short evaluation prompt ("Write \"Test\"" is two words) is dropped unscored.
    contaminated = tmp_path / "curated.contaminated.jsonl"
    dropped = len(contaminated.read_text().splitlines()) if contaminated.exists() else 0
    assert dropped == summary.results["contaminated"]
    assert len(scored) + dropped == len(candidates.read_text().splitlines()) and summary.results["failed"] == 0
    for s in scored:
        assert s.score is not None and 1.0 <= s.score <= 5.0
        assert s.distribution is not None and abs(sum(s.distribution.values()) - 1.0) < 1e-6
        assert s.score == pytest.approx(sum(int(d) * p for d, p in s.distribution.items()))
    for line in out.read_text().splitlines():
        ChatExample.model_validate_json(line)
    assert (tmp_path / "curated.scores.png").exists()


async def test_curate_free_text_real_server(candidates: Path, servers, tmp_path: Path) -> None:  # noqa: ANN001
    few = tmp_path / "few.jsonl"
    few.write_text("".join(candidates.read_text().splitlines(keepends=True)[:6]))
    n = len(few.read_text().splitlines())  # six, unless augment kept fewer candidates
    out = tmp_path / "curated.jsonl"
    fan = FanoutConfig(endpoints=[servers.scorer_url], api_key=servers.api_key, timeout=300)
    summary = await curate(few, out, fan,
                           CurateConfig(model=servers.scorer_model, mode="free_text", max_tokens=128, progress=False))
    # A free-text answer never fails: one that states no score is recorded with score None.
    assert summary.results["written"] == n and summary.results["failed"] == 0
    scored = [ScoredCandidate.model_validate_json(x) for x in (tmp_path / "curated.scored.jsonl").read_text().splitlines()]
    assert len(scored) == n == summary.extra.scored_total
    # Whatever the small model says, each score is exactly what the paper's "Score: N" parse reads in
    # its raw answer, and the parse rate, the bands and the selection are counted from those scores.
    for s in scored:
        assert s.mode == "free_text" and s.distribution is None and s.raw is not None
        parsed = parse_free_text_score(s.raw)
        assert s.score == (None if parsed is None else float(parsed))
        if re.search(r"Score: [1-5]", s.raw):  # the paper's exact format always parses
            assert s.score is not None
    parsed_n = sum(s.score is not None for s in scored)
    assert summary.extra.parse_rate == round(parsed_n / n, 4)
    assert summary.extra.bands == {label: sum(band_of(s.score) == label for s in scored)
                                      for label in (*BAND_LABELS, UNPARSED)}
    assert summary.extra.selected == sum(s.score is not None and s.score >= 4.5 for s in scored)
    assert len(out.read_text().splitlines()) == summary.extra.selected
