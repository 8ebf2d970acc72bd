"""Stage bookkeeping of a run: each finished stage leaves `RUN_DIR/stages/NAME.json` with its
outputs, metrics and timing (a `humpback.loop.records` model), so a re-run skips it; an unfinished
stage keeps its progress (a job id, a journal) in `RUN_DIR/stages/NAME.state.json` and resumes from there."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError

from humpback.contracts import InputError
from humpback.loop.records import StageRecord, StageState, record_type

log = logging.getLogger(__name__)

R = TypeVar("R", bound=StageRecord)


def _write(path: Path, record: BaseModel) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(record.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


class Stages:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _read(self, path: Path) -> StageRecord:
        try:
            return record_type(path.stem).model_validate_json(path.read_bytes())
        except ValidationError as e:
            where = ".".join(map(str, e.errors()[0]["loc"]))
            raise InputError(f"{path}: field {where}: {e.errors()[0]['msg']} (a record of an older version of "
                             "humpback? re-run into a fresh run folder)") from e

    def result(self, name: str) -> StageRecord | None:
        path = self.dir / f"{name}.json"
        return self._read(path) if path.is_file() else None

    def state(self, name: str) -> StageState:
        path = self.dir / f"{name}.state.json"
        return StageState.model_validate_json(path.read_bytes()) if path.is_file() else StageState()

    def save_state(self, name: str, **changes: object) -> StageState:
        """Merge `changes` into the stage's saved state."""
        state = StageState.model_validate({**self.state(name).model_dump(), **changes})
        _write(self.dir / f"{name}.state.json", state)
        return state

    def run(self, name: str, fn: Callable[[], R]) -> R:
        done = self.result(name)
        if done is not None:
            log.info("stage %s: done earlier, skipped", name)
            return cast(R, done)  # `record_type(name)`: the model `fn` returns
        # An interrupted attempt leaves no timing of its own: count attempts and keep the first start,
        # so a resumed stage reports both its last attempt and the wall time since it first started.
        state = self.state(name)
        attempts = state.attempts + 1
        first = state.first_started or time.time()
        self.save_state(name, attempts=attempts, first_started=first)
        log.info("stage %s: start%s", name, f" (attempt {attempts})" if attempts > 1 else "")
        start = time.monotonic()
        result = fn()
        assert isinstance(result, record_type(name)), f"stage {name} returned a {type(result).__name__}"
        result = result.model_copy(update={
            "elapsed_s": round(time.monotonic() - start, 2), "attempts": attempts,
            "since_first_start_s": round(time.time() - first, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _write(self.dir / f"{name}.json", result)
        log.info("stage %s: done in %.1fs", name, result.elapsed_s)
        return result

    def all(self) -> dict[str, StageRecord]:
        return {p.stem: self._read(p) for p in sorted(self.dir.glob("*.json")) if not p.stem.endswith(".state")}


def concurrently(*branches: Callable[[], Any]) -> list[Any]:
    """Run `branches` at once and return their results in order: the first in this thread, each other in
    a thread of its own. Branches that ask different servers (on CPUs each has cores of its own) take the
    longest one's time, not the sum. An error in one waits for the others to end, then is raised (the
    first one's); the threads are daemons, so that Ctrl-C ends the run at once: a stage cut short
    resumes from its journal like one that was killed."""
    results: list[Any] = [None] * len(branches)
    errors: list[Exception | None] = [None] * len(branches)

    def call(i: int) -> None:
        try:
            results[i] = branches[i]()
        except Exception as e:  # raised again in the calling thread (Ctrl-C, in this one, goes straight through)
            errors[i] = e

    threads = [threading.Thread(target=call, args=(i,), name=f"branch-{i}", daemon=True)
               for i in range(1, len(branches))]
    for t in threads:
        t.start()
    call(0)
    for t in threads:
        t.join()
    for error in errors:
        if error is not None:
            raise error
    return results
