"""`humpback trainer serve`: one flag per `ServiceSettings` field, values from flag > environment > default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from humpback.contracts import API_KEY_ENV
from humpback.settings import flags, from_args, parser_flags
from tests.subcommand import subcommand
from trainer.config import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def _settings(argv: list[str]) -> ServiceSettings:
    return from_args(ServiceSettings, subcommand("trainer", "serve").parse_args(argv))


def test_every_field_has_a_flag_and_every_flag_a_field() -> None:
    assert parser_flags(subcommand("trainer", "serve")) == set(flags(ServiceSettings))
    assert {"--model", "--api-key", "--default-preset", "--accelerate-config"} <= set(
        flags(ServiceSettings))


def test_one_key_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert _settings([]).api_key is None
    monkeypatch.setenv(API_KEY_ENV, "stack-key")
    assert _settings([]).api_key == "stack-key"
    assert _settings(["--api-key", "flag-key"]).api_key == "flag-key"
    # One key: the trainer requires it and sends it to the servers it deploys to.
    assert "--server-api-key" not in parser_flags(subcommand("trainer", "serve"))


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


def test_without_a_key_only_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert _settings(["--host", host]).host == host
    for host in ("0.0.0.0", "::", "192.168.1.5", "trainer.example"):
        with pytest.raises(ValidationError, match=f"no API key.*{API_KEY_ENV}"):
            _settings(["--host", host])
    # An unset compose variable arrives empty: that is no key either.
    monkeypatch.setenv(API_KEY_ENV, "")
    with pytest.raises(ValidationError, match=API_KEY_ENV):
        _settings(["--host", "0.0.0.0"])
    assert _settings([]).api_key is None
    monkeypatch.setenv(API_KEY_ENV, "stack-key")
    assert _settings(["--host", "0.0.0.0"]).host == "0.0.0.0"


@pytest.mark.parametrize("how", ["cli", "settings file"])
def test_a_public_address_without_a_key_is_refused_at_start(how: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if how == "cli":
        argv = ["-m", "humpback", "trainer", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")]
    else:
        # What `humpback run` writes; its `host` is loopback, so this file is edited by hand.
        settings = tmp_path / "settings.json"
        settings.write_text(json.dumps({"host": "0.0.0.0", "data_dir": str(tmp_path / "d")}))
        argv = ["-m", "trainer.api", str(settings)]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0
    assert f"no API key, so it listens on loopback only, not on '0.0.0.0': set {API_KEY_ENV}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "d").exists()
