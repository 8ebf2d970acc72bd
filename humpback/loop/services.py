"""Bring up what a run talks to: the model servers (`humpback serve up`) and the trainer service
(`humpback trainer serve`), each only when it does not answer already. Both stay up after the run."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from humpback.loop.config import ServicesConfig

log = logging.getLogger(__name__)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _port(url: str) -> str:
    return str(urlparse(url).port)


def ensure_servers(cfg: ServicesConfig) -> None:
    if healthy(cfg.backward_url) and healthy(cfg.scorer_url):
        return
    if not cfg.start:
        raise RuntimeError(f"model servers at {cfg.backward_url} / {cfg.scorer_url} do not answer (services.start is off)")
    log.info("starting the model servers (humpback serve up); the first start compiles for a few minutes")
    cmd = [sys.executable, "-m", "humpback", "serve", "up", "--state-dir", str(cfg.state_dir),
           "--backward-port", _port(cfg.backward_url), "--scorer-port", _port(cfg.scorer_url)]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    subprocess.run(cmd, check=True)


def ensure_trainer(cfg: ServicesConfig, log_dir: Path, timeout: float = 300.0) -> None:
    if healthy(cfg.trainer_url):
        return
    if not cfg.start:
        raise RuntimeError(f"the trainer at {cfg.trainer_url} does not answer (services.start is off)")
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "humpback", "trainer", "serve", "--port", _port(cfg.trainer_url),
           "--data-dir", str(cfg.trainer_data_dir), "--backward-url", cfg.backward_url,
           "--scorer-url", cfg.scorer_url, "--registry", str(cfg.state_dir.absolute() / "registry.json")]
    if cfg.api_key:
        cmd += ["--server-api-key", cfg.api_key]
    logfile = (log_dir / "trainer.log").open("ab")
    # Its own session: the trainer outlives the run, like the servers.
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    (cfg.trainer_data_dir / "trainer.pid").parent.mkdir(parents=True, exist_ok=True)
    (cfg.trainer_data_dir / "trainer.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not healthy(cfg.trainer_url):
        if proc.poll() is not None:
            raise RuntimeError(f"the trainer exited with {proc.returncode}; see {log_dir / 'trainer.log'}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the trainer is not healthy after {timeout:.0f}s; see {log_dir / 'trainer.log'}")
        time.sleep(1)
    log.info("trainer up at %s (pid %d, log %s)", cfg.trainer_url, proc.pid, log_dir / "trainer.log")
