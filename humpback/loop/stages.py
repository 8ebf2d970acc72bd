"""Stage bookkeeping of a run: each finished stage leaves `RUN_DIR/stages/NAME.json` with its
outputs, metrics and timing, so a re-run skips it; an unfinished stage keeps its progress (a job id,
a journal) in `RUN_DIR/stages/NAME.state.json` and resumes from there."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Stages:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def result(self, name: str) -> dict[str, Any] | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def state(self, name: str) -> dict[str, Any]:
        path = self.dir / f"{name}.state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """Merge `state` into the stage's saved state."""
        _write(self.dir / f"{name}.state.json", {**self.state(name), **state})

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = self.result(name)
        if done is not None:
            log.info("stage %s: done earlier, skipped", name)
            return done
        # An interrupted attempt leaves no timing of its own: count attempts and keep the first start,
        # so a resumed stage reports both its last attempt and the wall time since it first started.
        state = self.state(name)
        attempts = state.get("attempts", 0) + 1
        first = state.get("first_started", time.time())
        self.save_state(name, {"attempts": attempts, "first_started": first})
        log.info("stage %s: start%s", name, f" (attempt {attempts})" if attempts > 1 else "")
        start = time.monotonic()
        result = fn()
        result["elapsed_s"] = round(time.monotonic() - start, 2)
        result["attempts"] = attempts
        result["since_first_start_s"] = round(time.time() - first, 2)
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write(self.dir / f"{name}.json", result)
        log.info("stage %s: done in %.1fs", name, result["elapsed_s"])
        return result

    def all(self) -> dict[str, dict[str, Any]]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json")) if not p.stem.endswith(".state")}
