"""Past the paper, on the real CPU vLLM servers: rewrite real pip documentation segments with the
served model, score originals and rewrites with curate, pair them with `export dpo`, and write the
curated set as a `datasets` folder with its card."""

from __future__ import annotations

import asyncio
import json
from itertools import islice
from pathlib import Path

import pytest

from client.corpus import Corpus
from client.curate import CurateConfig, curate
from client.dataset import DatasetFiles, export_dataset
from client.fanout import FanoutConfig
from client.preferences import PreferenceConfig, export_dpo
from client.prepare import Preparer
from client.rewrite import RewriteConfig, rewrite
from humpback.contracts import PreferencePair, RewrittenCandidate

pytestmark = pytest.mark.server
DATA = Path(__file__).parent / "data" / "pip_docs.jsonl"
QUESTIONS = ["How do I install a Python package with pip?", "How does pip decide which version to install?",
             "How can I make pip builds reproducible?", "What does pip do with a requirements file?"]


def test_rewrite_score_pair_and_publish_on_the_real_server(servers, tmp_path: Path) -> None:  # noqa: ANN001
    prep = Preparer()
    segs = list(islice((s for doc in Corpus(DATA) if not hasattr(doc, "reason") for s in prep(doc)), len(QUESTIONS)))
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"instruction": q, "output": s.text, "source": s.source.model_dump()}) + "\n"
                             for q, s in zip(QUESTIONS, segs)))
    fan = FanoutConfig(endpoints=[servers.scorer_url], api_key=servers.api_key, timeout=300)
    rewritten = tmp_path / "rewritten.jsonl"
    # 320 tokens: the 135M rewriter finishes the shortest passage in ~220 and loops on the others
    # until the cap (on this stack, 160 tokens finished none of the four).
    summary = asyncio.run(rewrite(cands, rewritten, fan, RewriteConfig(model=servers.scorer_model, max_tokens=320,
                                                                        progress=False)))
    recs = [RewrittenCandidate.model_validate_json(line) for line in rewritten.read_text().splitlines()]
    # The only acceptable failure of a 135M rewriter is a rewrite that runs past the cap.
    assert set(summary.failures) <= {"rewrite truncated at max_tokens"}
    assert len(recs) == summary.results["written"] == len(QUESTIONS) - summary.results["failed"] >= 1
    by_question = {json.loads(line)["instruction"]: json.loads(line)["output"] for line in cands.read_text().splitlines()}
    assert all(r.original_output == by_question[r.instruction] and r.output != r.original_output for r in recs)

    cfg = CurateConfig(model=servers.scorer_model, min_score=1.0, histogram=False, progress=False)
    for name, src in (("orig", cands), ("rew", rewritten)):
        asyncio.run(curate(src, tmp_path / f"{name}.jsonl", fan, cfg))
    dpo = tmp_path / "dpo.jsonl"
    pairs_summary = export_dpo([tmp_path / "orig.scored.jsonl", tmp_path / "rew.scored.jsonl"], dpo,
                               PreferenceConfig(min_margin=0))
    pairs = [PreferencePair.model_validate_json(line) for line in dpo.read_text().splitlines()]
    assert len(pairs) == pairs_summary.results["pairs"] == len(recs) - pairs_summary.results["tied"]
    for p in pairs:
        assert p.score_chosen > p.score_rejected and {p.chosen[0].content, p.rejected[0].content} == {
            by_question[p.prompt[0].content], next(r.output for r in recs if r.instruction == p.prompt[0].content)}

    import datasets

    result = export_dataset(DatasetFiles(curated=tmp_path / "orig.jsonl", out=tmp_path / "orig.dataset"))
    ds = datasets.load_from_disk(str(tmp_path / "orig.dataset"))
    assert ds.num_rows == result["rows"] == len(QUESTIONS)  # min_score 1.0 keeps every scored pair
    # Rows name their source file, never a path of this machine (they may be published).
    assert set(ds["source"]) == {DATA.name} and "## Score distribution" in (tmp_path / "orig.dataset" / "README.md").read_text()
