"""The real `humpback` parser, walked down to one subcommand, for tests that hold a CLI against its settings."""

from __future__ import annotations

import argparse

from humpback.cli import build_parser, commands


def subcommand(*names: str) -> argparse.ArgumentParser:
    """`subcommand("trainer", "serve")`: the parser of `humpback trainer serve`."""
    return commands(build_parser())[names]
