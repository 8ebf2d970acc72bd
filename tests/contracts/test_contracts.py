"""The shared contracts: ids that must never change (resume and the held-out split depend on them),
score bands, chat examples, batch lines, the error hierarchy, and that the package stays light."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from humpback import contracts
from humpback.contracts import (
    BAND_LABELS,
    BatchResult,
    ChatExample,
    ChatRequest,
    HumpbackError,
    SeedPair,
    band_of,
    content_id,
    text_id,
)


def test_content_id_is_the_exact_json_hash_journals_were_written_with() -> None:
    # Journals written before this module existed hold ids made this way: a change here would redo work.
    blob = json.dumps(["augment", "x"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert content_id("augment", "x") == hashlib.sha256(blob.encode()).hexdigest()[:32]
    assert content_id("augment", "x") != content_id("augment", "x ")


def test_text_id_ignores_case_spacing_and_punctuation() -> None:
    # The held-out split is drawn from this id: the same pair must keep its id whatever its spacing.
    expected = hashlib.sha256("what is perl\x1fa language".encode()).hexdigest()[:16]
    assert text_id("What is Perl?", "A  language.") == expected
    assert SeedPair.make(" What is Perl? ", "A language.", "perlfaq", "GPL").id == expected


def test_bands_cover_the_scale_and_close_at_five() -> None:
    assert [band_of(s) for s in (1.0, 1.99, 2.0, 3.5, 4.49, 4.5, 5.0, None)] == [
        "[1,2)", "[1,2)", "[2,3)", "[3,4)", "[4,4.5)", "[4.5,5]", "[4.5,5]", "unparsed"]
    assert len(BAND_LABELS) == 5


def test_chat_example_names_the_broken_rule() -> None:
    ok = ChatExample.model_validate({"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]})
    assert ok.prompt_completion() == {"prompt": [{"role": "user", "content": "q"}],
                                      "completion": [{"role": "assistant", "content": "a"}]}
    with pytest.raises(ValidationError, match="expected 'assistant'"):
        ChatExample.model_validate({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]})
    with pytest.raises(ValidationError, match="content is empty"):
        ChatExample.model_validate({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": " "}]})


def test_batch_result_says_why_it_holds_no_answer() -> None:
    ok = BatchResult.model_validate({"custom_id": "a", "response": {"status_code": 200, "body": {"x": 1}}})
    assert ok.failure() is None
    assert BatchResult.model_validate({"custom_id": "a", "response": {"status_code": 500}}).failure() == "batch error: 500"
    assert BatchResult.model_validate({"custom_id": "a", "error": {"code": "x"}}).failure() == "batch error: {'code': 'x'}"


def test_every_error_is_a_humpback_error_and_keeps_its_builtin_base() -> None:
    errors = [obj for obj in vars(contracts.errors).values()
              if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == contracts.errors.__name__]
    assert len(errors) >= 10 and all(issubclass(e, HumpbackError) for e in errors)
    assert issubclass(contracts.CheckpointError, ValueError) and issubclass(contracts.ServeError, RuntimeError)
    err = contracts.CheckpointError("/ckpt", "no config.json")
    assert str(err) == "checkpoint /ckpt: no config.json" and err.problem == "no config.json"


def test_the_contracts_import_only_pydantic_and_the_standard_library() -> None:
    code = ("import sys, humpback.contracts; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'client', 'services', 'trainer', 'torch', "
            "'vllm', 'httpx', 'fastapi', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_jsonl_round_trip_and_a_line_that_does_not_fit(tmp_path) -> None:
    pairs = [SeedPair.make(f"Q{i}?", f"A{i}.", "test", "CC0") for i in range(3)]
    path = tmp_path / "seed.jsonl"
    assert contracts.write_jsonl(path, pairs) == 3
    assert contracts.read_jsonl(path, SeedPair) == pairs
    path.write_text(path.read_text() + "\n" + '{"id": "x", "instruction": "q"}\n')
    with pytest.raises(ValidationError, match="response"):
        contracts.read_jsonl(path, SeedPair)


def test_demonstrations_are_earlier_turns_picked_short_and_by_id() -> None:
    from humpback.contracts import DEMONSTRATION_MAX_CHARS, backward_messages, pick_demonstrations

    pairs = [SeedPair.make(f"Question {i}?", "word " * (20 * i), "perlfaq", "Artistic") for i in range(1, 12)]
    pairs.append(SeedPair.make("Two\nlines?", "short answer", "perlfaq", "Artistic"))
    picked = pick_demonstrations(pairs, 3)
    fit = [p for p in pairs if len(p.response) <= DEMONSTRATION_MAX_CHARS and "\n" not in p.instruction]
    assert picked == tuple(sorted(fit, key=lambda p: p.id)[:3])
    assert pick_demonstrations(reversed(pairs), 3) == picked  # the file's order does not matter
    assert len(pick_demonstrations(pairs, 50)) == len(fit) < len(pairs)
    msgs = backward_messages("the segment", picked)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == picked[0].instruction and picked[0].response in msgs[1]["content"]
    assert msgs[-1] == backward_messages("the segment")[-1] and msgs[0] == backward_messages("the segment")[0]


def test_a_chat_request_sends_only_what_is_set_and_refuses_what_no_server_takes() -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    body = ChatRequest(model="m", messages=msgs, max_tokens=8, temperature=0.7, top_p=0.9).body()
    assert body == {"model": "m", "messages": msgs, "max_tokens": 8, "temperature": 0.7, "top_p": 0.9}  # no seed
    for bad in ({"max_tokens": 0}, {"top_p": 0.0}, {"temperature": -1.0}, {"max_token": 8}):
        with pytest.raises(ValidationError):
            ChatRequest.model_validate({"model": "m", "messages": msgs, "max_tokens": 8, "temperature": 0.0, **bad})
