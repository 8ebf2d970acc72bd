"""Start one vLLM OpenAI server for a role: the program that the supervisor runs and restarts, and the
entrypoint of compose's server containers.

    python -m services.launch --spec-file SPEC.json --registry REGISTRY.json [--admin-allow CIDR ...]
    python -m services.launch --role backward --port 8000 --device cuda ... --registry REGISTRY.json

It builds vLLM's command line from the server's spec (`ServerSpec`: a file `serve up` wrote, else
the flags generated from its fields) and execs it, so the supervisor's pid is vLLM's own. On a
restart after a crash it brings back the checkpoint the registry says the role was serving
(full-weight swaps), so a crash never silently rolls a role back to its base weights.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

from humpback.contracts import ADMIN_ALLOW_ENV, REGISTRY_ENV, REJECT_SEED_ENV, SERVER_NAME_ENV, CheckpointError
from humpback.settings import add_arguments, from_args, setting
from services.checkpoint import validate_checkpoint
from services.config import ADMIN_ALLOW, ServerSpec
from services.registry import Registry, default_registry, reset_server

# vLLM's `vllm` console script looks up the distribution `vllm`, which the CPU build is not named.
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
GUARD = "services.guard.AdminGuard"
# uvicorn's list of peers trusted to name the client in X-Forwarded-For (vLLM has no flag for it).
FORWARDED_ALLOW_IPS_ENV = "FORWARDED_ALLOW_IPS"
# The chat template for models that ship none (base-model fine-tunes): without one, vLLM refuses chat
# requests. A plain role-tagged format; fine-tunes of instruct models keep their own template.
FALLBACK_CHAT_TEMPLATE = Path(__file__).parent / "templates" / "plain_chat.jinja"


def has_chat_template(model: str) -> bool:
    folder = Path(model)
    if not folder.is_dir():
        return True  # a hub id: let vLLM decide
    if (folder / "chat_template.jinja").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    return cfg.is_file() and '"chat_template"' in cfg.read_text()


def vllm_argv(spec: ServerSpec, model: str) -> list[str]:
    argv = [
        sys.executable, "-m", VLLM_MODULE,
        "--model", model,
        "--served-model-name", spec.role,
        "--host", spec.host,
        "--port", str(spec.port),
        "--dtype", spec.dtype,
        "--max-model-len", str(spec.max_model_len),
        "--middleware", GUARD,
        "--disable-uvicorn-access-log",
    ]
    if spec.device == "cpu":
        argv += ["--kv-cache-memory-bytes", spec.kv_cache_bytes]
    else:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.lora:
        argv += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--max-loras", str(spec.max_loras)]
    # Base-model fine-tunes ship no chat template; chat requests would be refused without one.
    if not has_chat_template(model):
        argv += ["--chat-template", str(FALLBACK_CHAT_TEMPLATE)]
    return argv + spec.extra_args


def vllm_env(spec: ServerSpec, registry: Path, admin_allow: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_SERVER_DEV_MODE="1",  # the weight-reload routes; the guard keeps them host-internal
        **{REGISTRY_ENV: str(registry), ADMIN_ALLOW_ENV: ",".join(admin_allow), SERVER_NAME_ENV: spec.name},
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), env.get("PYTHONPATH")])),
    )
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key  # in the environment, not argv: argv is world-readable
    if spec.lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if spec.device == "cpu":
        env[REJECT_SEED_ENV] = "1"  # see services.guard
        # vLLM 0.32's AOT-compiled artifacts fail to load on CPU ("'function' object has no attribute
        # 'finalize_loading'"), so every start compiled anew. Without AOT it keeps inductor's cache: a
        # start after the first took 41 s against 74-90, serving at the same tokens/s.
        env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.update(spec.env)
    # uvicorn (vLLM's server) takes the client address from X-Forwarded-For when the peer is in this
    # list, 127.0.0.1 by default: a proxy on the host would let any client pose as loopback to the guard.
    # Emptied after `spec.env`, so no spec trusts a peer's word about who the client is.
    env[FORWARDED_ALLOW_IPS_ENV] = ""
    return env


def model_to_serve(spec: ServerSpec, registry: Path) -> str:
    """The served checkpoint to come back with after a restart, else the spec's base model (and the
    registry records this server, its role and URL, serving it)."""
    served = Registry.load(registry).servers.get(spec.name)
    if served and served.method == "reload" and served.checkpoint:
        try:
            validate_checkpoint(Path(served.checkpoint), Path(spec.model))
            return served.checkpoint
        except CheckpointError as exc:
            print(f"humpback: cannot restore {served.checkpoint} ({exc}); serving the base model", file=sys.stderr)
    reset_server(registry, spec.name, spec.role, spec.url)
    return spec.model


def reap_previous(pgid_file: Path) -> None:
    """Kill what is left of this role's previous incarnation.

    The supervisor starts each server as a process-group leader. When the API server dies hard
    (SIGKILL, OOM), its engine-core child lives on as an orphan holding memory and the server's
    cores; it is still in the old process group, so the restart ends that group first.
    """
    try:
        old = int(pgid_file.read_text())
    except (FileNotFoundError, ValueError):
        old = None
    if old is not None and old != os.getpgrp():
        try:
            os.killpg(old, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    pgid_file.write_text(str(os.getpgrp()))


class LaunchSettings(BaseModel):
    """Where the launcher finds the server's spec, and what the server's guard reads."""

    spec_file: Path | None = setting(None, "a ServerSpec as JSON (`serve up` writes one per role); without "
                                           "it the spec comes from the server flags")
    registry: Path = setting(default_factory=default_registry,
                             help="registry of served versions: restored from after a restart, read by the guard")
    admin_allow: list[str] = ADMIN_ALLOW


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.launch", description="Start one vLLM server for a role.")
    add_arguments(p, LaunchSettings)
    add_arguments(p.add_argument_group("server (without --spec-file)"), ServerSpec)
    return p


def resolve(argv: list[str] | None = None) -> tuple[LaunchSettings, ServerSpec]:
    """The launcher's settings and the server's spec, from the command line (flag > env > default)."""
    p = parser()
    args = p.parse_args(argv)
    launch = from_args(LaunchSettings, args)
    if launch.spec_file is not None:
        return launch, ServerSpec.model_validate_json(launch.spec_file.read_bytes())
    try:
        return launch, from_args(ServerSpec, args)
    except ValidationError as exc:
        p.error(f"the server flags (or --spec-file) do not make a server: {exc}")


def main(argv: list[str] | None = None) -> None:
    launch, spec = resolve(argv)
    if launch.spec_file is not None:
        # Only the supervisor restarts a server in place; a container starts in a fresh process tree.
        reap_previous(launch.spec_file.with_suffix(".pgid"))
    model = model_to_serve(spec, launch.registry)
    cmd = vllm_argv(spec, model)
    print("humpback: exec", " ".join(cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, vllm_env(spec, launch.registry, launch.admin_allow))


if __name__ == "__main__":
    main()
