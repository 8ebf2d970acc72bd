"""`export_dataset`: the curated pairs as a `datasets` folder that `load_from_disk` reads, rows rebuilt
with curate's selection, and a card written from the run's records; a push to an unreachable hub
fails with a clear error and the folder kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.dataset import DatasetFiles, export_dataset
from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, HumpbackError, InputError, ScoredCandidate, Source


def _scored(i: int, score: float, scorer: str = "scorer", mode: str = "logprobs") -> str:
    src = Source(path="corpus.jsonl", line=i, metadata={"license": "GPL-2.0-only", "title": f"Doc {i}"})
    return ScoredCandidate(custom_id=f"s{i}", candidate_id=f"c{i}", instruction=f"Question {i}?",
                           output=f"Answer text {i}.", source=src, mode=mode, score=score,  # type: ignore[arg-type]
                           scorer_model=scorer).model_dump_json() + "\n"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    curated = tmp_path / "A1.jsonl"
    curated.write_text("")
    (tmp_path / "A1.scored.jsonl").write_text(
        _scored(1, 4.6) + _scored(2, 2.0) + _scored(3, 4.5) + _scored(4, 4.9, scorer="other") + _scored(5, 4.7, mode="free_text"))
    (tmp_path / "A1.summary.json").write_text(json.dumps({
        "results": {"contaminated": 2},
        "extra": {"model": "scorer", "checkpoint": "ftjob-m0", "mode": "logprobs", "k": 4.5, "top_fraction": None,
                  "selected": 2, "scored_total": 3, "bands": {"[1,2)": 0, "[2,3)": 1, "[4,4.5)": 0, "[4.5,5]": 2},
                  "contaminated": {"ifeval": 1, "heldout": 1}}}))
    (tmp_path / "cands.summary.json").write_text(json.dumps({
        "prepare": {"kept": 10, "too_short": 3, "near_duplicate": 1}, "extra": {"model": "backward", "checkpoint": "ftjob-myx"}}))
    return tmp_path


def test_the_folder_loads_with_the_curated_rows_and_the_card_tells_the_run(run: Path) -> None:
    import datasets

    files = DatasetFiles(curated=run / "A1.jsonl", out=run / "A1.dataset", augment_summary=run / "cands.summary.json")
    result = export_dataset(files)
    ds = datasets.load_from_disk(str(run / "A1.dataset"))
    assert result["rows"] == ds.num_rows == 2
    assert sorted(ds["score"]) == [4.5, 4.6] and set(ds["license"]) == {"GPL-2.0-only"}
    assert ds[0]["messages"][0] == {"role": "system", "content": AUGMENTED_SYSTEM_PROMPT}
    card = (run / "A1.dataset" / "README.md").read_text()
    assert card.startswith("---\nlicense: other") and "k = 4.5" in card
    for expected in ("| corpus.jsonl | GPL-2.0-only | 2 |", "| near_duplicate | 1 |", "| ifeval | 1 |",
                     "| backward (wrote the instructions) | backward | ftjob-myx |",
                     "| scorer (rated the pairs) | scorer | ftjob-m0 |", "| [4.5,5] | 2 |", "kept 2 of 3"):
        assert expected in card


def test_a_push_to_an_unreachable_hub_fails_clearly_and_keeps_the_folder(run: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = DatasetFiles(curated=run / "A1.jsonl", out=run / "A1.dataset", push_to_hub="someone/humpback-a1")
    with pytest.raises(HumpbackError, match="could not push to the hub repository 'someone/humpback-a1'"):
        export_dataset(files)
    assert (run / "A1.dataset" / "README.md").is_file()


def test_the_card_and_rows_carry_no_local_path_and_a_missing_license_says_so(run: Path) -> None:
    import datasets

    corpus = run / "data" / "corpora"
    lines = []
    for i, (name, lic) in enumerate([("perl/faq.jsonl", "GPL-2.0-only"), ("sotu/speeches.jsonl", None)], 1):
        rec = json.loads(_scored(i, 4.8))
        rec["source"] = {"path": str(corpus / name), "line": i, "metadata": {"license": lic} if lic else {}}
        lines.append(json.dumps(rec) + "\n")
    (run / "A1.scored.jsonl").write_text("".join(lines))
    summary = json.loads((run / "A1.summary.json").read_text())
    summary["extra"]["checkpoint"] = str(run / "models" / "smollm2-135m-instruct")
    (run / "A1.summary.json").write_text(json.dumps(summary))
    export_dataset(DatasetFiles(curated=run / "A1.jsonl", out=run / "A1.dataset"))
    card = (run / "A1.dataset" / "README.md").read_text()
    ds = datasets.load_from_disk(str(run / "A1.dataset"))
    assert str(run) not in card and not any(str(run) in s for s in ds["source"])
    assert sorted(ds["source"]) == ["perl/faq.jsonl", "sotu/speeches.jsonl"]
    assert "| sotu/speeches.jsonl | not given | 1 |" in card and "None" not in card
    assert "| scorer (rated the pairs) | scorer | smollm2-135m-instruct |" in card


def test_the_card_names_a_likelihood_scorer_and_its_combiner() -> None:
    from client.dataset import dataset_card

    curate = {"extra": {"mode": "combined", "k": 0.5, "selected": 3, "scored_total": 9, "bands": None,
                        "combiner": {"path": "A1.combiner.json", "data": "calibration.jsonl", "pairs": 24,
                                     "negatives": {"mismatched": 24, "generic": 24}}}}
    card = dataset_card("A1", [], curate, {}, {}, None)
    assert "by P(good pair) from both likelihood signals" in card
    assert ("The combiner's weights: `A1.combiner.json`, fitted on 24 held-out pairs of `calibration.jsonl` and "
            "negatives built from them (mismatched 24, generic 24).") in card
    assert "A likelihood score has no rubric bands." in card


def test_the_threshold_is_read_under_its_one_name_k(run: Path) -> None:
    """curate writes the k it selected with as `extra.k` (whichever of min_score or top_fraction chose it);
    the export selects with that k, and a summary that names none (e.g. the old `min_score`) is refused
    in one line naming the file's role and the field."""
    summary_path = run / "A1.summary.json"
    summary = json.loads(summary_path.read_text())
    summary["extra"]["k"] = 4.55  # 4.6 kept, 4.5 no longer
    summary_path.write_text(json.dumps(summary))
    files = DatasetFiles(curated=run / "A1.jsonl", out=run / "A1.dataset")
    assert export_dataset(files)["rows"] == 1
    summary["extra"]["min_score"] = summary["extra"].pop("k")
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(InputError, match=r"names no threshold, mode or scorer \(extra\.k,"):
        export_dataset(DatasetFiles(curated=run / "A1.jsonl", out=run / "A1.dataset2"))
