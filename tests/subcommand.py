"""The real `humpback` parser, walked down to one subcommand, for tests that hold a CLI against its settings."""

from __future__ import annotations

import argparse

from humpback.cli import build_parser


def subcommand(*names: str) -> argparse.ArgumentParser:
    """`subcommand("trainer", "serve")`: the parser of `humpback trainer serve`."""
    parser = build_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser
