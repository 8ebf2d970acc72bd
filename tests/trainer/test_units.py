"""Pieces of the trainer without a service: presets, data builders, upload validation."""

from __future__ import annotations

import pytest

from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, SEED_SYSTEM_PROMPT, backward_messages
from trainer.config import PRESETS, paper_batch_size, paper_steps
from trainer.data import seed_backward_examples, seed_forward_examples
from trainer.serving import ApiError, validate_jsonl


def test_paper_schedule() -> None:
    assert (paper_batch_size(2_999), paper_batch_size(3_000)) == (8, 32)
    assert [paper_steps(n) for n in (50, 100, 1_600, 3_200, 40_000, 51_200, 90_000)] == [30, 30, 600, 500, 1_200, 1_600, 1_600]
    paper = PRESETS["paper"]
    assert (paper.learning_rate, paper.learning_rate * paper.final_lr_ratio, paper.weight_decay) == (1e-5, 9e-6, 0.1)
    assert paper.resolve_batch(3_200, None) == 32 and paper.resolve_steps(3_200, 32, None) == 500
    assert paper.resolve_steps(100, 8, 3) == 39  # n_epochs wins over the schedule


def test_data_builders_tag_seed_and_reuse_the_inference_prompt() -> None:
    pairs = [("Name a prime.", "Seven is prime.")]
    forward = seed_forward_examples(pairs)[0]
    assert forward.messages[0].content == SEED_SYSTEM_PROMPT != AUGMENTED_SYSTEM_PROMPT
    backward = seed_backward_examples(pairs)[0].prompt_completion()
    assert backward["prompt"] == backward_messages("Seven is prime.")
    assert backward["completion"] == [{"role": "assistant", "content": "Name a prime."}]


def test_validation_names_line_and_field() -> None:
    good = b'{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}\n'
    assert validate_jsonl(good + b"\n" + good) == 2
    with pytest.raises(ApiError) as err:
        validate_jsonl(good + b'{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"  "}]}\n')
    assert err.value.message == "line 2: messages.1.content: content is empty"
    with pytest.raises(ApiError, match="^line 1: messages: Field required$"):
        validate_jsonl(b'{"prompt":"a"}')
    with pytest.raises(ApiError, match="no examples"):
        validate_jsonl(b"\n\n")
