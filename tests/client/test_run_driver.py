"""`client.runner.open_run`, the one set-up and tear-down of augment, curate, rewrite, batch import and
the evaluations' journaled runs: however a run ends (every request failed, the disk filled mid-run,
the server was down) it leaves its `<out>.summary.json` with what it did, and the lock is released
for the next run. Against the fake server (fault injection); the real-server runs are in
test_integration.py."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from client.augment import AugmentConfig, augment
from client.batch import export_augment, export_curate, import_augment, import_curate
from client.curate import CurateConfig, curate
from client.fanout import FanoutConfig
from client.journal import Journal
from client.rewrite import RewriteConfig, rewrite
from client.fanout import Fanout
from humpback.contracts import OutputError, RequestFailed
from humpback.evaluation.common import GenerationConfig, answer_all
from tests.client.conftest import make_text
from tests.client.test_batch import _run_batch
from tests.client.fake_server import FakeServer

N = 8

Command = Callable[[Path, Path, FanoutConfig], Awaitable[Any]]


def _fan(url: str) -> FanoutConfig:
    return FanoutConfig(endpoints=[url], max_retries=1, backoff_base=0.01, backoff_max=0.05)


def _corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": make_text(i)}) + "\n" for i in range(N)))
    return path


def _candidates(path: Path) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"{i:032x}", "instruction": f"What is topic {i}?",
                                        "output": make_text(i, 700)}) + "\n" for i in range(N)))
    return path


# Each command with its input file, as a user runs it (no progress bar, no resampling: one request a pair).
COMMANDS: dict[str, tuple[Callable[[Path], Path], Command]] = {
    "augment": (_corpus, lambda src, out, fan: augment([src], out, fan, AugmentConfig(progress=False, resample=0))),
    "curate": (_candidates, lambda src, out, fan: curate(src, out, fan, CurateConfig(progress=False))),
    "rewrite": (_candidates, lambda src, out, fan: rewrite(src, out, fan, RewriteConfig(progress=False))),
}


def _exported(export: Callable[[Path, Path], Any]) -> Callable[[Path], Path]:
    """The input of a batch import: `export(input, requests)`, then the batch run's results beside them."""

    def make(path: Path) -> Path:
        requests = path.with_name("req.jsonl")
        export(path, requests)
        _run_batch(requests, path.with_name("res.jsonl"))
        return requests

    return make


async def _answers(prompts: Path, out: Path, fan: FanoutConfig) -> None:
    async with Fanout(fan) as f:
        await answer_all(f, "m", None, prompts.read_text().splitlines(), GenerationConfig(), out.with_suffix(""))


# Runs that need no server: a batch import, whose answers are in a file (asyncio.run inside: a thread).
IMPORTS: dict[str, tuple[Callable[[Path], Path], Command]] = {
    "import augment": (_exported(lambda src, req: export_augment([_corpus(src)], req, "backward")),
                       lambda req, out, _: asyncio.to_thread(import_augment, req, req.with_name("res.jsonl"), out)),
    "import curate": (_exported(lambda src, req: export_curate(_candidates(src), req, "scorer")),
                      lambda req, out, _: asyncio.to_thread(import_curate, req, req.with_name("res.jsonl"), out)),
}
ANSWERS: dict[str, tuple[Callable[[Path], Path], Command]] = {
    "eval answers": (lambda p: (p.write_text("".join(f"Prompt {i}?\n" for i in range(N))), p)[1], _answers),
}


def _summary(out: Path) -> dict[str, Any]:
    return json.loads(out.with_name(out.stem + ".summary.json").read_text())


@pytest.mark.parametrize("name", COMMANDS)
async def test_a_run_whose_every_request_fails_leaves_its_summary(name: str, fake: FakeServer, tmp_path: Path) -> None:
    make_input, command = COMMANDS[name]
    fake.script.extend(["400"] * N)
    out = tmp_path / "out.jsonl"
    await command(make_input(tmp_path / "in.jsonl"), out, _fan(fake.url))
    saved = _summary(out)
    assert saved["results"]["failed"] == N and saved["results"].get("written", 0) == 0
    assert len((tmp_path / "out.failed.jsonl").read_text().splitlines()) == N


@pytest.mark.parametrize("name", [*COMMANDS, *IMPORTS, *ANSWERS])
async def test_a_run_stopped_by_a_full_disk_leaves_its_summary_and_its_lock(name: str, fake: FakeServer,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    make_input, command = {**COMMANDS, **IMPORTS, **ANSWERS}[name]
    append = Journal.append
    written = []

    def fills_up(self: Journal, line: str) -> None:
        if len(written) == 3:
            raise OutputError(f"{self.path}: cannot write (No space left on device)")
        written.append(line)
        append(self, line)

    monkeypatch.setattr(Journal, "append", fills_up)
    src, out = make_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    with pytest.raises(OutputError, match="No space left"):
        await command(src, out, _fan(fake.url))
    saved = _summary(out)
    assert saved["results"]["written"] == 3 and saved["results"]["failed"] == 0
    # The lock went with the run: once there is room, the same command resumes and finishes.
    monkeypatch.setattr(Journal, "append", append)
    await command(src, out, _fan(fake.url))
    saved = _summary(out)
    assert saved["results"]["already_done"] == 3 and saved["results"]["written"] == N - 3
    assert saved["results"]["failed"] == 0


@pytest.mark.parametrize("name", COMMANDS)
async def test_a_run_against_a_server_that_is_down_leaves_its_summary(name: str, tmp_path: Path) -> None:
    make_input, command = COMMANDS[name]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.jsonl"
    with pytest.raises(RequestFailed, match="/v1/models"):
        await command(make_input(tmp_path / "in.jsonl"), out, _fan(f"http://127.0.0.1:{port}"))
    saved = _summary(out)
    assert saved["results"]["already_done"] == 0 and saved["results"]["failed"] == 0
    assert not out.with_name(out.name + ".lock").exists()
