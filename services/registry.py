"""The served-versions registry: which checkpoint each role serves, and the model aliases it answers to.

One small JSON file, written atomically (temp file + rename) by the hot-swap and when a server starts
on its base weights, and read by `serve status` and by the guard middleware inside each vLLM server,
which maps an alias such as a fine-tuned model's name to the role's served model. Shared by the host-local stack (the serve state dir) and compose
(a `state` volume), so it is found through `HUMPBACK_REGISTRY` when set. Its writer, `write_private`,
also writes the state files that may hold the API key (`serve up`'s, a run's).
"""

from __future__ import annotations

import os
import tempfile
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
    """What one role serves now."""

    role: str
    version: str = "base"
    checkpoint: str | None = None
    method: str | None = None
    swapped_at: str | None = None
    # Names the guard maps to the role's current full weights (fine-tuned model names).
    aliases: list[str] = Field(default_factory=list)
    # Runtime LoRA adapters loaded on top of the base, requested by their own names.
    adapters: list[str] = Field(default_factory=list)


class Registry(BaseModel):
    roles: dict[str, ServedVersion] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return cls()

    def save(self, path: Path) -> None:
        write_private(path, self.model_dump_json(indent=2))

    def aliases(self) -> dict[str, str]:
        """alias -> the served model name it stands for (the role: each server serves its weights
        under the role's name), for every role."""
        return {a: role for role, v in self.roles.items() for a in v.aliases}


def record_swap(path: Path, role: str, version: str, checkpoint: str, method: str, served_model: str) -> ServedVersion:
    """Record a finished swap. A full-weight reload replaces the weights, so earlier fine-tuned names
    stop resolving; adapters accumulate beside the base."""
    reg = Registry.load(path)
    prev = reg.roles.get(role, ServedVersion(role=role))
    aliases, adapters = list(prev.aliases), list(prev.adapters)
    if method == "reload":
        aliases = [served_model] if served_model != role else []
    elif method == "lora" and served_model not in adapters:
        adapters.append(served_model)
    entry = ServedVersion(
        role=role,
        version=version,
        checkpoint=checkpoint,
        method=method,
        swapped_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        aliases=aliases,
        adapters=adapters,
    )
    reg.roles[role] = entry
    reg.save(path)
    return entry


def reset_role(path: Path, role: str) -> None:
    """Record that the role serves its base weights (a fresh start, or a restart that cannot restore)."""
    reg = Registry.load(path)
    reg.roles[role] = ServedVersion(role=role)
    reg.save(path)
