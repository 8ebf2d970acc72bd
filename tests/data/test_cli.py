"""`humpback data demo|oasst1`: one flag per `BuildConfig` (and `Oasst1Source`) field, values reach the build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from humpback.cli import main
from humpback.data.build import BuildConfig
from humpback.data.cli import DEMO_ONLY, Oasst1Source
from humpback.settings import flags, from_args, parser_flags
from tests.subcommand import subcommand

FIXTURE = Path(__file__).parent / "data" / "oasst1_messages.jsonl"
# The names the commands had before their flags were generated: scripts keep working.
SEED_FLAGS = {"--out", "--min-answer-chars", "--max-answer-chars", "--heldout-fraction", "--max-seed"}


def test_every_field_has_a_flag_and_every_flag_a_field() -> None:
    demo = parser_flags(subcommand("data", "demo"))
    assert demo == set(flags(BuildConfig))
    assert SEED_FLAGS | {"--min-instruction-chars", "--max-instruction-chars", "--max-corpus-docs", "--min-doc-chars",
                         "--root"} == demo
    oasst1 = parser_flags(subcommand("data", "oasst1"))
    assert oasst1 == set(flags(BuildConfig, exclude=DEMO_ONLY)) | set(flags(Oasst1Source))
    assert SEED_FLAGS | {"--input", "--hub", "--split", "--lang"} <= oasst1
    assert not {"--root", "--max-corpus-docs", "--min-doc-chars"} & oasst1


def test_flag_beats_default() -> None:
    parser = subcommand("data", "demo")
    assert from_args(BuildConfig, parser.parse_args([])) == BuildConfig()
    cfg = from_args(BuildConfig, parser.parse_args(["--max-instruction-chars", "80", "--max-seed", "5"]))
    assert (cfg.max_instruction_chars, cfg.max_seed, cfg.out) == (80, 5, Path("data/demo"))
    with pytest.raises(ValueError, match="min_answer_chars"):
        from_args(BuildConfig, parser.parse_args(["--min-answer-chars", "10", "--max-answer-chars", "5"]))


def test_oasst1_values_reach_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert main(["data", "oasst1", "--input", str(FIXTURE), "--out", str(out), "--heldout-fraction", "0",
                 "--max-instruction-chars", "30"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    settings = manifest["settings"]
    assert (settings["out"], settings["heldout_fraction"], settings["max_instruction_chars"]) == (str(out), 0.0, 30)
    assert settings["min_answer_chars"] == BuildConfig().min_answer_chars
    # Both fixture instructions are longer than 30 characters: the flag reached the filter.
    assert manifest["sources"]["oasst1"]["dropped"] == {"instruction_length": 2}
    assert main(["data", "oasst1", "--input", str(FIXTURE), "--out", str(tmp_path / "p"),
                 "--heldout-fraction", "1"]) == 2
    assert "heldout_fraction" in capsys.readouterr().err
