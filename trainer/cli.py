"""`humpback trainer serve`: the fine-tuning service. Flags mirror `ServiceSettings` field by field."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from services.config import API_KEY_ENV as SERVER_API_KEY_ENV
from trainer.config import PRESETS, ServiceSettings, parse_model_registration

TRAINER_API_KEY_ENV = "HUMPBACK_TRAINER_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    trainer = sub.add_parser("trainer", help="the fine-tuning service (OpenAI files + fine-tuning API)")
    trainer_sub = trainer.add_subparsers(dest="trainer_command", required=True)
    d = ServiceSettings()
    serve = trainer_sub.add_parser("serve", help="run the trainer service")
    serve.add_argument("--host", default=d.host)
    serve.add_argument("--port", type=int, default=d.port)
    serve.add_argument("--data-dir", type=Path, default=d.data_dir, help="database, uploads, checkpoints")
    serve.add_argument("--api-key", default=None, help=f"bearer token clients must send (default ${TRAINER_API_KEY_ENV})")
    serve.add_argument("--backward-url", default=d.backward_url, help="backward server base URL (no /v1)")
    serve.add_argument("--scorer-url", default=d.scorer_url, help="scorer server base URL (no /v1)")
    serve.add_argument("--server-api-key", default=None, help=f"the servers' bearer token (default ${SERVER_API_KEY_ENV})")
    serve.add_argument("--registry", type=Path, default=None, help="alias registry the servers read (default: serve state)")
    serve.add_argument("--backward-model", type=Path, default=d.backward_model, help="folder the backward role serves")
    serve.add_argument("--scorer-model", type=Path, default=d.scorer_model, help="folder the scorer role serves")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="register a base model (repeatable)")
    serve.add_argument("--default-preset", choices=sorted(PRESETS), default=d.default_preset)
    serve.add_argument("--max-attempts", type=int, default=d.max_attempts, help="times a job may be started (restarts resume it)")
    serve.add_argument("--swap-timeout", type=float, default=d.swap_timeout, help="seconds for one hot-swap")
    serve.add_argument("--accelerate-config", type=Path, default=None, help="launch runs with accelerate (multi-GPU)")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from trainer.api import create_app

    settings = ServiceSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        api_key=args.api_key or os.environ.get(TRAINER_API_KEY_ENV),
        backward_url=args.backward_url,
        scorer_url=args.scorer_url,
        server_api_key=args.server_api_key or os.environ.get(SERVER_API_KEY_ENV),
        registry=args.registry,
        backward_model=args.backward_model,
        scorer_model=args.scorer_model,
        models=dict(parse_model_registration(m) for m in args.model),
        default_preset=args.default_preset,
        max_attempts=args.max_attempts,
        swap_timeout=args.swap_timeout,
        accelerate_config=args.accelerate_config,
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
