"""Start one vLLM OpenAI server for a role: the program that the supervisor runs and restarts.

`python -m services.launch SPEC.json REGISTRY.json` builds vLLM's command line from the spec and
execs it, so the supervisor's pid is vLLM's own. On a restart after a crash it brings back the
checkpoint the registry says the role was serving (full-weight swaps), so a crash never silently
rolls a role back to its base weights.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from services.checkpoint import CheckpointError, validate_checkpoint
from services.config import ServerSpec
from humpback.contracts import ADMIN_ALLOW_ENV, REGISTRY_ENV, REJECT_SEED_ENV
from services.registry import Registry, reset_role

# vLLM's `vllm` console script looks up the distribution `vllm`, which the CPU build is not named.
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
GUARD = "services.guard.AdminGuard"
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
        argv += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--max-loras", "2"]
    # Base-model fine-tunes ship no chat template; chat requests would be refused without one.
    if not has_chat_template(model):
        argv += ["--chat-template", str(FALLBACK_CHAT_TEMPLATE)]
    return argv + spec.extra_args


def vllm_env(spec: ServerSpec, registry: Path, admin_allow: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_SERVER_DEV_MODE="1",  # the weight-reload routes; the guard keeps them host-internal
        **{REGISTRY_ENV: str(registry), ADMIN_ALLOW_ENV: ",".join(admin_allow)},
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), env.get("PYTHONPATH")])),
    )
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key  # in the environment, not argv: argv is world-readable
    if spec.lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if spec.device == "cpu":
        env[REJECT_SEED_ENV] = "1"  # see services.guard
    env.update(spec.env)
    return env


def model_to_serve(spec: ServerSpec, registry: Path) -> str:
    """The served checkpoint to come back with after a restart, else the spec's base model."""
    served = Registry.load(registry).roles.get(spec.role)
    if served and served.method == "reload" and served.checkpoint:
        try:
            validate_checkpoint(Path(served.checkpoint), Path(spec.model))
            return served.checkpoint
        except CheckpointError as exc:
            print(f"humpback: cannot restore {served.checkpoint} ({exc}); serving the base model", file=sys.stderr)
    reset_role(registry, spec.role)
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


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3:
        raise SystemExit("usage: python -m services.launch SPEC.json REGISTRY.json ADMIN_ALLOW")
    reap_previous(Path(args[0]).with_suffix(".pgid"))
    spec = ServerSpec.model_validate_json(Path(args[0]).read_bytes())
    registry = Path(args[1])
    admin_allow = [a for a in args[2].split(",") if a]
    model = model_to_serve(spec, registry)
    cmd = vllm_argv(spec, model)
    print("humpback: exec", " ".join(cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, vllm_env(spec, registry, admin_allow))


if __name__ == "__main__":
    main()
