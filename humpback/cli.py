"""The `humpback` command. Each part registers its own subcommands; heavy imports wait for the handler."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from pathlib import Path

# Modules that define `register(subparsers)`. A part that is not installed (say, the trainer extra)
# simply contributes no commands.
_PARTS = (
    "services.cli", "client.cli", "humpback.data.cli", "humpback.evaluation.cli", "humpback.loop.cli", "trainer.cli",
)


# Every settings model, in the order `humpback settings` lists them (tests/test_docs.py finds any model
# missing here).
SETTINGS = (
    "services.config:ServeConfig", "services.config:ServeSettings", "services.config:ServerSpec",
    "services.config:SwapSettings", "services.launch:LaunchSettings",
    "client.fanout:FanoutConfig", "client.prepare:PrepareConfig", "client.shard:ClusterSettings", "client.augment:AugmentConfig",
    "client.curate:CurateConfig", "client.cli:CorpusFiles", "client.cli:AugmentFiles", "client.cli:CurateFiles",
    "client.cli:ExportAugmentFiles", "client.cli:ExportCurateFiles", "client.cli:ImportFiles",
    "client.cli:MergeFiles", "client.rewrite:RewriteConfig", "client.cli:RewriteFiles", "client.cli:ExportRewriteFiles",
    "client.preferences:PreferenceConfig", "client.cli:PreferenceFiles", "client.dataset:DatasetFiles",
    "trainer.config:ServiceSettings", "trainer.config:Preset",
    "humpback.data.build:BuildConfig", "humpback.data.cli:Oasst1Source",
    "humpback.evaluation.cli:Server", "humpback.evaluation.cli:Run", "humpback.evaluation.cli:SystemTag",
    "humpback.evaluation.cli:IFEvalInput", "humpback.evaluation.cli:PairwiseSides",
    "humpback.evaluation.common:GenerationConfig", "humpback.evaluation.pairwise:PairwiseConfig",
    "humpback.evaluation.cli:StageRun", "humpback.evaluation.scorer:ScorerEvalConfig",
    "humpback.loop.cli:RunArgs", "humpback.loop.config:RunConfig", "humpback.loop.config:DataConfig",
    "humpback.loop.config:ServicesConfig", "humpback.loop.config:TrainConfig", "humpback.loop.config:CurateSection",
    "humpback.loop.config:RewriteSection", "humpback.loop.config:EvalSection",
)
DEBUG_HELP = "show the traceback of an error instead of its one line (docs/contracts.md, Exit statuses)"
TABLE_START = "<!-- settings-table"
TABLE_END = "<!-- /settings-table -->"


def settings_models() -> list[type]:
    models = []
    for ref in SETTINGS:
        module, _, name = ref.partition(":")
        models.append(getattr(importlib.import_module(module), name))
    return models


def run_defaults() -> dict[str, object]:
    """Where `humpback run` uses other defaults than the classes of its sections declare (the CPU demo's
    values, `humpback.loop.config.DEMO`): "module.Class.field" -> the value a run gets."""
    from pydantic import BaseModel

    from humpback.loop.config import RunConfig

    run = RunConfig()
    found: dict[str, object] = {}
    for section in RunConfig.model_fields:
        value = getattr(run, section)
        if isinstance(value, BaseModel):
            cls = type(value)
            found.update({f"{cls.__module__}.{cls.__name__}.{name}": getattr(value, name)
                          for name, field in cls.model_fields.items()
                          if getattr(value, name) != field.get_default(call_default_factory=True)})
    return found


def settings_markdown() -> str:
    """The settings table of the docs: every setting, with `humpback run`'s own defaults beside the classes'."""
    from humpback.settings import settings_table

    return settings_table(settings_models(), run_defaults())


def _settings(args: argparse.Namespace) -> int:
    table = settings_markdown()
    if args.write is None:
        print(table, end="")
        return 0
    text = args.write.read_text(encoding="utf-8")
    start = text.index("\n", text.index(TABLE_START)) + 1
    end = text.index(TABLE_END)
    args.write.write_text(text[:start] + table + text[end:], encoding="utf-8")
    print(f"{args.write}: settings table rewritten ({table.count(chr(10)) - 2} settings)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="humpback", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name.split(".")[0]):
                continue
            raise
        module.register(sub)
    p = sub.add_parser("settings", help="every setting: where it is declared, its flag, environment variable and default")
    p.add_argument("--write", type=Path, default=None, metavar="FILE.md",
                   help="rewrite the settings table between the markers of FILE.md instead of printing it")
    p.set_defaults(func=_settings)
    for command in commands(parser).values():
        # After the command too (`humpback run --debug`); SUPPRESS: when not given there, the value
        # given before the command (or its default) stays.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def commands(parser: argparse.ArgumentParser,
             prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command `parser` runs, by its words (("eval", "pairwise"), ...): the leaves of its subparsers."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix: parser}
    return {words: leaf for name, child in subs[0].choices.items()
            for words, leaf in commands(child, (*prefix, name)).items()}


# A user's path that cannot be opened, and why, in words.
_UNOPENABLE = {FileNotFoundError: "no such file", IsADirectoryError: "is a folder, not a file",
               NotADirectoryError: "a part of the path is not a folder", PermissionError: "permission denied"}


def failure(exc: BaseException) -> tuple[int, list[str]] | None:
    """The exit status and the lines (without their `humpback: error: ` prefix) of an error that ends a
    command, or None for a bug (its traceback is what helps). The status is the error class's
    `exit_code` (humpback.contracts.errors, the one table); a flag's or config's value pydantic refuses,
    and a user's path that cannot be opened, are bad input (2); a full disk is the environment's (4)."""
    from pydantic import ValidationError

    from humpback.contracts import HumpbackError

    if isinstance(exc, HumpbackError):
        return exc.exit_code, str(exc).splitlines() or [type(exc).__name__]
    if isinstance(exc, ValidationError):  # a flag's value the config refuses (say, --shard 4/4)
        return 2, [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    for kind, why in _UNOPENABLE.items():
        if isinstance(exc, kind):
            return 2, [f"{exc.filename}: {why}; check the path"]
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return 4, [f"{exc.filename or 'an output'}: cannot write (No space left on device); free space and run again"]
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        found = None if args.debug else failure(exc)
        if found is None:
            raise
        code, lines = found
        for line in lines:
            print(f"humpback: error: {line}", file=sys.stderr)
        return code
