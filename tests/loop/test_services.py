"""How a run starts the trainer: its settings reach it in a private file, its API key in its environment,
neither in argv, and the key never in the file (which is copied with the run folder)."""

from __future__ import annotations

import stat
from pathlib import Path

from humpback.contracts import API_KEY_ENV
from humpback.loop import services
from humpback.loop.config import ServicesConfig
from trainer.config import ServiceSettings


class FakeProcess:
    pid = 4242
    returncode = None

    def poll(self) -> None:
        return None


def test_the_trainer_gets_its_keys_from_its_environment_not_the_file(monkeypatch, tmp_path: Path) -> None:
    argv: list[list[str]] = []
    envs: list[dict[str, str]] = []
    answers = iter([False, True])  # down before the start, healthy after it
    monkeypatch.setattr(services, "health", lambda url: next(answers))
    monkeypatch.setattr(services.subprocess, "Popen",
                        lambda cmd, **kw: argv.append(cmd) or envs.append(kw["env"]) or FakeProcess())
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    settings_path = log_dir / "trainer.settings.json"
    settings_path.write_text("{}")
    settings_path.chmod(0o644)  # left by an earlier run, readable by all
    cfg = ServicesConfig(api_key="s3cret", trainer_data_dir=tmp_path / "trainer", state_dir=tmp_path / "serve")
    services.ensure_trainer(cfg, log_dir)
    assert len(argv) == 1 and not any("s3cret" in a for a in argv[0])
    assert argv[0][-1] == str(settings_path)
    assert stat.S_IMODE(settings_path.stat().st_mode) == 0o600
    assert "s3cret" not in settings_path.read_text()
    settings = ServiceSettings.model_validate_json(settings_path.read_bytes())
    assert settings.api_key is None
    assert envs[0][API_KEY_ENV] == "s3cret"


def test_what_the_run_starts_gets_the_runs_key_not_another_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    """The key is resolved once, by the run's config: with none there (e.g. `services.api_key: null` in the
    file), the trainer and the servers the run starts get none, whatever `HUMPBACK_API_KEY` holds."""
    monkeypatch.setenv(API_KEY_ENV, "another-key")
    envs: list[dict[str, str]] = []
    answers = iter([False, True])
    monkeypatch.setattr(services, "health", lambda url: next(answers))
    monkeypatch.setattr(services.subprocess, "Popen", lambda cmd, **kw: envs.append(kw["env"]) or FakeProcess())
    cfg = ServicesConfig(api_key=None, trainer_data_dir=tmp_path / "trainer", state_dir=tmp_path / "serve")
    services.ensure_trainer(cfg, tmp_path / "logs")
    assert API_KEY_ENV not in envs[0]
    started: list[list[str | None]] = []
    monkeypatch.setattr(services, "health", lambda url: False)
    monkeypatch.setattr(services, "start", lambda serve, timeout: started.append([s.api_key for s in serve.servers]))
    services.ensure_servers(cfg)
    assert started == [[None, None]]
    services.ensure_servers(cfg.model_copy(update={"api_key": "run-key"}))
    assert started[-1] == ["run-key", "run-key"]
