"""The seed and held-out formats users have (`humpback.data.pairs`): each read into the same `SeedPair`,
ids derived from the text, the license unknown where none is given, and every bad line one `Rejected`
naming the file, line and field while the other lines are read on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from humpback.contracts import InputError, Rejected, SeedPair, read_jsonl
from humpback.data.pairs import UNKNOWN_LICENSE, describe, import_pairs, read_user_pairs

Q, A = "How do I reverse a list in Python?", "Call its reverse() method, or take list[::-1] for a reversed copy."


def lines(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_format_gives_the_same_pair_with_a_derived_id_and_an_unknown_license(tmp_path: Path) -> None:
    path = lines(tmp_path / "mine.jsonl",
                 {"instruction": Q, "response": A},
                 {"instruction": Q, "input": "", "output": A},
                 {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q},
                               {"role": "assistant", "content": A}, {"role": "user", "content": "And a tuple?"}]},
                 {"messages": [{"role": "user", "content": [{"type": "text", "text": Q}]},
                               {"role": "assistant", "content": A}]})
    read = list(read_user_pairs(path))
    assert [line for line, _ in read] == [1, 2, 3, 4]
    pairs = [p for _, p in read]
    assert all(isinstance(p, SeedPair) for p in pairs)
    assert {(p.instruction, p.response, p.source, p.license) for p in pairs} == {(Q, A, "mine", UNKNOWN_LICENSE)}
    assert {p.id for p in pairs} == {SeedPair.make(Q, A, "x", "y").id}  # the text decides the id


def test_alpaca_input_follows_the_instruction_and_given_fields_are_kept(tmp_path: Path) -> None:
    path = lines(tmp_path / "alpaca.jsonl",
                 {"instruction": "Translate into French.", "input": "Good morning", "output": "Bonjour"},
                 {"id": "perlfaq-1", "instruction": Q, "response": A, "source": "perlfaq", "license": "Artistic"})
    alpaca, own = (p for _, p in read_user_pairs(path))
    assert alpaca.instruction == "Translate into French.\n\nGood morning" and alpaca.response == "Bonjour"
    assert (own.id, own.source, own.license) == ("perlfaq-1", "perlfaq", "Artistic")


@pytest.mark.parametrize("row, field, reason", [
    ('{"instruction": "x", "response": ', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object"),
    ({"question": Q, "answer": A}, "instruction", "missing"),
    ({"instruction": Q}, "response", "missing"),
    ({"instruction": Q, "response": "  "}, "response", "is empty"),
    ({"instruction": 3, "response": A}, "instruction", "expected a string"),
    ({"instruction": Q, "input": 5, "output": A}, "input", "expected a string"),
    ({"messages": [{"role": "assistant", "content": A}]}, "messages", "a user message, then the assistant"),
    ({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": ""}]}, "messages[1].content",
     "is empty"),
    ({"messages": "hi"}, "messages", "expected a list"),
])
def test_a_bad_line_is_rejected_naming_file_line_and_field(tmp_path: Path, row, field, reason) -> None:
    path = lines(tmp_path / "seed.jsonl", {"instruction": Q, "response": A}, "", row, {"instruction": "B?", "response": A})
    read = list(read_user_pairs(path))
    assert [line for line, _ in read] == [1, 3, 4]  # the blank line is skipped, the line after the bad one read
    bad = read[1][1]
    assert isinstance(bad, Rejected) and (bad.source, bad.line, bad.field) == (str(path), 3, field)
    assert reason in bad.reason
    assert describe(bad).startswith(f"{path} line 3") and "\n" not in describe(bad)


def test_import_writes_humpbacks_files_and_an_errors_file_and_goes_on(tmp_path: Path) -> None:
    seed = lines(tmp_path / "seed.jsonl", *({"instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(6)),
                 {"instruction": "Held out?", "response": "Yes."},  # also in the held-out set: left out
                 {"instruction": "Question 0?", "response": "Answer 0."},  # twice in the seed
                 "not json")
    heldout = lines(tmp_path / "heldout.jsonl", {"messages": [{"role": "user", "content": "Held out?"},
                                                              {"role": "assistant", "content": "Yes."}]})
    out = tmp_path / "run" / "data"
    result = import_pairs(seed, heldout, out, max_seed=4)
    assert result["pairs"] == {"seed": 4, "heldout": 1, "seed_rest": 2, "rejected": 3}
    kept, rest = read_jsonl(result["seed"], SeedPair), read_jsonl(result["seed_rest"], SeedPair)
    assert sorted(p.instruction for p in kept + rest) == [f"Question {i}?" for i in range(6)]
    assert [p.instruction for p in read_jsonl(result["heldout"], SeedPair)] == ["Held out?"]
    errors = read_jsonl(out / "errors.jsonl", Rejected)
    assert [(e.line, e.reason.split(":")[0]) for e in errors] == [
        (7, f"the same pair as {heldout} line 1"), (8, f"the same pair as {seed} line 1"), (9, "invalid JSON")]
    # max_seed draws by the id: the same pairs whatever the order of the file.
    again = import_pairs(lines(tmp_path / "reversed.jsonl", *reversed(seed.read_text().splitlines()[:6])), None,
                         tmp_path / "again", max_seed=4)
    assert {p.id for p in read_jsonl(again["seed"], SeedPair)} == {p.id for p in kept} and again["heldout"] is None


def test_a_file_without_a_pair_or_missing_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no seed pair in .*line 1, field 'instruction': missing"):
        import_pairs(lines(tmp_path / "seed.jsonl", {"q": 1}), None, tmp_path / "out", None)
    with pytest.raises(InputError, match="no such file"):
        import_pairs(tmp_path / "nope.jsonl", None, tmp_path / "out", None)
