"""The settings machinery: flags generated from fields, values from flag > environment > default."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ValidationError

from humpback.settings import add_arguments, env_vars, flags, from_args, parser_flags, setting


class Example(BaseModel):
    endpoint: list[str] = setting(default_factory=lambda: ["http://a"], help="server URL, repeatable")
    corpus: list[Path] = setting(default_factory=list, help="input files", many="+")
    timeout: float = setting(600.0, "seconds per request", gt=0)
    api_key: str | None = setting(None, "bearer token", env="HUMPBACK_TEST_SETTING_KEY")
    mode: Literal["logprobs", "free_text"] = setting("logprobs", "scoring mode")
    progress: bool = setting(True, "show a progress bar")
    boilerplate: bool = setting(True, "drop boilerplate", flag="boilerplate-filter")
    models: dict[str, Path] = setting(default_factory=dict, help="extra models")
    internal: int = setting(3, "not on the command line", cli=False)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p, Example)
    return p.parse_args(argv)


def test_every_field_with_a_flag_and_every_flag_with_a_field() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, Example)
    expected = set(flags(Example)) | {"--no-progress", "--no-boilerplate-filter"}
    assert parser_flags(p) == expected
    assert "--internal" not in expected and "--boilerplate-filter" in expected


def test_defaults_flags_and_types() -> None:
    assert from_args(Example, _parse([])) == Example()
    cfg = from_args(Example, _parse(["--endpoint", "http://x", "--endpoint", "http://y", "--corpus", "a", "b",
                                     "--timeout", "5", "--mode", "free_text", "--no-progress",
                                     "--no-boilerplate-filter", "--models", "m=/w"]))
    assert cfg.endpoint == ["http://x", "http://y"] and cfg.corpus == [Path("a"), Path("b")]
    assert (cfg.timeout, cfg.mode, cfg.progress, cfg.boilerplate) == (5.0, "free_text", False, False)
    assert cfg.models == {"m": Path("/w")}


def test_flag_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_args(Example, _parse([])).api_key is None
    monkeypatch.setenv("HUMPBACK_TEST_SETTING_KEY", "from-env")
    assert from_args(Example, _parse([])).api_key == "from-env"
    assert from_args(Example, _parse(["--api-key", "from-flag"])).api_key == "from-flag"
    assert env_vars(Example) == {"HUMPBACK_TEST_SETTING_KEY": "Example.api_key"}


def test_constraints_and_choices_are_enforced() -> None:
    with pytest.raises(ValidationError):
        from_args(Example, _parse(["--timeout", "0"]))
    with pytest.raises(SystemExit):
        _parse(["--mode", "other"])
