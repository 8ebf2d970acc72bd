"""`humpback trainer serve`: one flag per `ServiceSettings` field, values from flag > environment > default."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from humpback.contracts import API_KEY_ENV
from humpback.settings import flags, from_args, parser_flags
from tests.subcommand import subcommand
from trainer.config import ServiceSettings


def _settings(argv: list[str]) -> ServiceSettings:
    return from_args(ServiceSettings, subcommand("trainer", "serve").parse_args(argv))


def test_every_field_has_a_flag_and_every_flag_a_field() -> None:
    assert parser_flags(subcommand("trainer", "serve")) == set(flags(ServiceSettings))
    assert {"--model", "--api-key", "--server-api-key", "--default-preset", "--accelerate-config"} <= set(
        flags(ServiceSettings))


def test_one_key_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert (_settings([]).api_key, _settings([]).server_api_key) == (None, None)
    monkeypatch.setenv(API_KEY_ENV, "stack-key")
    assert (_settings([]).api_key, _settings([]).server_api_key) == ("stack-key", "stack-key")
    flagged = _settings(["--api-key", "trainer-key", "--server-api-key", "server-key"])
    assert (flagged.api_key, flagged.server_api_key) == ("trainer-key", "server-key")


def test_models_presets_and_types() -> None:
    s = _settings(["--model", "tiny=models/x", "--model", "big=/w/big", "--port", "9100", "--swap-timeout", "5"])
    assert s.models == {"tiny": Path("models/x"), "big": Path("/w/big")}
    assert (s.port, s.swap_timeout, s.default_preset) == (9100, 5.0, "paper-lora")
    assert s.base_models() == {"backward": s.backward_model, "scorer": s.scorer_model, **s.models}
    assert _settings(["--default-preset", "cpu-test"]).default_preset == "cpu-test"
    with pytest.raises(SystemExit):
        _settings(["--default-preset", "nope"])
    with pytest.raises(SystemExit):
        _settings(["--model", "no-path"])
    with pytest.raises(ValidationError):
        ServiceSettings(default_preset="nope")
