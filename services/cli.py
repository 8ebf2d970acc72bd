"""`humpback serve ...` and `humpback models ...`: the model services from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.config import API_KEY_ENV, DEFAULT_MODEL_DIR, DEFAULT_PORTS, ROLES
from services.registry import default_state_dir


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the backward and scorer vLLM servers")
    serve_sub = serve.add_subparsers(dest="serve_command", required=True)

    up = serve_sub.add_parser("up", help="start both servers under a supervisor and wait until healthy")
    _state_arg(up)
    for role in ROLES:
        up.add_argument(f"--{role}-model", default=str(DEFAULT_MODEL_DIR), help=f"model folder for {role}")
        up.add_argument(f"--{role}-port", type=int, default=DEFAULT_PORTS[role])
    up.add_argument("--host", default="127.0.0.1", help="bind address (admin routes stay host-only)")
    up.add_argument("--api-key", default=None, help=f"enforce on /v1 routes (default ${API_KEY_ENV})")
    up.add_argument("--kv-cache-bytes", default="1G", help="CPU KV cache per server")
    up.add_argument("--admin-allow", action="append", default=[], help="CIDR allowed to reach admin routes")
    up.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    up.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for /health")
    up.set_defaults(func=_up)

    status = serve_sub.add_parser("status", help="role, URL, model, version, pid and health of each server")
    _state_arg(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    down = serve_sub.add_parser("down", help="stop the servers and their supervisor")
    _state_arg(down)
    down.set_defaults(func=_down)

    swap = serve_sub.add_parser("swap", help="hot-swap a checkpoint folder into a running server")
    _state_arg(swap)
    swap.add_argument("role", choices=ROLES)
    swap.add_argument("checkpoint", type=Path)
    swap.add_argument("--version", required=True)
    swap.add_argument("--alias", default=None, help="model name that requests the new weights")
    swap.add_argument("--method", choices=("reload", "lora"), default="reload")
    swap.set_defaults(func=_swap)

    models = sub.add_parser("models", help="prepare models shipped by installed packages")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prep = models_sub.add_parser("prepare", help="dequantize a packaged GGUF model to a bf16 HF folder")
    prep.add_argument("--name", default="smollm2-135m-instruct")
    prep.add_argument("--models-dir", type=Path, default=DEFAULT_MODEL_DIR.parent)
    prep.set_defaults(func=_prepare)


def _state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=default_state_dir(), help="supervisor state, logs, registry")


def _up(args: argparse.Namespace) -> int:
    from services.config import ServeConfig, default_servers
    from services.supervisor import up

    servers = default_servers(
        models={r: str(_absolute(getattr(args, f"{r}_model"))) for r in ROLES},
        ports={r: getattr(args, f"{r}_port") for r in ROLES},
        host=args.host,
        api_key=args.api_key,
    )
    for spec in servers:
        spec.kv_cache_bytes = args.kv_cache_bytes
        spec.extra_args = list(args.vllm_arg)
    cfg = ServeConfig(state_dir=args.state_dir.absolute(), servers=servers, admin_allow=args.admin_allow)
    up(cfg, timeout=args.timeout)
    for spec in servers:
        print(f"{spec.role}: {spec.url} (model {spec.role}, log {cfg.log_path(spec.role)})")
    return 0


def _absolute(model: str) -> str | Path:
    path = Path(model)
    return path.absolute() if path.exists() else model


def status_rows(state_dir: Path) -> list[dict]:
    from services.registry import Registry
    from services.supervisor import health, load_config, process_info

    cfg = load_config(state_dir)
    procs = process_info(state_dir)
    registry = Registry.load(cfg.registry)
    rows = []
    for spec in cfg.servers:
        proc = procs.get(spec.role, {})
        served = registry.roles.get(spec.role)
        rows.append(
            {
                "role": spec.role,
                "url": spec.url,
                "model": spec.model,
                "version": served.version if served else "base",
                "checkpoint": served.checkpoint if served else None,
                "aliases": (served.aliases + served.adapters) if served else [],
                "pid": proc.get("pid") or None,
                "state": proc.get("statename", "STOPPED"),
                "healthy": health(spec.url),
                "log": str(cfg.log_path(spec.role)),
            }
        )
    return rows


def _status(args: argparse.Namespace) -> int:
    from services.supervisor import ServeError

    try:
        rows = status_rows(args.state_dir.absolute())
    except ServeError as exc:
        print(exc)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = ("role", "url", "model", "version", "pid", "state", "healthy", "log")
        print("\t".join(cols))
        for row in rows:
            print("\t".join(str(row[c]) for c in cols))
    return 0 if all(r["healthy"] for r in rows) else 1


def _down(args: argparse.Namespace) -> int:
    from services.supervisor import down

    down(args.state_dir.absolute())
    print("servers stopped")
    return 0


def _swap(args: argparse.Namespace) -> int:
    from services.hotswap import swap_checkpoint
    from services.supervisor import load_config

    cfg = load_config(args.state_dir.absolute())
    spec = next(s for s in cfg.servers if s.role == args.role)
    result = swap_checkpoint(
        spec.url, args.checkpoint, role=args.role, version=args.version, alias=args.alias,
        api_key=spec.api_key, registry=cfg.registry, method=args.method,
    )
    print(result.model_dump_json(indent=2))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from services.prepare import prepare

    print(prepare(args.name, args.models_dir))
    return 0
