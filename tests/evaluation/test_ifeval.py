"""IFEval scoring through the official checkers (offline), and the accuracy aggregation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client.fanout import FanoutConfig
from humpback.evaluation import ifeval
from humpback.evaluation.records import IFEvalPrompt, IFEvalRow
from tests.evaluation.fake_eval_server import EvalFake

# instruction id -> (kwargs, a response that follows it, one that violates it, even loosely)
CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "change_case:capital_word_frequency": ({"capital_frequency": 3, "capital_relation": "at least"},
                                           "THIS IS VERY important.", "This is Fine."),
    "change_case:english_capital": ({}, "THIS IS AN ENGLISH SENTENCE WRITTEN IN CAPITAL LETTERS ONLY.",
                                    "This is an English sentence written in mixed case."),
    "change_case:english_lowercase": ({}, "this is an english sentence written in lowercase letters only.",
                                      "This Is An English Sentence Written In Title Case."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a poem about cats."},
                                  "Write a poem about cats. Cats are soft.", "Cats are soft."),
    "combination:two_responses": ({}, "Answer one.\n******\nAnswer two.", "Only one answer."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name], meet me at [address].",
                                               "Dear [name], hello."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello.\n\nP.S. See you soon.",
                                      "Hello. See you soon."),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Maybe, who knows."),
    "detectable_format:json_format": ({}, '```json\n{"a": 1}\n```', "a: 1"),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            "Intro\nSection 1\nfoo\nSection 2\nbar", "Section 1\nfoo"),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one"),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*first* and *second*",
                                                      "*first* only"),
    "detectable_format:title": ({}, "<<My Title>>\nText.", "My Title\nText."),
    "keywords:existence": ({"keywords": ["apple", "banana"]}, "I like apple and banana.", "I like apple."),
    "keywords:forbidden_words": ({"forbidden_words": ["apple"]}, "I like pears.", "I like apple."),
    "keywords:frequency": ({"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat and cat", "one cat"),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zoo zebra",
                                  "zoo"),
    "language:response_language": ({"language": "de"},
                                   "Das ist ein einfacher deutscher Satz über das Wetter heute in Berlin.",
                                   "This is a simple English sentence about the weather today in Berlin."),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "second"},
                                                    "First paragraph.\n\nSecond paragraph.",
                                                    "First paragraph.\n\nThird paragraph."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "One.\n***\nTwo.", "One.\n\nTwo."),
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "less than"},
                                            "One sentence. Two sentences.", "One. Two. Three. Four."),
    "length_constraints:number_words": ({"num_words": 5, "relation": "less than"}, "Just three words",
                                        "This has many more than five words in it."),
    "punctuation:no_comma": ({}, "No commas here.", "Yes, commas."),
    "startend:end_checker": ({"end_phrase": "Is there anything else I can help with?"},
                             "Done. Is there anything else I can help with?", "Done."),
    "startend:quotation": ({}, '"Quoted."', "Not quoted."),
}


def _prompt(iid: str, kwargs: dict[str, Any]) -> IFEvalPrompt:
    return IFEvalPrompt(key=1, prompt="A prompt.", instruction_id_list=[iid], kwargs=[kwargs])


def test_cases_cover_every_instruction_of_the_541_prompts() -> None:
    prompts = ifeval.load_prompts()
    assert len(prompts) == 541
    assert sorted(CASES) == sorted({i for p in prompts for i in p.instruction_id_list})


@pytest.mark.parametrize("iid", sorted(CASES))
def test_each_instruction_kind_passes_and_fails(iid: str) -> None:
    kwargs, good, bad = CASES[iid]
    assert ifeval.score(_prompt(iid, kwargs), good) == ([True], [True])
    assert ifeval.score(_prompt(iid, kwargs), bad) == ([False], [False])


@pytest.mark.parametrize(("iid", "kwargs", "response"), [
    ("startend:quotation", {}, 'Here you go:\n"Quoted."'),  # passes once the first line is dropped
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* an extra last line"),
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas here."),
    ("startend:end_checker", {"end_phrase": "Bye."}, "Done. **Bye.**"),  # passes once asterisks go
])
def test_loose_only_variants(iid: str, kwargs: dict[str, Any], response: str) -> None:
    assert ifeval.score(_prompt(iid, kwargs), response) == ([False], [True])


def test_empty_response_fails_everything() -> None:
    assert ifeval.score(_prompt("punctuation:no_comma", {}), "   ") == ([False], [False])


def test_multi_instruction_prompt_from_the_data() -> None:
    p = next(p for p in ifeval.load_prompts() if p.key == 1000)  # no comma, 3 highlights, >= 300 words
    body = " ".join(["word"] * 300)
    strict, loose = ifeval.score(p, f"*one* *two* *three* {body}")
    assert strict == loose == [True, True, True]
    assert ifeval.score(p, f"*one*, {body}") == ([False, False, True], [False, False, True])


def test_sentence_splitting_needs_no_download() -> None:
    util = __import__(f"{ifeval._PACKAGE}.instructions_util", fromlist=["x"])
    ifeval.checkers()
    assert util.count_sentences("One. Two! Three?") == 3
    assert util.nltk.word_tokenize("HELLO WORLD. Fine.") == ["HELLO", "WORLD", ".", "Fine", "."]


def _row(ids: list[str], strict: list[bool], loose: list[bool]) -> IFEvalRow:
    return IFEvalRow(key=0, prompt="p", instruction_id_list=ids, response="r", strict=strict, loose=loose)


def test_accuracy_aggregation() -> None:
    rows = [_row(["a", "b"], [True, True], [True, True]),
            _row(["a", "c"], [True, False], [True, True]),
            _row(["b"], [False], [False])]
    prompt, instruction, per = ifeval.accuracy(rows)
    assert (prompt.n, prompt.strict, prompt.loose) == (3, 1 / 3, 2 / 3)
    assert (instruction.n, instruction.strict, instruction.loose) == (5, 3 / 5, 4 / 5)
    assert {k: (v.n, v.strict, v.loose) for k, v in per.items()} == {
        "a": (2, 1.0, 1.0), "b": (2, 0.5, 0.5), "c": (1, 0.0, 1.0)}


def test_accuracy_of_nothing_is_zero() -> None:
    prompt, instruction, per = ifeval.accuracy([])
    assert (prompt.n, prompt.strict, instruction.n, per) == (0, 0.0, 0, {})


def test_cli_scores_a_responses_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from humpback.cli import main

    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"prompt": p.prompt, "response": "yes, my answer is fine"}) + "\n"
                                 for p in ifeval.load_prompts()))
    assert main(["eval", "ifeval", "--responses", str(responses), "--out", str(tmp_path / "out"),
                 "--limit", "5"]) == 0
    assert "prompt-level" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "ifeval.summary.json").read_text())
    assert summary["prompt_level"]["n"] == 5 and summary["model"] == "responses"
    assert len((tmp_path / "out" / "ifeval.rows.jsonl").read_text().splitlines()) == 5


async def test_answers_already_journaled_are_not_asked_again(tmp_path: Path) -> None:
    """A run whose journal holds two of the four answers (the third line torn by a kill) asks only
    for the other two, and writes the rows of a clean run."""
    server = EvalFake(answer="My answer is yes.").start()
    try:
        fan = FanoutConfig(endpoints=[server.url], max_retries=0)
        clean = await ifeval.run_ifeval(tmp_path / "clean", fan, limit=4, seed=3)
        assert server.requests["/v1/chat/completions"] == 4
        journal = (tmp_path / "clean" / "ifeval.answers.journal.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "ifeval.answers.journal.jsonl").write_text("".join(journal[:2]) + journal[2][:30])
        resumed = await ifeval.run_ifeval(tmp_path / "out", fan, limit=4, seed=3)
        assert server.requests["/v1/chat/completions"] == 4 + 2
    finally:
        server.stop()
    rows = (tmp_path / "out" / "ifeval.rows.jsonl").read_text()
    assert rows == (tmp_path / "clean" / "ifeval.rows.jsonl").read_text()
    assert [IFEvalRow.model_validate_json(r).response for r in rows.splitlines()] == ["My answer is yes."] * 4
    assert resumed.model_copy(update={"elapsed_s": 0}) == clean.model_copy(update={"elapsed_s": 0})
