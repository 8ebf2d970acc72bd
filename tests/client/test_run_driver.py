"""`client.runner.open_run`, the one set-up and tear-down of augment, curate and rewrite: however a
run ends (every request failed, the disk filled mid-run, the server was down) it leaves its
`<out>.summary.json` with what it did, and the lock is released for the next run. Against the fake
server (fault injection); the real-server runs are in test_integration.py."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from client.augment import AugmentConfig, augment
from client.curate import CurateConfig, curate
from client.fanout import FanoutConfig
from client.journal import Journal
from client.rewrite import RewriteConfig, rewrite
from humpback.contracts import OutputError, RequestFailed
from tests.client.conftest import make_text
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


@pytest.mark.parametrize("name", COMMANDS)
async def test_a_run_stopped_by_a_full_disk_leaves_its_summary_and_its_lock(name: str, fake: FakeServer,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    make_input, command = COMMANDS[name]
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
    assert saved["results"]["written"] == 3 and saved["extra"]["model"] == fake.model
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
