"""One error path (issue 17): every command of `humpback` given an input file that is not there ends
with one line on stderr and exit status 2, never a traceback; a malformed `--config` of `run` too; a
server that cannot be reached is exit status 4; and the exit statuses of docs/contracts.md are the
`exit_code`s of the error classes. No server: the commands stop before they would send anything."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from humpback.cli import build_parser, commands, main
from humpback.contracts import errors

REPO = Path(__file__).resolve().parent.parent
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there on loopback
FAST = ["--max-retries", "0", "--connect-timeout", "1"]  # a closed port is refused at once, not retried

# Each command's words -> its arguments: {missing} is an input file that is not there, {tmp} a folder.
MISSING_INPUT: dict[tuple[str, ...], list[str]] = {
    ("augment",): ["--corpus", "{missing}", "--out", "{tmp}/o.jsonl", "--endpoint", CLOSED, "--no-progress"],
    ("curate",): ["--candidates", "{missing}", "--out", "{tmp}/o.jsonl", "--endpoint", CLOSED, "--no-progress"],
    ("rewrite",): ["--candidates", "{missing}", "--out", "{tmp}/o.jsonl", "--endpoint", CLOSED, "--no-progress"],
    ("batch", "export", "augment"): ["--corpus", "{missing}", "--out", "{tmp}/r.jsonl", "--model", "m"],
    ("batch", "export", "curate"): ["--corpus", "{missing}", "--out", "{tmp}/r.jsonl", "--model", "m",
                                    "--endpoint", CLOSED],
    ("batch", "export", "rewrite"): ["--candidates", "{missing}", "--out", "{tmp}/r.jsonl", "--model", "m"],
    ("batch", "import", "augment"): ["--requests", "{missing}", "--results", "{missing}", "--out", "{tmp}/o.jsonl"],
    ("batch", "import", "curate"): ["--requests", "{missing}", "--results", "{missing}", "--out", "{tmp}/o.jsonl"],
    ("batch", "import", "rewrite"): ["--requests", "{missing}", "--results", "{missing}", "--out", "{tmp}/o.jsonl"],
    ("merge",): ["{missing}", "--out", "{tmp}/m.jsonl"],
    ("export", "dpo"): ["--scored", "{missing}", "--out", "{tmp}/dpo.jsonl"],
    ("export", "dataset"): ["--curated", "{missing}", "--out", "{tmp}/dataset"],
    ("data", "demo"): ["--root", "{missing}", "--out", "{tmp}/demo"],
    ("data", "oasst1"): ["--input", "{missing}", "--out", "{tmp}/oasst1"],
    ("eval", "ifeval"): ["--responses", "{missing}", "--out", "{tmp}/ifeval"],
    ("eval", "pairwise"): ["--answers", "{missing}", "--out", "{tmp}/pairwise", "--endpoint", CLOSED,
                           "--judge-endpoint", CLOSED],
    ("eval", "nll"): ["{missing}", "--out", "{tmp}/nll", "--endpoint", CLOSED],
    ("eval", "backward"): ["--pairs", "{missing}", "--out", "{tmp}/backward.json", "--endpoint", CLOSED],
    ("eval", "scorer"): ["--pairs", "{missing}", "--out", "{tmp}/scorer.json", "--endpoint", CLOSED],
    ("eval", "calibrate"): ["--pairs", "{missing}", "--out", "{tmp}/combiner.json", "--endpoint", CLOSED],
    ("run",): ["--check", "--config", "{missing}"],
    ("report",): ["{missing}"],
    ("settings",): ["--write", "{missing}"],
}

# Commands that read no input file of the user's, and why.
NO_INPUT_FILE = {
    ("serve", "up"): "starts vLLM servers (minutes); a model is a folder or a cached hub id, found by vLLM",
    ("serve", "down"): "reads only the state folder of running servers: none there is nothing to stop (exit 0)",
    ("serve", "status"): "reads only the state folder of running servers: none there is exit 4, nothing runs",
    ("serve", "swap"): "needs running servers before it reads its checkpoint folder; tests/services/test_serve.py "
                       "shows a refused folder is exit 2",
    ("models", "prepare"): "reads installed packages, no path of the user's (tests/services/test_prepare.py)",
    ("trainer", "serve"): "serves; it reads no file at start",
}


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("humpback: error: ") and "Traceback" not in err, err
    return lines[0]


def test_every_command_is_listed() -> None:
    """A new command fails here until it is given a missing-input case, or a reason it reads no file."""
    assert set(commands(build_parser())) == set(MISSING_INPUT) | set(NO_INPUT_FILE)


@pytest.mark.parametrize("words", sorted(MISSING_INPUT), ids=" ".join)
def test_a_missing_input_file_is_one_line_and_exit_2(words: tuple[str, ...], tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.jsonl"
    argv = [*words, *(a.format(missing=missing, tmp=tmp_path) for a in MISSING_INPUT[words])]
    assert main(argv) == 2
    assert "missing" in _one_error_line(capsys.readouterr().err)


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    """The real entry point (as a user runs it), and `--debug` before or after the command."""
    argv = [sys.executable, "-m", "humpback", "eval", "pairwise", "--answers", str(tmp_path / "missing.jsonl"),
            "--out", str(tmp_path / "p"), "--judge-endpoint", CLOSED]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert _one_error_line(done.stderr) == f"humpback: error: {tmp_path / 'missing.jsonl'}: no such file; check the path"
    for debug in ([*argv[:3], "--debug", *argv[3:]], [*argv, "--debug"]):
        shown = subprocess.run(debug, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert shown.returncode == 1 and "Traceback" in shown.stderr and "FileNotFoundError" in shown.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("data:\n  seed: [\n", "line 3: invalid YAML"),
    ("curate:\n  min_scor: 3\n", "curate.min_scor: Extra inputs are not permitted"),
    ("iterations: many\n", "iterations: Input should be a valid integer"),
], ids=["syntax", "unknown key", "wrong type"])
def test_a_malformed_run_config_is_one_line_naming_file_and_key(text: str, expected: str, tmp_path: Path,
                                                                 capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["run", "--check", "--config", str(config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(config) in line and expected in line


@pytest.mark.parametrize("command", ["curate", "rewrite"])
def test_a_server_that_cannot_be_reached_is_one_line_and_exit_4(command: str, tmp_path: Path, capsys) -> None:
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text('{"instruction": "What is a shell?", "output": "A program that runs commands."}\n')
    assert main([command, "--candidates", str(candidates), "--out", str(tmp_path / "out.jsonl"), "--endpoint",
                 CLOSED, "--no-progress", *FAST]) == 4
    line = _one_error_line(capsys.readouterr().err)
    assert f"GET /v1/models failed on every endpoint: {CLOSED}" in line and "humpback serve up" in line


def test_the_exit_status_table_is_the_hierarchy() -> None:
    """Each class named in docs/contracts.md's table exits with its row's status, and every class of
    `humpback.contracts.errors` is named there."""
    text = (REPO / "docs" / "contracts.md").read_text(encoding="utf-8")
    table = text[text.index("## Exit statuses"):text.index("## Settings")]
    named: dict[str, int] = {}
    for status, cells in re.findall(r"^\| (\d) \|(.*)$", table, flags=re.M):
        named.update({name: int(status) for name in re.findall(r"`(\w+)`", cells.rsplit("|", 2)[-2])})
    classes = {name: cls for name, cls in vars(errors).items()
               if inspect.isclass(cls) and issubclass(cls, errors.HumpbackError)}
    assert set(classes) <= set(named)
    assert {name: classes[name].exit_code for name in classes} == {name: named[name] for name in classes}


def test_the_evaluation_readers_name_file_line_and_field(tmp_path: Path) -> None:
    from humpback.evaluation.common import read_answers
    from humpback.evaluation.ifeval import read_responses
    from humpback.evaluation.nll import read_seed

    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    listed = tmp_path / "answers.json"
    listed.write_text('[{"instruction": "a", "output": 3}]')
    responses = tmp_path / "responses.jsonl"
    responses.write_text('\n{"prompt": "p", "response": "r"}\n{"prompt": "p"\n')
    seed = tmp_path / "seed.jsonl"
    seed.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for read, path, line, field in ((read_answers, answers, 2, "output"), (read_answers, listed, 1, "output"),
                                    (read_responses, responses, 3, None), (lambda p: list(read_seed(p)), seed, 1, None)):
        with pytest.raises(errors.RecordError) as raised:
            read(path)
        assert (raised.value.path, raised.value.line, raised.value.field) == (path, line, field)
        assert raised.value.exit_code == 2 and len(str(raised.value).splitlines()) == 1
    assert str(errors.RecordError(listed, 1, "not an answer", field="output", where="item")) == \
        f"{listed} item 1: output: not an answer"
