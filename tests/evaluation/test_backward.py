"""`eval backward` on known answers: a fake backward model that copies the human instruction against
one that writes the same meta-answer for every response, and the NLL of known log-probabilities."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.augment import AugmentConfig, AugmentTask
from client.fanout import FanoutConfig
from humpback.cli import main
from humpback.contracts import Segment, Source, backward_messages
from humpback.evaluation import backward
from humpback.evaluation.cli import AUGMENT_UNUSED, Server, StageRun
from humpback.evaluation.common import subset
from humpback.evaluation.records import BackwardRow
from humpback.settings import flags, parser_flags
from tests.evaluation.fake_eval_server import logprob, render
from tests.evaluation.fake_stage_server import StageFake
from tests.evaluation.pairs import write_pairs
from tests.subcommand import subcommand

PAIRS = [
    ("How do I list the files in a directory with Perl?",
     "Use opendir and readdir: open the directory, read its entries in a loop, and close it when done."),
    ("What is the difference between a list and an array in Perl?",
     "An array is a variable that holds a list; a list is a sequence of values that exists only as a value."),
    ("Why does my floating-point sum print 0.30000000000000004?",
     "Computers keep floating-point numbers in binary, where 0.1 has no exact representation, so sums drift."),
    ("How can I install a Debian package from a .deb file?",
     "Run dpkg -i with the file name as root, then apt-get -f install to fetch any missing dependencies."),
    ("Explain what a Python virtual environment is for.",
     "It keeps the packages of one project apart from the system's and from other projects' packages."),
    ("Write a shell command that counts the lines of every file in the current folder.",
     "wc -l * prints the number of lines of each file in the folder and a total on the last line."),
]
META = "This response is designed to provide an answer to the instruction."


def _copy(prompt: str) -> str:
    return next(x for x, y in PAIRS if y in prompt)


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "heldout.jsonl", PAIRS)


@pytest.fixture
def copier() -> Iterator[StageFake]:
    s = StageFake(write=_copy).start()
    yield s
    s.stop()


@pytest.fixture
def constant() -> Iterator[StageFake]:
    s = StageFake(write=lambda prompt: META).start()
    yield s
    s.stop()


def _fan(server: StageFake) -> FanoutConfig:
    return FanoutConfig(endpoints=[server.url], max_retries=0)


def _nll(instruction: str) -> tuple[float, int]:
    """Summed NLL and token count of the instruction as the assistant turn (EvalFake's tokens)."""
    tokens = instruction + "<end>"
    return sum(-logprob(ord(c)) for c in tokens), len(tokens)


def _rows(path: Path) -> list[BackwardRow]:
    return [BackwardRow.model_validate_json(line) for line in path.read_text().splitlines()]


async def test_a_copying_model_beats_a_constant_one(pairs: Path, copier: StageFake, constant: StageFake,
                                                     tmp_path: Path) -> None:
    good = await backward.run_backward_eval(pairs, tmp_path / "good.json", _fan(copier))
    bad = await backward.run_backward_eval(pairs, tmp_path / "bad.json", _fan(constant))
    assert list(good) == ["instruction_nll", "rouge_l", "usable_rate", "distinct_2"]
    n = len(PAIRS)
    assert good["rouge_l"].model_dump() == {"value": 1.0, "ci95": (1.0, 1.0), "n": n}
    assert good["usable_rate"].value == 1.0
    assert bad["usable_rate"].value == 0.0
    assert bad["rouge_l"].value is not None and bad["rouge_l"].value < 0.3
    assert bad["distinct_2"].value == pytest.approx(1 / n)  # one text repeated n times
    assert good["distinct_2"].value is not None and good["distinct_2"].value > 0.8
    # The NLL reads the human instruction under the backward prompt, whatever the model writes.
    sums, tokens = zip(*(_nll(x) for x, _ in PAIRS))
    assert good["instruction_nll"].value == pytest.approx(sum(sums) / sum(tokens))
    assert good["instruction_nll"] == bad["instruction_nll"]
    assert good["instruction_nll"].n == n
    rows = _rows(tmp_path / "bad.rows.jsonl")
    assert [r.line for r in rows] == list(range(1, n + 1))
    assert {r.issue for r in rows} == {"meta"} and {r.generated for r in rows} == {META}
    assert [r.nll_sum for r in rows] == pytest.approx(list(sums))


async def test_requests_are_augments_and_a_rerun_resumes(pairs: Path, copier: StageFake, tmp_path: Path) -> None:
    copier.keep_bodies = True
    gen = AugmentConfig(max_tokens=32)
    first = await backward.run_backward_eval(pairs, tmp_path / "b.json", _fan(copier), generation=gen, seed=3)
    # Exactly augment's request, with no per-request seed (CPU servers refuse one).
    task = AugmentTask("fake", None, gen)
    expected = [task.request(Segment(text=y, source=Source(path="p", line=1))).body for _, y in PAIRS]
    assert sorted(copier.bodies, key=json.dumps) == sorted(expected, key=json.dumps)
    assert {(b["temperature"], b["top_p"], b.get("seed")) for b in copier.bodies} == {(0.7, 0.9, None)}
    asked = copier.requests["/v1/chat/completions"]
    again = await backward.run_backward_eval(pairs, tmp_path / "b.json", _fan(copier), generation=gen, seed=3)
    assert copier.requests["/v1/chat/completions"] == asked  # every instruction came from the journal
    assert again == first
    assert (tmp_path / "b.generations.journal.jsonl").is_file()


async def test_a_truncated_instruction_is_unusable(pairs: Path, copier: StageFake, tmp_path: Path) -> None:
    copier.script.append("length")
    m = await backward.run_backward_eval(pairs, tmp_path / "b.json", _fan(copier))
    rows = _rows(tmp_path / "b.rows.jsonl")
    cut = [r for r in rows if r.finish_reason == "length"]
    assert len(cut) == 1 and cut[0].issue == "truncated"
    assert m["usable_rate"].value == pytest.approx((len(PAIRS) - 1) / len(PAIRS))


async def test_an_instruction_too_long_for_the_context_is_left_out_of_the_nll(pairs: Path, tmp_path: Path) -> None:
    lengths = sorted(len(render([*backward_messages(y), {"role": "assistant", "content": x}], False))
                     for x, y in PAIRS)
    server = StageFake(write=_copy)
    server.max_model_len = lengths[len(lengths) // 2]  # the longer half does not fit
    server.start()
    try:
        m = await backward.run_backward_eval(pairs, tmp_path / "b.json", _fan(server))
    finally:
        server.stop()
    rows = _rows(tmp_path / "b.rows.jsonl")
    kept = [r for r in rows if r.skipped is None]
    assert 0 < len(kept) < len(rows) and all(r.nll_sum is None for r in rows if r.skipped)
    assert m["instruction_nll"].n == len(kept) and m["rouge_l"].n == len(rows)


def test_every_field_has_a_flag() -> None:
    assert parser_flags(subcommand("eval", "backward")) == (
        set(flags(Server)) | set(flags(StageRun)) | set(flags(AugmentConfig, exclude=AUGMENT_UNUSED)))
    assert set(flags(AugmentConfig, exclude=AUGMENT_UNUSED)) == {"--max-tokens", "--temperature", "--top-p", "--shots",
                                                                 "--demonstrations"}


def test_the_command_writes_the_metrics_and_prints_them(pairs: Path, copier: StageFake, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r" / "backward.json"
    assert main(["eval", "backward", "--endpoint", copier.url, "--pairs", str(pairs), "--out", str(out),
                 "--limit", "3", "--seed", "5", "--temperature", "0"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"instruction_nll", "rouge_l", "usable_rate", "distinct_2"}
    assert data["rouge_l"] == {"value": 1.0, "ci95": [1.0, 1.0], "n": 3}
    assert [r.line for r in _rows(tmp_path / "r" / "backward.rows.jsonl")] == [i + 1 for i in subset(6, 3, 5)]
    printed = capsys.readouterr().out
    assert "rouge_l" in printed and "1.0000" in printed


async def test_demonstrations_precede_each_response_and_count_in_the_nll(pairs: Path, copier: StageFake,
                                                                          tmp_path: Path) -> None:
    """With `shots`, each request (and the conversation the NLL reads) holds the demonstrations as
    earlier turns; the demonstrations come from their own file, never from the measured pairs."""
    demos = tmp_path / "seed.jsonl"
    demos.write_text("".join(json.dumps({"instruction": f"Question {i}?", "response": f"Answer number {i}."}) + "\n"
                             for i in range(5)))
    copier.keep_bodies = True
    gen = AugmentConfig(max_tokens=32, shots=2, demonstrations=demos)
    m = await backward.run_backward_eval(pairs, tmp_path / "b.json", _fan(copier), generation=gen)
    assert m["rouge_l"].value == 1.0  # the copier still finds its response in the last turn
    shown = {tuple(msg["content"] for msg in b["messages"][1:-1]) for b in copier.bodies}
    assert len(shown) == 1  # one shared prefix for every request
    (turns,) = shown
    assert len(turns) == 4 and all(t.startswith("Question ") for t in turns[1::2])
    # The NLL reads the same instruction tokens after the longer prompt (the fake's log-probabilities
    # depend on the token alone, so the value is the zero-shot one), and every pair is measured.
    zero = await backward.run_backward_eval(pairs, tmp_path / "z.json", _fan(copier))
    assert m["instruction_nll"] == zero["instruction_nll"] and m["instruction_nll"].n == len(PAIRS)
