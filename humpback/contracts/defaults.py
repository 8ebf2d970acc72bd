"""Defaults every room agrees on: where the services listen, where their state lives, and the names
of the environment variables that configure them. Written once here; a setting's own declaration
(see `humpback.settings`) takes its default from these."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Role = Literal["backward", "scorer"]
ROLES: tuple[Role, ...] = get_args(Role)
DEFAULT_PORTS = {"backward": 8001, "scorer": 8002}
TRAINER_PORT = 8100
LOOPBACK = "127.0.0.1"


def local_url(port: int) -> str:
    """The base URL (no /v1) of a service on this host."""
    return f"http://{LOOPBACK}:{port}"


DEFAULT_URLS = {role: local_url(port) for role, port in DEFAULT_PORTS.items()}
TRAINER_URL = local_url(TRAINER_PORT)

# The model every role serves and fine-tunes from unless told otherwise (`make setup` prepares it).
DEFAULT_MODEL_DIR = Path("models/smollm2-135m-instruct")
SERVE_STATE_DIR = Path(".humpback/serve")
TRAINER_DATA_DIR = Path(".humpback/trainer")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# Environment variables. One key guards the whole stack: the servers' /v1 routes and the trainer.
API_KEY_ENV = "HUMPBACK_API_KEY"
STATE_DIR_ENV = "HUMPBACK_STATE_DIR"
REGISTRY_ENV = "HUMPBACK_REGISTRY"
ADMIN_ALLOW_ENV = "HUMPBACK_ADMIN_ALLOW"
REJECT_SEED_ENV = "HUMPBACK_REJECT_SEED"
