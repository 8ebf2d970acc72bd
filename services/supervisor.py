"""Run the model servers under supervisord, which restarts a server that dies.

`up` writes the supervisor config into the state dir and starts supervisord (it daemonizes);
`process_info` (for `serve status`) asks it over its unix-socket XML-RPC; `down` shuts it down, which
stops every server with its whole process group (vLLM's engine core is a child process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx

from humpback.contracts import ServeError
from services.config import ServeConfig, ServerSpec
from services.registry import ServedVersion, updating, write_private

SUPERVISORD = Path(sys.executable).with_name("supervisord")


def start_order(servers: list[ServerSpec]) -> tuple[list[ServerSpec], list[ServerSpec]]:
    """The servers to start at once, and those to start when the first are healthy.

    A CPU server whose model an earlier CPU server also serves waits for that one: the first compiles
    the model, the others then load its compiled graph from the compile cache. On 2 cores two servers
    compiling at once took 140 s each; one after the other, 95 s and 42 s (docs/services.md)."""
    first, later, compiling = [], [], set()
    for spec in servers:
        if spec.device == "cpu" and spec.model in compiling:
            later.append(spec)
        else:
            first.append(spec)
            if spec.device == "cpu":
                compiling.add(spec.model)
    return first, later


def _conf(cfg: ServeConfig) -> str:
    state = cfg.state_dir
    lines = [
        "[unix_http_server]", f"file={state}/supervisor.sock", "chmod=0700",
        "[supervisord]", f"logfile={state}/logs/supervisord.log", f"pidfile={state}/supervisord.pid",
        f"directory={Path.cwd()}", "logfile_maxbytes=10MB", "logfile_backups=2",
        "[rpcinterface:supervisor]", "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]", f"serverurl=unix://{state}/supervisor.sock",
    ]
    allow = "".join(f" --admin-allow {a}" for a in cfg.admin_allow)
    later = {spec.name for spec in start_order(cfg.servers)[1]}
    for spec in cfg.servers:
        launch = f"-m services.launch --spec-file {cfg.spec_path(spec.name)} --registry {cfg.registry}{allow}"
        lines += [
            f"[program:{spec.name}]",
            f"command={sys.executable} {launch}",
            f"autostart={'false' if spec.name in later else 'true'}",
            "autorestart=true", "startsecs=10", "startretries=5",
            # vLLM spawns its engine core: stop and kill the whole group, or it outlives the server.
            "stopasgroup=true", "killasgroup=true", "stopsignal=INT", "stopwaitsecs=30",
            "redirect_stderr=true", f"stdout_logfile={cfg.log_path(spec.name)}",
            "stdout_logfile_maxbytes=50MB", "stdout_logfile_backups=2",
        ]
    return "\n".join(lines) + "\n"


def rpc(state_dir: Path):
    """The supervisord XML-RPC proxy, or None when no supervisord runs for this state dir."""
    from supervisor.xmlrpc import SupervisorTransport

    sock = state_dir / "supervisor.sock"
    if not sock.exists():
        return None
    transport = SupervisorTransport(None, None, f"unix://{sock}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    try:
        proxy.supervisor.getState()
    except (OSError, xmlrpc.client.Fault):
        return None
    return proxy


def health(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(cfg: ServeConfig, servers: list[ServerSpec], started: float, timeout: float) -> None:
    deadline = started + timeout
    pending = {s.name: s for s in servers}
    proxy = rpc(cfg.state_dir)
    while pending:
        for name, spec in list(pending.items()):
            if health(spec.url):
                pending.pop(name)
                continue
            if proxy is not None and proxy.supervisor.getProcessInfo(name)["statename"] == "FATAL":
                raise ServeError(f"server {name} failed to start; see {cfg.log_path(name)}:\n{_tail(cfg.log_path(name))}")
        if pending and time.monotonic() > deadline:
            raise ServeError(f"servers {sorted(pending)} not healthy after {timeout:.0f}s; logs in {cfg.state_dir / 'logs'}")
        time.sleep(1)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def up(cfg: ServeConfig, timeout: float = 900.0) -> None:
    """Start the servers and wait until every one answers."""
    start(cfg, timeout)()


def start(cfg: ServeConfig, timeout: float = 900.0) -> Callable[[], None]:
    """Start the servers; wait for those that start first (`start_order`) and start the others; a function
    that waits for those, within the same `timeout`: work for the first servers can go on meanwhile."""
    if rpc(cfg.state_dir) is not None:
        raise ServeError(f"servers already run from {cfg.state_dir}; `humpback serve down` first")
    for spec in cfg.servers:
        if health(spec.url):
            raise ServeError(f"port {spec.port} already answers /health: another server runs there")
    conf = write_state(cfg)
    started = time.monotonic()
    first, later = start_order(cfg.servers)
    subprocess.run([str(SUPERVISORD), "-c", str(conf)], check=True)
    wait_healthy(cfg, first, started, timeout)
    if later:
        proxy = rpc(cfg.state_dir)
        for spec in later:
            proxy.supervisor.startProcess(spec.name, False)
    return partial(wait_healthy, cfg, later, started, timeout)


def write_state(cfg: ServeConfig) -> Path:
    """The state dir of `up` (this user's only), its config and the spec of each server; the path of
    the supervisor's config.

    serve.json and the specs hold the API key (`serve swap` and the launcher read it there), so they
    are 0600 in a 0700 folder; the supervisor's config, which names the commands `ps` shows, holds none.
    """
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.state_dir, 0o700)
    (cfg.state_dir / "logs").mkdir(exist_ok=True)
    write_private(cfg.state_dir / "serve.json", cfg.model_dump_json(indent=2))
    for spec in cfg.servers:
        write_private(cfg.spec_path(spec.name), spec.model_dump_json(indent=2))
        # A process group recorded by an earlier `up` is long gone; its id may be reused by now.
        cfg.spec_path(spec.name).with_suffix(".pgid").unlink(missing_ok=True)
    # Only these servers, on their base weights: a replica an earlier `up` ran is no server of its role now.
    with updating(cfg.registry) as reg:
        reg.servers = {s.name: ServedVersion(role=s.role, url=s.url) for s in cfg.servers}
    conf = cfg.state_dir / "supervisord.conf"
    conf.write_text(_conf(cfg))
    return conf


def load_config(state_dir: Path) -> ServeConfig:
    path = state_dir / "serve.json"
    if not path.is_file():
        raise ServeError(f"no servers were started from {state_dir} (no serve.json)")
    return ServeConfig.model_validate_json(path.read_bytes())


def process_info(state_dir: Path) -> dict[str, dict]:
    proxy = rpc(state_dir)
    if proxy is None:
        return {}
    return {p["name"]: p for p in proxy.supervisor.getAllProcessInfo()}


def down(state_dir: Path, timeout: float = 60.0) -> None:
    pidfile = state_dir / "supervisord.pid"
    proxy = rpc(state_dir)
    if proxy is None:
        return
    pid = int(pidfile.read_text()) if pidfile.is_file() else None
    proxy.supervisor.shutdown()
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
