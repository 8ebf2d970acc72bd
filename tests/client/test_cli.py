"""The `humpback` subcommands this package registers: flags generated from the configs, run in-process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from client import cli
from client.augment import AugmentConfig
from client.curate import CurateConfig
from client.fanout import FanoutConfig
from client.prepare import PrepareConfig
from humpback.cli import main
from humpback.contracts import API_KEY_ENV, DEFAULT_URLS
from humpback.settings import flags, from_args, parser_flags
from tests.client.fake_server import FakeServer
from tests.subcommand import subcommand


def _flags(model: type[BaseModel], only: tuple[str, ...] | None = None) -> set[str]:
    """The flags `model` should give a command (`only` those fields), with the `--no-x` twin of a bool."""
    exclude = set(model.model_fields) - set(only) if only is not None else set()
    out = set()
    for flag, name in flags(model, exclude).items():
        out.add(flag)
        if model.model_fields[name].annotation is bool:
            out.add("--no-" + flag[2:])
    return out


# Every command with the models its flags come from.
COMMANDS = {
    ("augment",): _flags(cli.AugmentFiles) | _flags(AugmentConfig) | _flags(FanoutConfig) | _flags(PrepareConfig),
    ("curate",): _flags(cli.CurateFiles) | _flags(CurateConfig) | _flags(FanoutConfig),
    ("batch", "export", "augment"): (_flags(cli.ExportAugmentFiles) | _flags(AugmentConfig, cli.EXPORT_AUGMENT)
                                     | _flags(PrepareConfig)),
    ("batch", "export", "curate"): _flags(cli.ExportCurateFiles) | _flags(CurateConfig, cli.EXPORT_CURATE),
    ("batch", "import", "augment"): _flags(cli.ImportFiles) | _flags(AugmentConfig, cli.IMPORT_AUGMENT),
    ("batch", "import", "curate"): _flags(cli.ImportFiles) | _flags(CurateConfig, cli.IMPORT_CURATE),
}

# Flags scripts, docs and the benchmark used before the flags were generated: they keep working.
KEPT = {
    ("augment",): {"--corpus", "--out", "--max-tokens", "--seed", "--limit", "--endpoint", "--api-key", "--model",
                   "--concurrency", "--timeout", "--max-retries", "--checkpoint", "--fsync", "--no-progress",
                   "--text-field", "--min-chars", "--max-chars", "--no-segment", "--no-boilerplate-filter",
                   "--no-repetition-filter", "--no-dedup", "--no-near-dedup"},
    ("curate",): {"--candidates", "--out", "--mode", "--min-score", "--top-fraction", "--max-tokens", "--scored",
                  "--no-histogram", "--endpoint", "--api-key", "--model", "--concurrency", "--timeout",
                  "--max-retries", "--checkpoint", "--fsync", "--no-progress"},
    ("batch", "export", "augment"): {"--corpus", "--out", "--model", "--seed", "--max-tokens", "--text-field",
                                     "--no-dedup", "--no-near-dedup"},
    ("batch", "export", "curate"): {"--corpus", "--out", "--model", "--mode", "--max-tokens"},
    ("batch", "import", "augment"): {"--requests", "--results", "--out", "--checkpoint"},
    ("batch", "import", "curate"): {"--requests", "--results", "--out", "--model", "--mode", "--min-score",
                                    "--top-fraction", "--scored", "--no-histogram", "--checkpoint"},
}


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_every_field_has_a_flag_and_every_flag_a_field(command: tuple[str, ...]) -> None:
    assert parser_flags(subcommand(*command)) == COMMANDS[command]
    assert KEPT[command] <= COMMANDS[command]


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    files = {"augment": ["--corpus", "c.jsonl", "--out", "o.jsonl"],
             "curate": ["--candidates", "c.jsonl", "--out", "o.jsonl"]}[command]
    return subcommand(command).parse_args(files + argv)


def test_flag_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    augment = cli._fanout_config(_parse("augment", []), "backward")
    assert augment == FanoutConfig(endpoints=[DEFAULT_URLS["backward"]])
    assert cli._fanout_config(_parse("curate", []), "scorer").endpoints == [DEFAULT_URLS["scorer"]]
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert cli._fanout_config(_parse("curate", []), "scorer").api_key == "from-env"
    flagged = cli._fanout_config(_parse("curate", ["--api-key", "from-flag", "--endpoint", "http://a",
                                                   "--endpoint", "http://b", "--timeout", "5"]), "scorer")
    assert (flagged.api_key, flagged.endpoints, flagged.timeout) == ("from-flag", ["http://a", "http://b"], 5.0)


def test_config_values_from_flags() -> None:
    assert from_args(AugmentConfig, _parse("augment", [])) == AugmentConfig()
    aug = from_args(AugmentConfig, _parse("augment", ["--max-tokens", "64", "--seed", "3", "--limit", "5",
                                                      "--fsync", "always", "--no-progress", "--top-p", "0.5"]))
    assert (aug.max_tokens, aug.seed, aug.limit, aug.fsync, aug.progress, aug.top_p) == (64, 3, 5, "always", False, 0.5)
    assert from_args(CurateConfig, _parse("curate", [])) == CurateConfig()
    cur = from_args(CurateConfig, _parse("curate", ["--mode", "free_text", "--top-fraction", "0.5", "--no-histogram",
                                                    "--scored", "s.jsonl"]))
    assert (cur.mode, cur.top_fraction, cur.histogram, cur.scored) == ("free_text", 0.5, False, Path("s.jsonl"))
    with pytest.raises(SystemExit):  # k is either an absolute score or a fraction
        _parse("curate", ["--min-score", "4", "--top-fraction", "0.5"])
    with pytest.raises(ValidationError, match="top_fraction"):
        from_args(CurateConfig, _parse("curate", ["--top-fraction", "1.5"]))


@pytest.mark.parametrize(("argv", "exact", "near"), [
    ([], True, True),
    (["--no-near-dedup"], True, False),
    (["--no-dedup"], False, False),  # no duplicate removal at all, as before the flags were generated
    (["--no-dedup", "--near-dedup"], False, True),
])
def test_dedup_flags(argv: list[str], exact: bool, near: bool) -> None:
    cfg = cli._prepare_config(_parse("augment", argv + ["--no-segment", "--min-chars", "10"]))
    assert (cfg.dedup_exact, cfg.dedup_near, cfg.segment, cfg.min_chars) == (exact, near, False, 10)


def test_augment_then_curate_cli(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    cands, curated = tmp_path / "cands.jsonl", tmp_path / "curated.jsonl"
    assert main(["augment", "--corpus", str(corpus), "--out", str(cands), "--endpoint", fake.url,
                 "--no-progress", "--no-near-dedup"]) == 0
    assert len(cands.read_text().splitlines()) == 30
    assert main(["curate", "--candidates", str(cands), "--out", str(curated), "--endpoint", fake.url,
                 "--no-progress", "--min-score", "1"]) == 0
    assert len(curated.read_text().splitlines()) == 30
    summary = json.loads((tmp_path / "curated.summary.json").read_text())
    assert summary["extra"]["selected"] == 30


def test_batch_export_then_import_cli(corpus: Path, tmp_path: Path) -> None:
    req, res, cands = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "cands.jsonl"
    assert "<out>.meta.jsonl" in subcommand("batch", "export", "augment").format_help()
    assert main(["batch", "export", "augment", "--corpus", str(corpus), "--out", str(req), "--model", "m",
                 "--max-tokens", "64"]) == 0
    lines = [json.loads(x) for x in req.read_text().splitlines()]
    assert len(lines) == 30 and set(lines[0]) == {"custom_id", "method", "url", "body"}
    assert lines[0]["body"]["max_tokens"] == 64 and (tmp_path / "req.meta.jsonl").is_file()
    fake = FakeServer()
    answers = [{"custom_id": r["custom_id"], "response": {"status_code": 200, "body": fake.answer(r["body"])}}
               for r in lines]
    answers[0] = {"custom_id": lines[0]["custom_id"], "response": {"status_code": 500, "body": None}}
    res.write_text("".join(json.dumps(a) + "\n" for a in answers))
    # A failed answer fails the import with status 3, as a failed request fails `augment`.
    assert main(["batch", "import", "augment", "--requests", str(req), "--results", str(res), "--out", str(cands),
                 "--checkpoint", "v1"]) == 3
    assert len(cands.read_text().splitlines()) == 29
    answers[0] = {"custom_id": lines[0]["custom_id"],
                  "response": {"status_code": 200, "body": fake.answer(lines[0]["body"])}}
    res.write_text("".join(json.dumps(a) + "\n" for a in answers))
    assert main(["batch", "import", "augment", "--requests", str(req), "--results", str(res), "--out", str(cands)]) == 0
    assert len(cands.read_text().splitlines()) == 30
    assert json.loads(cands.read_text().splitlines()[0])["checkpoint"] == "v1"
