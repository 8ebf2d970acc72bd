"""Shared fixtures. `servers` starts the real stack (two vLLM CPU servers on the real model) once per
session through the real CLI, `humpback serve up`, and stops it with `humpback serve down`.

Set HUMPBACK_TEST_STATE_DIR to the state dir of a stack that already runs to reuse it (it is then
left running): handy while developing, never used by CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
TEST_API_KEY = "humpback-test-key"
TEST_PORTS = {"backward": 18001, "scorer": 18002}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class ServeInfo:
    backward_url: str
    scorer_url: str
    api_key: str | None
    state_dir: Path
    backward_model: str = "backward"
    scorer_model: str = "scorer"

    @property
    def registry(self) -> Path:
        return self.state_dir / "registry.json"

    def url(self, role: str) -> str:
        return self.backward_url if role == "backward" else self.scorer_url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def humpback(*args: str, check: bool = True, timeout: float = 1200,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "humpback", *args], cwd=REPO, check=check, timeout=timeout,
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )


def _info_from(state_dir: Path) -> ServeInfo:
    from services.supervisor import load_config

    cfg = load_config(state_dir)
    spec = {s.role: s for s in cfg.servers}
    return ServeInfo(spec["backward"].url, spec["scorer"].url, spec["backward"].api_key, state_dir)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"{MODEL_DIR} is missing: run `make setup`")
    return MODEL_DIR


@pytest.fixture(scope="session")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    reuse = os.environ.get("HUMPBACK_TEST_STATE_DIR")
    if reuse:
        yield _info_from(Path(reuse))
        return
    state_dir = tmp_path_factory.mktemp("serve")
    result = humpback(
        "serve", "up", "--state-dir", str(state_dir),
        "--backward-model", str(model_dir), "--scorer-model", str(model_dir),
        "--backward-port", str(TEST_PORTS["backward"]), "--scorer-port", str(TEST_PORTS["scorer"]),
        check=False, env={"HUMPBACK_API_KEY": TEST_API_KEY},  # keys never on a command line
    )
    if result.returncode != 0:
        humpback("serve", "down", "--state-dir", str(state_dir), check=False)
        pytest.fail(f"serve up failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    try:
        yield _info_from(state_dir)
    finally:
        tree = _process_tree(state_dir)
        humpback("serve", "down", "--state-dir", str(state_dir), check=False)
    # `serve down` must leave nothing behind: supervisor, API servers, engine cores.
    import psutil

    deadline = time.monotonic() + 30
    while (alive := [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"processes left after serve down: {[(p.pid, p.name()) for p in alive]}"


def _process_tree(state_dir: Path) -> list:
    import psutil

    pidfile = state_dir / "supervisord.pid"
    if not pidfile.is_file():
        return []
    root = psutil.Process(int(pidfile.read_text()))
    return [root, *root.children(recursive=True)]


@pytest.fixture
def fault_report():
    """`fault_report(FaultRow(...))` adds a row to the fault suite's table (tests/faults/report.py)."""
    from tests.faults.report import ROWS

    return ROWS.append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.faults.report import ROWS, markdown, write_report

    if ROWS:
        terminalreporter.section("fault suite")
        terminalreporter.write(markdown(ROWS))
        path = write_report()
        if path is not None:
            terminalreporter.write_line(f"written to {path}")
