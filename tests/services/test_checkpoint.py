"""Checkpoint validation on real model folders: what a swap refuses before touching a server."""

from __future__ import annotations

import pytest

from humpback.contracts import CheckpointError
from services.checkpoint import validate_adapter, validate_checkpoint
from tests.services.helpers import copy_small_files, edit_config, linked_checkpoint


def test_valid_copy_passes(model_dir, tmp_path):
    validate_checkpoint(linked_checkpoint(model_dir, tmp_path / "ok"), model_dir)


def test_missing_folder(model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        validate_checkpoint(tmp_path / "nope", model_dir)


def test_missing_weights(model_dir, tmp_path):
    folder = copy_small_files(model_dir, tmp_path / "noweights")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        validate_checkpoint(folder, model_dir)


def test_missing_config(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        validate_checkpoint(folder, model_dir)


def test_wrong_architecture(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "arch")
    edit_config(folder, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(CheckpointError, match="architecture"):
        validate_checkpoint(folder, model_dir)


def test_other_shapes(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "shapes")
    edit_config(folder, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        validate_checkpoint(folder, model_dir)


def test_truncated_weights(model_dir, tmp_path):
    folder = copy_small_files(model_dir, tmp_path / "trunc")
    with (model_dir / "model.safetensors").open("rb") as src:
        (folder / "model.safetensors").write_bytes(src.read(4_000_000))
    with pytest.raises(CheckpointError, match="truncated"):
        validate_checkpoint(folder, model_dir)


def test_missing_tokenizer(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "notok")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        validate_checkpoint(folder, model_dir)


def test_adapter_needs_config_and_weights(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        validate_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        validate_adapter(tmp_path / "a")
