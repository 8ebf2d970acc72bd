"""Bring up what a run talks to, each only when it does not answer already: the model servers
(`services.supervisor.up`, which leaves them to supervisord) and the trainer service (a process of
its own, `python -m trainer.api`). Both stay up after the run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from humpback.contracts import API_KEY_ENV, ServeError
from humpback.loop.config import ServicesConfig
from humpback.settings import from_args, values_from
from services.config import PER_ROLE, ServeConfig, ServerSpec, ServeSettings, cpu_binds, default_servers
from services.registry import write_private
from services.supervisor import down, health, start, up
from trainer.config import ServiceSettings

log = logging.getLogger(__name__)


def _port(url: str) -> int:
    port = urlparse(url).port
    if port is None:
        raise ValueError(f"{url} names no port: the run starts its services on the ports of their URLs")
    return port


def _key(cfg: ServicesConfig) -> dict[str, str | None]:
    """The run's API key, resolved once (by the run's config, from the file or `HUMPBACK_API_KEY`), for the
    `api_key` setting of what the run starts: given even when None, so that no setting reads the
    environment again."""
    return {"api_key": cfg.api_key}


def ensure_servers(cfg: ServicesConfig) -> Callable[[], None]:
    """Start the model servers unless they answer; once the backward server answers, a function that waits
    for the scorer's (`services.supervisor.start`: on CPU it starts second, from the first one's compiled
    graph)."""
    if health(cfg.backward_url) and health(cfg.scorer_url):
        return lambda: None
    if not cfg.start:
        raise ServeError(f"model servers at {cfg.backward_url} / {cfg.scorer_url} do not answer "
                         "(services.start is off)")
    log.info("starting the model servers; the first start compiles for a few minutes")
    settings = ServeSettings(backward_port=_port(cfg.backward_url), scorer_port=_port(cfg.scorer_url),
                             backward_model=cfg.base_model, scorer_model=cfg.base_model)
    servers = default_servers(settings, **values_from(ServerSpec, _key(cfg), exclude=PER_ROLE))
    serve = ServeConfig(state_dir=cfg.state_dir, servers=servers)
    waiting = start(serve, timeout=settings.timeout)
    for spec in servers:
        log.info("%s: %s (log %s)", spec.role, spec.url, serve.log_path(spec.role))
    return waiting


@contextmanager
def serving(cfg: ServicesConfig, role: str, model: Path, port: int) -> Iterator[str]:
    """A vLLM server of `model` under the served name `role` for the length of the block (the rewrite
    arm's rewriter), supervised like the others from its own state dir beside theirs; its URL. What
    an interrupted run left of it is stopped first."""
    state_dir = cfg.state_dir.with_name(f"{cfg.state_dir.name}-{role}")
    down(state_dir)
    spec = ServerSpec(role=role, model=str(model.absolute()), port=port, **_key(cfg))
    if spec.device == "cpu":  # the others idle meanwhile: this one takes every core
        spec.env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binds(1)[0])
    serve = ServeConfig(state_dir=state_dir, servers=[spec])
    log.info("starting the %s server (%s) on %s", role, model, spec.url)
    up(serve, timeout=ServeSettings().timeout)
    try:
        yield spec.url
    finally:
        down(state_dir)


def ensure_trainer(cfg: ServicesConfig, log_dir: Path, timeout: float = 300.0) -> None:
    if health(cfg.trainer_url):
        return
    if not cfg.start:
        raise ServeError(f"the trainer at {cfg.trainer_url} does not answer (services.start is off)")
    settings = from_args(
        ServiceSettings, _key(cfg), port=_port(cfg.trainer_url),
        data_dir=cfg.trainer_data_dir.absolute(), backward_url=cfg.backward_url, scorer_url=cfg.scorer_url,
        registry=cfg.registry, backward_model=Path(cfg.base_model).absolute(),
        scorer_model=Path(cfg.base_model).absolute(),
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    settings_path = log_dir / "trainer.settings.json"
    # The trainer reads its settings from this file (not argv, which `ps` shows), readable by this user
    # only; its API key from its environment, never the file: the file is copied with the run folder.
    write_private(settings_path, settings.model_dump_json(indent=2, exclude={"api_key"}))
    # The trainer gets the run's key, or none: not another one the environment holds.
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if cfg.api_key:
        env[API_KEY_ENV] = cfg.api_key
    with (log_dir / "trainer.log").open("ab") as logfile:
        # Its own session: the trainer outlives the run, like the servers.
        proc = subprocess.Popen([sys.executable, "-m", "trainer.api", str(settings_path)], env=env,
                                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file = settings.data_dir / "trainer.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not health(cfg.trainer_url):
        if proc.poll() is not None:
            raise ServeError(f"the trainer exited with {proc.returncode}; see {log_dir / 'trainer.log'}")
        if time.monotonic() > deadline:
            raise ServeError(f"the trainer is not healthy after {timeout:.0f}s; see {log_dir / 'trainer.log'}")
        time.sleep(1)
    log.info("trainer up at %s (pid %d, log %s)", cfg.trainer_url, proc.pid, log_dir / "trainer.log")
