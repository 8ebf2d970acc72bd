"""`humpback serve ...`: every flag is a settings field of services.config and every field a flag."""

from __future__ import annotations

import argparse

import pytest
from pydantic import BaseModel

from humpback.contracts import API_KEY_ENV, DEFAULT_PORTS
from humpback.settings import flags, parser_flags
from services.cli import _state_dir, register, up_config
from services.config import PER_ROLE, ServeConfig, ServerSpec, ServeSettings, SwapSettings


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="humpback")
    register(parser.add_subparsers(dest="command"))
    serve = next(a for a in parser._subparsers._group_actions if "serve" in a.choices).choices["serve"]
    return dict(serve._subparsers._group_actions[0].choices)


def _expected(*models: tuple[type[BaseModel], tuple[str, ...]]) -> set[str]:
    """The flags of `models` (less the excluded fields), with the `--no-x` twin of every bool."""
    out: set[str] = set()
    for model, exclude in models:
        for flag, name in flags(model, exclude).items():
            out.add(flag)
            if model.model_fields[name].annotation in (bool, bool | None):
                out.add("--no-" + flag.removeprefix("--"))
    return out


STATE_ONLY = (ServeConfig, ("admin_allow",))


@pytest.mark.parametrize(("command", "models", "own"), [
    ("up", [(ServeConfig, ()), (ServeSettings, ()), (ServerSpec, PER_ROLE)], set()),
    ("status", [STATE_ONLY], {"--json"}),
    ("down", [STATE_ONLY], set()),
    ("swap", [STATE_ONLY, (SwapSettings, ())], set()),
])
def test_every_flag_is_a_field_and_every_field_a_flag(command, models, own):
    assert parser_flags(_commands()[command]) == _expected(*models) | own


def test_flags_that_scripts_and_tests_use_keep_their_names():
    used = {"--state-dir", "--api-key", "--backward-model", "--scorer-model", "--backward-port", "--scorer-port",
            "--kv-cache-bytes", "--admin-allow", "--vllm-arg", "--timeout", "--host"}
    assert used <= parser_flags(_commands()["up"])


def test_up_builds_one_spec_per_role_from_the_flags(monkeypatch, tmp_path):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = _commands()["up"].parse_args([
        "--state-dir", str(tmp_path), "--scorer-port", "9", "--kv-cache-bytes", "2G",
        "--vllm-arg=--enforce-eager", "--admin-allow", "10.0.0.0/8", "--host", "0.0.0.0",
    ])
    cfg, settings = up_config(args)
    assert [(s.role, s.port) for s in cfg.servers] == [("backward", DEFAULT_PORTS["backward"]), ("scorer", 9)]
    assert all(s.api_key == "from-env" and s.kv_cache_bytes == "2G" and s.host == "0.0.0.0" for s in cfg.servers)
    assert all(s.extra_args == ["--enforce-eager"] for s in cfg.servers)
    assert (cfg.state_dir, cfg.admin_allow, settings.timeout) == (tmp_path, ["10.0.0.0/8"], 900.0)


def test_state_dir_from_flag_else_environment(monkeypatch, tmp_path):
    down = _commands()["down"]
    monkeypatch.setenv("HUMPBACK_STATE_DIR", str(tmp_path / "env"))
    assert _state_dir(down.parse_args([])) == tmp_path / "env"
    assert _state_dir(down.parse_args(["--state-dir", str(tmp_path / "flag")])) == tmp_path / "flag"
