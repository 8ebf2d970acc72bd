"""Each setting declared once: a pydantic field with its type, default, description and environment
variable; the command-line flags are generated from it (as TRL's `HfArgumentParser` and vLLM's
`EngineArgs.add_cli_args` do), so the CLI, the Python API and the docs cannot drift.

    class FanoutConfig(BaseModel):
        timeout: float = setting(600.0, "seconds per request, queueing included")
        api_key: str | None = setting(None, "bearer token", env=API_KEY_ENV)

    add_arguments(parser, FanoutConfig)          # --timeout, --api-key
    cfg = from_args(FanoutConfig, parser.parse_args())

A value comes from the flag when given, else from the field's environment variable when set, else
from the field's default. Flags are derived from the field's type:
- `bool` -> `--name/--no-name`;
- `Literal[...]` -> `choices`;
- `list[X]` -> a repeatable flag (`many="append"`, the default) or one flag taking several values
  (`many="+"`);
- `dict[str, X]` -> a repeatable `KEY=VALUE` flag;
- `X | None` -> a flag of type X.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from humpback.contracts import API_KEY_ENV

M = TypeVar("M", bound=BaseModel)

Many = Literal["append", "+"]


def setting(default: Any = PydanticUndefined, help: str = "", *, env: str | None = None, flag: str | None = None,
            many: Many = "append", cli: bool = True, metavar: str | None = None,
            default_factory: Any = None, **constraints: Any) -> Any:
    """A field of a settings model: `help` is its one description (CLI help and docs), `env` the
    environment variable that sets it, `flag` the flag name when not `--field-name`, `cli=False` keeps
    it off the command line (values only a program passes, such as a list of server specs)."""
    extra = {"env": env, "flag": flag, "many": many, "cli": cli, "metavar": metavar}
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=extra, **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def stack_api_key(use: str) -> Any:
    """The stack's one key (`HUMPBACK_API_KEY`: the model servers' /v1 routes and the trainer), as the
    setting of a process that needs it; `use` says what that process does with it. Servers the stack does
    not own (a rewriter's or a judge's URL) have settings of their own and never get this one."""
    return setting(None, f"the stack's API key: {use}", env=API_KEY_ENV)


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def env_of(field: FieldInfo) -> str | None:
    return _extra(field).get("env")


def flag_of(name: str, field: FieldInfo) -> str:
    return "--" + (_extra(field).get("flag") or name.replace("_", "-"))


def cli_fields(model: type[BaseModel], exclude: Iterable[str] = ()) -> dict[str, FieldInfo]:
    """The fields of `model` that have a flag."""
    skip = set(exclude)
    return {name: f for name, f in model.model_fields.items() if name not in skip and _extra(f).get("cli", True)}


def flags(model: type[BaseModel], exclude: Iterable[str] = ()) -> dict[str, str]:
    """flag -> field name, for every field of `model` that has one."""
    return {flag_of(name, f): name for name, f in cli_fields(model, exclude).items()}


def env_vars(*models: type[BaseModel]) -> dict[str, str]:
    """environment variable -> `Model.field`, for every field of `models` that reads one."""
    out = {}
    for model in models:
        for name, f in model.model_fields.items():
            if env_of(f):
                out[env_of(f)] = f"{model.__name__}.{name}"
    return out


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without `None`, whether None was allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _scalar(tp: Any) -> Any:
    """A callable that converts one command-line string to `tp` (pydantic validates afterwards)."""
    if tp in (int, float, Path):
        return tp
    return str


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _help(field: FieldInfo, default: Any) -> str:
    parts = [field.description or ""]
    if default is not PydanticUndefined and default not in (None, [], {}) and not isinstance(default, bool):
        parts.append(f"(default: {default})")
    if env_of(field):
        parts.append(f"[env {env_of(field)}]")
    return " ".join(p for p in parts if p).replace("%", "%%")


def add_arguments(target: Any, model: type[BaseModel], *, exclude: Iterable[str] = (),
                  defaults: Mapping[str, Any] | None = None, required: Iterable[str] = ()) -> None:
    """Add one flag per field of `model` to `target` (a parser or an argument group).

    `defaults` overrides a field's default for this command only (e.g. the scorer's URL for
    `curate`); `required` makes the listed fields' flags mandatory. Flags that are not given leave
    no attribute on the namespace, so `from_args` can tell them from an explicit value."""
    defaults = dict(defaults or {})
    need = set(required)
    for name, field in cli_fields(model, exclude).items():
        default = defaults.get(name, field.get_default(call_default_factory=True))
        tp, _ = _unwrap(field.annotation)
        origin = typing.get_origin(tp)
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(field, default)}
        if _extra(field).get("metavar"):
            kw["metavar"] = _extra(field)["metavar"]
        if name in need:
            kw["required"] = True
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kw["choices"] = [str(c) for c in typing.get_args(tp)]
        elif origin in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kw["type"] = _scalar(_unwrap(item)[0])
            if _extra(field).get("many") == "+":
                kw["nargs"] = "+"
            else:
                kw["action"] = "append"
        elif origin is dict:
            kw.update(type=_key_value, action="append", metavar=kw.get("metavar", "KEY=VALUE"))
        else:
            kw["type"] = _scalar(tp)
        target.add_argument(flag_of(name, field), **kw)


def values_from(model: type[BaseModel], args: argparse.Namespace | Mapping[str, Any],
                exclude: Iterable[str] = (), defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The values of `model`'s fields found on the command line, else in their environment variables,
    else in `defaults`; fields found nowhere are left to the model's own defaults."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    defaults = dict(defaults or {})
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name in set(exclude):
            continue
        if name in given and _extra(field).get("cli", True):
            value = given[name]
            tp, _ = _unwrap(field.annotation)
            values[name] = dict(value) if typing.get_origin(tp) is dict else value
        elif env_of(field) and os.environ.get(env_of(field)):
            values[name] = _from_env(field, os.environ[env_of(field)])
        elif name in defaults:
            values[name] = defaults[name]
    return values


def _from_env(field: FieldInfo, raw: str) -> Any:
    tp, _ = _unwrap(field.annotation)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if origin is dict:
        return dict(_key_value(item.strip()) for item in raw.split(",") if item.strip())
    return raw


def env_values(model: type[BaseModel]) -> dict[str, Any]:
    """The values the environment sets for `model`'s fields, nested settings models included (for
    settings read from a file, where the environment ranks between the file and the defaults)."""
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        tp, _ = _unwrap(field.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if nested := env_values(tp):
                values[name] = nested
        elif env_of(field) and os.environ.get(env_of(field)):
            values[name] = _from_env(field, os.environ[env_of(field)])
    return values


def from_args(model: type[M], args: argparse.Namespace | Mapping[str, Any], *, exclude: Iterable[str] = (),
              defaults: Mapping[str, Any] | None = None, **values: Any) -> M:
    """An instance of `model` from the parsed flags (see `values_from`); keyword `values` win."""
    return model.model_validate({**values_from(model, args, exclude, defaults), **values})


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option a parser takes (its `--no-x` twins included) but those every command takes
    (`--help`, and `--debug` of `humpback.cli`), for tests that hold the CLI against the settings."""
    return {s for action in parser._actions for s in action.option_strings
            if s.startswith("--") and s not in ("--help", "--debug")}


def _shown(default: Any) -> Any:
    """A default as the docs show it: paths under the working directory relative to it, so the table
    reads the same on every machine."""
    if isinstance(default, Path) and default.is_absolute() and default.is_relative_to(Path.cwd()):
        return default.relative_to(Path.cwd())
    return default


def _default_cell(default: Any) -> str:
    default = _shown(default)
    if isinstance(default, BaseModel):  # a section: its own rows give each default, with the run's where it differs
        return f"`{type(default).__name__}`"
    return "" if default is PydanticUndefined else f"`{default!s}`" if default not in ("", None) else str(default)


def settings_table(models: Iterable[type[BaseModel]], run_defaults: Mapping[str, Any] | None = None) -> str:
    """A Markdown table of every setting of `models`: where it is declared, its flag, environment
    variable, default and description (what `humpback settings` prints, and `--write FILE.md` puts in the docs).
    `run_defaults` ("module.Class.field" -> value): where `humpback run` uses another default than the
    class's, shown beside it."""
    rows = ["| setting | flag | environment | default | description |", "|---|---|---|---|---|"]
    for model in models:
        for name, field in model.model_fields.items():
            ref = f"{model.__module__}.{model.__name__}.{name}"
            default = _default_cell(field.get_default(call_default_factory=True))
            if run_defaults and ref in run_defaults:
                default = f"{default} (`humpback run`: {_default_cell(run_defaults[ref])})"
            flag = flag_of(name, field) if _extra(field).get("cli", True) else ""
            cells = (f"`{ref}`", f"`{flag}`" if flag else "", f"`{env_of(field)}`" if env_of(field) else "",
                     default, (field.description or "").replace("|", "\\|").replace("\n", " "))
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
