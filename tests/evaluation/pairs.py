"""A held-out pairs file, as the stage evaluations read it (`contracts.read_pairs`)."""

from __future__ import annotations

import json
from pathlib import Path


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"instruction": x, "response": y}) + "\n" for x, y in pairs))
    return path
