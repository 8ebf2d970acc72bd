"""`humpback trainer serve`: the fine-tuning service. Its flags are generated from `ServiceSettings`."""

from __future__ import annotations

import argparse

from humpback.settings import add_arguments, from_args
from trainer.config import ServiceSettings


def register(sub: argparse._SubParsersAction) -> None:
    trainer = sub.add_parser("trainer", help="the fine-tuning service (OpenAI files + fine-tuning API)")
    trainer_sub = trainer.add_subparsers(dest="trainer_command", required=True)
    serve = trainer_sub.add_parser("serve", help="run the trainer service")
    add_arguments(serve, ServiceSettings)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from trainer.api import create_app, settings_or_exit

    settings = settings_or_exit(lambda: from_args(ServiceSettings, args))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
