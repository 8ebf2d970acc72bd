"""The `humpback` subcommands this package registers: flags generated from the configs, run in-process."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ValidationError

from client import cli
from client.augment import AugmentConfig
from client.curate import CurateConfig
from client.dataset import DatasetFiles
from client.preferences import PreferenceConfig
from client.rewrite import RewriteConfig
from client.fanout import FanoutConfig
from client.journal import lock_path, output_lock
from client.prepare import PrepareConfig
from humpback.cli import main
from humpback.contracts import API_KEY_ENV, DEFAULT_URLS
from humpback.settings import flags, from_args, parser_flags
from tests.client.conftest import make_text
from tests.client.fake_server import FakeServer
from tests.subcommand import subcommand

ROOT = Path(__file__).resolve().parents[2]


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
    ("batch", "export", "curate"): (_flags(cli.ExportCurateFiles) | _flags(CurateConfig, cli.EXPORT_CURATE)
                                    | _flags(FanoutConfig)),  # a likelihood scorer's servers tokenize its terms
    ("batch", "import", "augment"): _flags(cli.ImportFiles) | _flags(AugmentConfig, cli.IMPORT_AUGMENT),
    ("batch", "import", "curate"): _flags(cli.ImportFiles) | _flags(CurateConfig, cli.IMPORT_CURATE),
    ("rewrite",): _flags(cli.RewriteFiles) | _flags(RewriteConfig) | _flags(FanoutConfig),
    ("batch", "export", "rewrite"): _flags(cli.ExportRewriteFiles) | _flags(RewriteConfig, cli.EXPORT_REWRITE),
    ("batch", "import", "rewrite"): _flags(cli.ImportFiles) | _flags(RewriteConfig, cli.IMPORT_REWRITE),
    ("export", "dpo"): _flags(cli.PreferenceFiles) | _flags(PreferenceConfig),
    ("export", "dataset"): _flags(DatasetFiles),
    ("merge",): (_flags(cli.MergeFiles) | _flags(AugmentConfig, cli.MERGE_AUGMENT) | _flags(PrepareConfig))
    - {"--shards"},  # the shards are positional
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
    ("rewrite",): {"--candidates", "--out", "--endpoint", "--model", "--shard"},
    ("batch", "export", "rewrite"): {"--candidates", "--out", "--model", "--max-tokens"},
    ("batch", "import", "rewrite"): {"--requests", "--results", "--out", "--checkpoint"},
    ("export", "dpo"): {"--scored", "--out", "--min-margin"},
    ("export", "dataset"): {"--curated", "--out", "--push-to-hub"},
    ("merge",): {"--out", "--corpus"},
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


def test_unusable_input_files_end_with_status_2_before_anything_is_sent(
        fake: FakeServer, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "c.csv").write_text("a,b\n")
    pq.write_table(pa.table({"body": ["one"]}), tmp_path / "c.parquet")
    bad = [tmp_path / n for n in ("missing.jsonl", "folder", "c.csv", "c.parquet")]
    out = tmp_path / "run" / "cands.jsonl"
    assert main(["augment", "--corpus", str(corpus), *map(str, bad), "--out", str(out), "--endpoint", fake.url,
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert [line.split(": ")[2] for line in err.splitlines()] == [str(p) for p in bad]
    assert "no such file" in err and "a directory" in err and "unknown corpus format" in err and "--text-field" in err
    assert main(["batch", "export", "augment", "--corpus", str(corpus), str(bad[1]), "--out", str(out),
                 "--model", "m"]) == 2
    for candidates in bad[:2]:
        assert main(["curate", "--candidates", str(candidates), "--out", str(out), "--endpoint", fake.url,
                     "--no-progress"]) == 2
    assert f"{bad[1]}: a directory" in capsys.readouterr().err
    assert sum(fake.requests.values()) == 0 and not (tmp_path / "run").exists()


def test_batch_import_checks_its_files_first(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    req, res, out = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "run" / "cands.jsonl"
    assert main(["batch", "export", "augment", "--corpus", str(corpus), "--out", str(req), "--model", "m"]) == 0
    res.write_text("")
    (tmp_path / "req.meta.jsonl").unlink()
    assert main(["batch", "import", "augment", "--requests", str(req), "--results", str(res), "--out", str(out)]) == 2
    assert f"{tmp_path / 'req.meta.jsonl'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["augment", "curate", "import augment", "import curate"])
def test_an_output_another_run_holds_is_refused(command: str, fake: FakeServer, corpus: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    req, res = tmp_path / "req.jsonl", tmp_path / "res.jsonl"
    main(["batch", "export", "augment", "--corpus", str(corpus), "--out", str(req), "--model", "m"])
    res.write_text("")
    out, scored = tmp_path / "out.jsonl", tmp_path / "out.scored.jsonl"
    argv = {"augment": ["augment", "--corpus", str(corpus), "--endpoint", fake.url, "--no-progress"],
            "curate": ["curate", "--candidates", str(corpus), "--endpoint", fake.url, "--no-progress"],
            "import augment": ["batch", "import", "augment", "--requests", str(req), "--results", str(res)],
            "import curate": ["batch", "import", "curate", "--requests", str(req), "--results", str(res)]}[command]
    held = scored if command.endswith("curate") else out  # curate appends to its scored journal: that is locked too
    with output_lock(held):
        assert main([*argv, "--out", str(out)]) == 2
    assert f"{held} is in use: the run with pid {os.getpid()} is writing it" in capsys.readouterr().err
    assert sum(fake.requests.values()) == 0 and not out.exists() and not scored.exists()


def test_two_augment_runs_on_one_out_never_write_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeServer(delay=0.05).start()
    try:
        corpus, out = tmp_path / "corpus.jsonl", tmp_path / "cands.jsonl"
        n = 60
        corpus.write_text("".join(json.dumps({"text": make_text(i)}) + "\n" for i in range(n)))
        argv = ["augment", "--corpus", str(corpus), "--out", str(out), "--endpoint", fake.url, "--no-progress",
                "--concurrency", "2", "--fsync", "never"]
        first = subprocess.Popen([sys.executable, "-m", "humpback", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not out.exists() or len(out.read_bytes().splitlines()) < 2:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert main(argv) == 2  # refused at once while the first runs
        assert f"the run with pid {first.pid} is writing it" in capsys.readouterr().err
        assert first.poll() is None
        os.kill(first.pid, signal.SIGKILL)  # the kernel drops its lock; the lock file stays behind
        first.wait()
        assert lock_path(out).read_text() == f"{first.pid}\n"
        assert main(argv) == 0
        ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
        assert len(ids) == n == len(set(ids)) and not lock_path(out).exists()
    finally:
        fake.stop()


def test_demonstrations_that_cannot_be_used_end_with_status_2_and_batch_export_shows_them(
        fake: FakeServer, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run" / "cands.jsonl"
    base = ["augment", "--corpus", str(corpus), "--out", str(out), "--endpoint", fake.url, "--no-progress"]
    assert main([*base, "--shots", "2"]) == 2
    assert "--shots 2 needs --demonstrations FILE" in capsys.readouterr().err
    demos = tmp_path / "seed.jsonl"
    demos.write_text(json.dumps({"instruction": "Why?", "response": "Because."}) + "\n" + '{"instruction": "No answer"}\n')
    assert main([*base, "--shots", "2", "--demonstrations", str(demos)]) == 2
    assert f"{demos} line 2: not a pair with non-empty strings 'instruction' and 'response'" in capsys.readouterr().err
    assert sum(fake.requests.values()) == 0 and not (tmp_path / "run").exists()
    demos.write_text("".join(json.dumps({"instruction": f"Why {i}?", "response": f"Because {i}."}) + "\n"
                             for i in range(3)))
    req = tmp_path / "req.jsonl"
    assert main(["batch", "export", "augment", "--corpus", str(corpus), "--out", str(req), "--model", "m",
                 "--shots", "2", "--demonstrations", str(demos)]) == 0
    bodies = [json.loads(line)["body"] for line in req.read_text().splitlines()]
    assert {len(b["messages"]) for b in bodies} == {6}  # system, two demonstrations, the segment
    assert len({json.dumps(b["messages"][:5]) for b in bodies}) == 1


def test_rewrite_then_curate_then_export_dpo_from_the_command_line(fake: FakeServer, tmp_path: Path) -> None:
    """The back-and-forth path as a user runs it: rewrite the candidates, score originals and rewrites,
    and pair each instruction's best and worst response."""
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"instruction": f"What is topic {i}?", "output": make_text(i, 700)}) + "\n"
                             for i in range(6)))
    rewritten = tmp_path / "rewritten.jsonl"
    assert main(["rewrite", "--candidates", str(cands), "--out", str(rewritten), "--endpoint", fake.url,
                 "--no-progress"]) == 0
    assert len(rewritten.read_text().splitlines()) == 6
    for name, src in (("orig", cands), ("rew", rewritten)):
        assert main(["curate", "--candidates", str(src), "--out", str(tmp_path / f"{name}.jsonl"), "--endpoint",
                     fake.url, "--no-progress", "--no-histogram", "--no-decontaminate"]) == 0
    out = tmp_path / "dpo.jsonl"
    assert main(["export", "dpo", "--scored", str(tmp_path / "orig.scored.jsonl"), str(tmp_path / "rew.scored.jsonl"),
                 "--out", str(out), "--min-margin", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "dpo.summary.json").read_text())
    # The fake scores by prompt length, so some responses tie and make no pair; every other is one.
    assert len(rows) == summary["results"]["pairs"] and summary["results"]["instructions"] == 6
    assert len(rows) + summary["results"]["tied"] == 6 and rows
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
