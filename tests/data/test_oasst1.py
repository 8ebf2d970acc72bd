"""oasst1 first-turn selection on a fixture in oasst1's real message schema (3 trees, 10 messages)."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from humpback.cli import main
from humpback.contracts import OasstError, SeedPair
from humpback.data.build import BuildConfig, build_oasst1
from humpback.data.oasst1 import OasstStats, first_turn_pairs, read_messages

FIXTURE = Path(__file__).parent / "data" / "oasst1_messages.jsonl"


def _select(paths: list[Path]) -> tuple[list[SeedPair], OasstStats]:
    stats = OasstStats()
    return list(first_turn_pairs(read_messages(paths, None, "train", stats), stats)), stats


def test_first_turn_english_rank0():
    pairs, stats = _select([FIXTURE])
    assert stats.messages == 10 and stats.roots == 3
    assert [p.instruction for p in pairs] == ["What is a hash table, and why are lookups in one fast?",
                                              "Give me three tips for writing clear commit messages."]
    assert pairs[0].response.startswith("A hash table maps keys")  # rank 0, not rank 1 nor the deleted reply
    assert "second turn" not in " ".join(p.response for p in pairs)
    assert dict(stats.dropped) == {"root_not_en": 1}
    assert all(p.source == "oasst1" and p.license == "Apache-2.0" for p in pairs)


def test_parquet_and_gzip_inputs_agree(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    with FIXTURE.open("rb") as src, gzip.open(tmp_path / "train.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    expected = [p.id for p in _select([FIXTURE])[0]]
    assert [p.id for p in _select([tmp_path / "train.parquet"])[0]] == expected
    assert [p.id for p in _select([tmp_path / "train.jsonl.gz"])[0]] == expected


def test_bad_rows_are_reported_not_fatal(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text() + "{not json\n" + json.dumps({"message_id": "x", "role": "prompter"}) + "\n")
    pairs, stats = _select([bad])
    assert len(pairs) == 2
    assert [f.reason for f in stats.failures][0].startswith("bad JSON")
    assert stats.failures[1].reason == "missing field 'parent_id'" and stats.failures[1].file.endswith("bad.jsonl:12")


def test_missing_input_and_unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with pytest.raises(OasstError, match="no such file"):
        _select([tmp_path / "absent.parquet"])

    def offline(*_: object, **__: object) -> None:
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    stats = OasstStats()
    with pytest.raises(OasstError, match="cannot load 'OpenAssistant/oasst1'.*pass them with --input"):
        list(read_messages([], "OpenAssistant/oasst1", "train", stats))


def test_build_oasst1_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    result = build_oasst1([FIXTURE], None, "train", BuildConfig(out=tmp_path / "a", heldout_fraction=0.0))
    seed = [SeedPair.model_validate_json(line) for line in (tmp_path / "a" / "seed.jsonl").read_text().splitlines()]
    assert len(seed) == 2 and result.outputs["heldout.jsonl"]["records"] == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["selection"]["first_turn_pairs"] == 2 and manifest["selection"]["dropped"] == {"root_not_en": 1}
    assert "Apache-2.0" in (tmp_path / "a" / "LICENSES.md").read_text()

    assert main(["data", "oasst1", "--input", str(FIXTURE), "--out", str(tmp_path / "b")]) == 0
    assert "seed.jsonl" in capsys.readouterr().out
    assert main(["data", "oasst1", "--out", str(tmp_path / "c")]) == 2
    assert "--input" in capsys.readouterr().err
