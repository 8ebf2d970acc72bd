"""Pieces of the trainer without a service: presets, data builders, upload validation, wire bounds."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydantic import ValidationError

from humpback.contracts import (
    AUGMENTED_SYSTEM_PROMPT,
    SEED_SYSTEM_PROMPT,
    ApiError,
    CreateJobRequest,
    Hyperparameters,
    SeedPair,
    backward_messages,
    seed_backward_examples,
    seed_forward_examples,
)
from trainer import serving
from trainer.config import PRESETS, paper_batch_size, paper_steps
from trainer.serving import validate_jsonl
from trainer.train import TrainSpec


def test_paper_schedule() -> None:
    assert (paper_batch_size(2_999), paper_batch_size(3_000)) == (8, 32)
    assert [paper_steps(n) for n in (50, 100, 1_600, 3_200, 40_000, 51_200, 90_000)] == [30, 30, 600, 500, 1_200, 1_600, 1_600]
    paper = PRESETS["paper"]
    assert (paper.learning_rate, paper.learning_rate * paper.final_lr_ratio, paper.weight_decay) == (1e-5, 9e-6, 0.1)
    assert paper.resolve_batch(3_200, None) == 32 and paper.resolve_steps(3_200, 32, None) == 500
    assert paper.resolve_steps(100, 8, 3) == 39  # n_epochs wins over the schedule


def test_train_spec_is_a_resolved_preset(tmp_path: Path) -> None:
    run = dict(base_model=tmp_path / "m", training_file=tmp_path / "t.jsonl", output_dir=tmp_path / "o",
               export_dir=tmp_path / "e", seed=3)
    spec = TrainSpec(**PRESETS["cpu-demo"].model_dump(), **run)
    assert (spec.learning_rate, spec.batch_size, spec.max_steps, spec.max_length) == (2e-4, 8, 30, 512)
    assert TrainSpec.model_validate_json(spec.model_dump_json()) == spec  # the file the training process reads
    with pytest.raises(ValidationError, match="batch_size|max_steps"):  # the worker decides them, never the run
        TrainSpec(**PRESETS["paper-lora"].model_dump(), **run)


def test_data_builders_tag_seed_and_reuse_the_inference_prompt() -> None:
    pairs = [SeedPair.make("Name a prime.", "Seven is prime.", "test", "CC0")]
    forward = seed_forward_examples(pairs)[0]
    assert forward.messages[0].content == SEED_SYSTEM_PROMPT != AUGMENTED_SYSTEM_PROMPT
    backward = seed_backward_examples(pairs)[0].prompt_completion()
    assert backward["prompt"] == backward_messages("Seven is prime.")
    assert backward["completion"] == [{"role": "assistant", "content": "Name a prime."}]


GOOD = b'{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}\n'


def _validate(data: bytes) -> int:
    return validate_jsonl(io.BytesIO(data))


def test_validation_names_line_and_field() -> None:
    assert _validate(GOOD + b"\n" + GOOD.replace(b"\n", b"\r\n") + GOOD.rstrip()) == 3
    with pytest.raises(ApiError) as err:
        _validate(GOOD + b'{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"  "}]}\n')
    assert err.value.message == "line 2: messages.1.content: content is empty"
    with pytest.raises(ApiError, match="^line 1: messages: Field required$"):
        _validate(b'{"prompt":"a"}')
    with pytest.raises(ApiError, match="^line 2: not UTF-8 \\(byte 44 of the line\\)$"):
        _validate(GOOD + GOOD[:44] + b"\xff" + GOOD[45:])
    with pytest.raises(ApiError, match="no examples"):
        _validate(b"\n\n")


def test_validation_reads_a_line_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long line is refused unread, and the report stays short however many lines are bad."""
    monkeypatch.setattr(serving, "MAX_LINE_BYTES", 200)
    long_line = b'{"messages":"' + b"x" * 500 + b'"}\n'
    with pytest.raises(ApiError, match="^line 2: the line is longer than 200 bytes$"):
        _validate(GOOD + long_line + GOOD)
    with pytest.raises(ApiError) as err:
        _validate(GOOD + b"{}\n" * 10_000)
    assert err.value.message.count("line ") == serving.MAX_REPORTED_ERRORS
    assert err.value.message.endswith("; and 9995 more invalid lines")


def test_request_numbers_are_bounded_and_job_numbers_finite() -> None:
    """A request holds OpenAI's ranges; a job reports what it resolved (n_epochs may pass 50 when
    `metadata.max_steps` sets the schedule), but never a number that is not finite or not positive."""
    with pytest.raises(ValidationError):
        CreateJobRequest(model="m", training_file="f", hyperparameters={"n_epochs": 51})
    assert Hyperparameters(n_epochs=400, batch_size=2, learning_rate_multiplier=1.0).n_epochs == 400
    for bad in ({"learning_rate_multiplier": float("nan")}, {"batch_size": 0}, {"n_epochs": True}):
        with pytest.raises(ValidationError):
            Hyperparameters.model_validate(bad)
