"""Checkpoint folders for swap tests, built from the real model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def copy_small_files(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def perturbed_checkpoint(src: Path, dst: Path, tensor: str = "model.norm.weight", scale: float = 1.5) -> Path:
    """A copy of the model whose final norm is scaled: same architecture, different outputs."""
    from safetensors.torch import load_file, save_file

    copy_small_files(src, dst)
    weights = load_file(src / "model.safetensors")
    weights[tensor] = (weights[tensor].float() * scale).to(weights[tensor].dtype)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def linked_checkpoint(src: Path, dst: Path) -> Path:
    """A valid copy that hard-links the weights instead of copying 270 MB (a symlink out of the folder
    is refused), copying them only across file systems."""
    copy_small_files(src, dst)
    try:
        os.link(src / "model.safetensors", dst / "model.safetensors")
    except OSError:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
