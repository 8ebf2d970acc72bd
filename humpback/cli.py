"""The `humpback` command. Each part registers its own subcommands; heavy imports wait for the handler."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that define `register(subparsers)`. A part that is not installed (say, the trainer extra)
# simply contributes no commands.
_PARTS = (
    "services.cli", "client.cli", "humpback.data.cli", "humpback.evaluation.cli", "humpback.loop.cli", "trainer.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="humpback", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name.split(".")[0]):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return int(args.func(args) or 0)
