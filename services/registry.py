"""The served-versions registry: which checkpoint each server serves, where it is reached, and the model
aliases it answers to. A role may be served by several replicas (`serve up --replicas scorer=2`): each
has its own entry, and the role's version is the one they all serve (`Registry.role_version`).

One small JSON file, written atomically (temp file + rename) by the hot-swap and when a server starts
on its base weights, and read by `serve status` and by the guard middleware inside each vLLM server,
which maps an alias such as a fine-tuned model's name to the role's served model. Shared by the host-local stack (the serve state dir) and compose
(a `state` volume), so it is found through `HUMPBACK_REGISTRY` when set. Its writer, `write_private`,
also writes the state files that may hold the API key (`serve up`'s, a run's).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from humpback.contracts import REGISTRY_ENV, SERVE_STATE_DIR, STATE_DIR_ENV


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, SERVE_STATE_DIR)).absolute()


def default_registry() -> Path:
    env = os.environ.get(REGISTRY_ENV)
    return Path(env).absolute() if env else default_state_dir() / "registry.json"


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (temp file + rename: a reader sees the old file or the new
    one), readable and writable by this user only (mkstemp's 0600, whatever the umask or the mode of
    the file it replaces). The registry, and the state files that may hold the API key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ServedVersion(BaseModel):
    """What one server serves now."""

    role: str
    version: str = "base"
    checkpoint: str | None = None
    method: str | None = None
    swapped_at: str | None = None
    # Where the other services reach the server (a swap of its role reaches every replica there).
    url: str | None = None
    # Names the guard maps to the role's current full weights (fine-tuned model names).
    aliases: list[str] = Field(default_factory=list)
    # Runtime LoRA adapters loaded on top of the base, requested by their own names.
    adapters: list[str] = Field(default_factory=list)


class Registry(BaseModel):
    # Keyed by server name: the role's name for its first server, ROLE-N for replica N (ServerSpec.name).
    servers: dict[str, ServedVersion] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return cls()

    def save(self, path: Path) -> None:
        write_private(path, self.model_dump_json(indent=2))

    def of_role(self, role: str) -> dict[str, ServedVersion]:
        """The servers of `role`, by name."""
        return {name: v for name, v in self.servers.items() if v.role == role}

    def role_version(self, role: str) -> str | None:
        """The version every server of `role` serves; None while they differ (a swap is under way) or
        when no server of the role is recorded."""
        versions = {v.version for v in self.of_role(role).values()}
        return versions.pop() if len(versions) == 1 else None

    def aliases(self, name: str | None = None) -> dict[str, str]:
        """alias -> the served model name it stands for (the role: each server serves its weights
        under the role's name), for server `name`, or for every server."""
        servers = self.servers.values() if name is None else filter(None, [self.servers.get(name)])
        return {a: v.role for v in servers for a in v.aliases}


@contextmanager
def updating(path: Path) -> Iterator[Registry]:
    """The registry to change in place, saved on leaving. Replicas start at once and each records
    itself, so a read-modify-write holds an exclusive lock (a `.lock` file beside the registry) or one
    start would undo another's entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reg = Registry.load(path)
        yield reg
        reg.save(path)


def record_swap(path: Path, role: str, version: str, checkpoint: str, method: str, served_model: str, *,
                name: str | None = None) -> ServedVersion:
    """Record a finished swap of server `name` (default: the role's first server, named after it). A
    full-weight reload replaces the weights, so earlier fine-tuned names stop resolving; adapters
    accumulate beside the base."""
    name = name or role
    with updating(path) as reg:
        prev = reg.servers.get(name, ServedVersion(role=role))
        aliases, adapters = list(prev.aliases), list(prev.adapters)
        if method == "reload":
            aliases = [served_model] if served_model != role else []
        elif method == "lora" and served_model not in adapters:
            adapters.append(served_model)
        entry = reg.servers[name] = ServedVersion(
            role=role,
            version=version,
            checkpoint=checkpoint,
            method=method,
            swapped_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            url=prev.url,
            aliases=aliases,
            adapters=adapters,
        )
    return entry


def reset_server(path: Path, name: str, role: str, url: str | None) -> None:
    """Record that server `name` serves its role's base weights at `url` (a fresh start, or a restart
    that cannot restore)."""
    with updating(path) as reg:
        reg.servers[name] = ServedVersion(role=role, url=url)
