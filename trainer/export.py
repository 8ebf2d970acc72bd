"""Writing a trained model as a servable full-weights folder, atomically.

The servers can only load a complete folder (config, safetensors, tokenizer, chat template), and a
reload from a half-written one would serve broken weights: the folder is written beside its final
name and renamed into place, so it either exists complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def export_model(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save `model` (LoRA already merged) in bf16 with its tokenizer to `target`, atomically.

    An existing `target` (a previous export of the same job, before a crash) is replaced.
    """
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_tree(folder: Path) -> None:
    """Flush every file so that a rename after a power loss never exposes empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
