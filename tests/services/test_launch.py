"""How a server is launched: vLLM's command line, environment, core binding and restore after a crash."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys

import pytest
from pydantic import ValidationError

from humpback.contracts import API_KEY_ENV
from humpback.settings import flags, parser_flags
from services.config import ServeConfig, ServerSpec, ServeSettings, cpu_binds, default_servers
from services.launch import (
    FALLBACK_CHAT_TEMPLATE, FORWARDED_ALLOW_IPS_ENV, LaunchSettings, model_to_serve, parser, reap_previous, resolve,
    vllm_argv, vllm_env,
)
from services.supervisor import _conf, start_order, write_state
from services.registry import Registry, record_swap
from tests.services.helpers import linked_checkpoint


def test_cpu_binds_are_disjoint():
    assert cpu_binds(2, 2) == ["0", "1"]
    assert cpu_binds(2, 16) == ["0-7", "8-15"]
    assert cpu_binds(2, 1) == ["0", "0"]


def test_default_servers_share_every_core_on_cpu_or_split_them():
    specs = default_servers()
    assert [s.role for s in specs] == ["backward", "scorer"]
    assert [s.port for s in specs] == [8001, 8002]
    assert all(s.host == "127.0.0.1" for s in specs)
    every_core = f"0-{os.cpu_count() - 1}" if (os.cpu_count() or 1) > 1 else "0"
    shared = default_servers(device="cpu")
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in shared] == [every_core, every_core]
    split = default_servers(ServeSettings(cpu_binding="split"), device="cpu")
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in split] == cpu_binds(2)


def test_argv_serves_role_with_guard_and_sized_cache(model_dir):
    spec = ServerSpec(role="scorer", port=9, device="cpu", model=str(model_dir))
    argv = vllm_argv(spec, str(model_dir))
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--served-model-name") + 1] == "scorer"
    assert argv[argv.index("--middleware") + 1] == "services.guard.AdminGuard"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == "1G"
    assert "--enable-lora" not in argv and "--chat-template" not in argv


def test_gpu_argv_enables_lora_and_memory_fraction(model_dir):
    spec = ServerSpec(role="backward", port=9, device="cuda", model=str(model_dir), max_loras=3)
    argv = vllm_argv(spec, str(model_dir))
    assert "--enable-lora" in argv and argv[argv.index("--max-loras") + 1] == "3"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45"
    assert "--kv-cache-memory-bytes" not in argv


def test_base_model_without_chat_template_gets_the_fallback(model_dir, tmp_path):
    folder = linked_checkpoint(model_dir, tmp_path / "base")
    (folder / "chat_template.jinja").unlink()
    argv = vllm_argv(ServerSpec(role="backward", port=9, device="cpu"), str(folder))
    assert argv[argv.index("--chat-template") + 1] == str(FALLBACK_CHAT_TEMPLATE)


def test_api_key_travels_in_env_not_argv(model_dir, tmp_path):
    spec = ServerSpec(role="scorer", port=9, device="cpu", api_key="s3cret")
    assert "s3cret" not in " ".join(vllm_argv(spec, str(model_dir)))
    env = vllm_env(spec, tmp_path / "registry.json", ["10.0.0.0/8"])
    assert env["VLLM_API_KEY"] == "s3cret"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["HUMPBACK_ADMIN_ALLOW"] == "10.0.0.0/8"


def test_uvicorn_trusts_no_forwarding_peer_whatever_the_spec(monkeypatch, tmp_path):
    monkeypatch.setenv(FORWARDED_ALLOW_IPS_ENV, "*")
    spec = ServerSpec(role="scorer", port=9, device="cpu", env={FORWARDED_ALLOW_IPS_ENV: "127.0.0.1"})
    assert vllm_env(spec, tmp_path / "registry.json", [])[FORWARDED_ALLOW_IPS_ENV] == ""


@pytest.mark.parametrize("extra", [["--api-key", "s3cret"], ["--api-key=s3cret"], ["--api_key=s3cret"],
                                   ["--api_key", "s3cret"], ["--api-ke=s3cret"], ["--api-k", "s3cret"]])
def test_api_key_is_refused_as_a_vllm_argument(extra):
    """Every spelling vLLM reads as --api-key: `_` for `-`, and an unambiguous prefix."""
    with pytest.raises(ValidationError, match=API_KEY_ENV):
        ServerSpec(role="scorer", port=9, extra_args=["--enforce-eager", *extra])
    with pytest.raises(SystemExit):
        resolve(["--role", "scorer", "--port", "9", *(f"--vllm-arg={a}" for a in extra)])


def test_options_that_only_look_like_the_key_pass():
    spec = ServerSpec(role="scorer", port=9, extra_args=["--api-server-count=2", "--max-num-seqs=8"])
    assert spec.extra_args == ["--api-server-count=2", "--max-num-seqs=8"]


def test_state_files_are_private_and_the_supervisor_config_holds_no_key(tmp_path):
    state = tmp_path / "serve"
    cfg = ServeConfig(state_dir=state, servers=default_servers(api_key="s3cret"))
    # Files left by an older `up`, readable by all: replaced, not kept with their mode.
    for path in (state / "serve.json", *(cfg.spec_path(s.role) for s in cfg.servers)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        path.chmod(0o644)
    state.chmod(0o755)
    conf = write_state(cfg)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in (state / "serve.json", *(cfg.spec_path(s.role) for s in cfg.servers)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The launcher and `serve swap` read the key from these files; `ps` shows only the config's commands.
    assert all(ServerSpec.model_validate_json(cfg.spec_path(s.role).read_bytes()).api_key == "s3cret"
               for s in cfg.servers)
    assert ServeConfig.model_validate_json((state / "serve.json").read_bytes()) == cfg
    assert "s3cret" not in conf.read_text()
    assert not [p for p in state.rglob("*") if p.name.startswith(".")]  # no temp file left


def test_restart_restores_the_served_checkpoint(model_dir, tmp_path):
    registry = tmp_path / "registry.json"
    spec = ServerSpec(role="scorer", port=9, device="cpu", model=str(model_dir))
    ckpt = linked_checkpoint(model_dir, tmp_path / "m1")
    record_swap(registry, "scorer", "m1", str(ckpt), "reload", "ft:m1")
    assert model_to_serve(spec, registry) == str(ckpt)
    assert Registry.load(registry).servers["scorer"].version == "m1"
    # A checkpoint that no longer validates: back to the base, and the registry says so.
    (ckpt / "model.safetensors").unlink()
    assert model_to_serve(spec, registry) == str(model_dir)
    assert Registry.load(registry).servers["scorer"].version == "base"


def test_reap_previous_kills_the_old_process_group(tmp_path):
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    pgid_file = tmp_path / "scorer.pgid"
    pgid_file.write_text(str(orphan.pid))
    reap_previous(pgid_file)
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert pgid_file.read_text() == str(os.getpgrp())


def test_launcher_flags_are_the_fields_of_its_settings_and_the_spec():
    bools = {"--no-enable-lora"}
    assert parser_flags(parser()) == set(flags(LaunchSettings)) | set(flags(ServerSpec)) | bools


def test_spec_from_flags_and_the_key_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    launch, spec = resolve([
        "--role", "scorer", "--port", "8000", "--device", "cuda", "--max-loras", "3", "--no-enable-lora",
        "--registry", str(tmp_path / "r.json"), "--admin-allow", "10.0.0.0/8", "--vllm-arg=--enforce-eager",
    ])
    assert (launch.spec_file, launch.registry, launch.admin_allow) == (None, tmp_path / "r.json", ["10.0.0.0/8"])
    assert (spec.role, spec.port, spec.device, spec.max_loras, spec.lora) == ("scorer", 8000, "cuda", 3, False)
    assert (spec.api_key, spec.extra_args) == ("from-env", ["--enforce-eager"])


def test_without_a_spec_file_role_and_port_are_required(capsys):
    with pytest.raises(SystemExit) as exc:
        resolve(["--role", "scorer"])
    assert exc.value.code == 2 and "port" in capsys.readouterr().err


def test_the_supervisor_command_launches_the_written_spec(tmp_path):
    specs = default_servers()
    cfg = ServeConfig(state_dir=tmp_path, servers=specs, admin_allow=["10.0.0.0/8", "192.168.0.0/16"])
    commands = [line.removeprefix("command=") for line in _conf(cfg).splitlines() if line.startswith("command=")]
    assert len(commands) == len(specs)
    for spec, command in zip(specs, commands):
        cfg.spec_path(spec.role).parent.mkdir(parents=True, exist_ok=True)
        cfg.spec_path(spec.role).write_text(spec.model_dump_json())
        argv = shlex.split(command)
        assert argv[:3] == [sys.executable, "-m", "services.launch"]
        launch, launched = resolve(argv[3:])
        assert launched == spec and launch.spec_file == cfg.spec_path(spec.role)
        assert (launch.registry, launch.admin_allow) == (cfg.registry, cfg.admin_allow)


def test_cpu_servers_of_one_model_start_after_the_first():
    one, other = "/models/a", "/models/b"
    specs = [ServerSpec(role="backward", port=1, model=one), ServerSpec(role="scorer", port=2, model=one),
             ServerSpec(role="scorer", replica=1, port=3, model=other),
             ServerSpec(role="backward", replica=1, port=4, model=other),
             ServerSpec(role="scorer", replica=2, port=5, model=one, device="cuda"),
             ServerSpec(role="backward", replica=2, port=6, model=one, device="cuda")]
    first, later = start_order(specs)
    assert [s.port for s in first] == [1, 3, 5, 6]  # GPUs compile on their own devices: all at once
    assert [s.port for s in later] == [2, 4]


def test_the_supervisor_autostarts_only_the_first(tmp_path):
    cfg = ServeConfig(state_dir=tmp_path, servers=default_servers())
    programs = [line for line in _conf(cfg).splitlines() if line.startswith(("[program:", "autostart="))]
    assert programs == ["[program:backward]", "autostart=true", "[program:scorer]", "autostart=false"]


def test_cpu_servers_keep_the_compile_cache_loadable(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    cpu, gpu = ServerSpec(role="scorer", port=1), ServerSpec(role="scorer", port=1, device="cuda")
    assert vllm_env(cpu, tmp_path / "r.json", [])["VLLM_USE_AOT_COMPILE"] == "0"
    assert "VLLM_USE_AOT_COMPILE" not in vllm_env(gpu, tmp_path / "r.json", [])
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")  # the user's word stands
    assert vllm_env(cpu, tmp_path / "r.json", [])["VLLM_USE_AOT_COMPILE"] == "1"


def test_start_returns_once_the_first_answer_with_the_others_started(tmp_path, monkeypatch):
    """`start` waits for the first servers only; the function it returns waits for the others."""
    import services.supervisor as supervisor

    cfg = ServeConfig(state_dir=tmp_path, servers=default_servers())
    calls: list[tuple] = []

    class Supervisor:
        def startProcess(self, name, wait):  # noqa: N802 (supervisord's XML-RPC name)
            calls.append(("start", name))

    monkeypatch.setattr(supervisor, "health", lambda url: False)
    monkeypatch.setattr(supervisor.subprocess, "run", lambda *a, **k: calls.append(("supervisord",)))
    monkeypatch.setattr(supervisor, "rpc", lambda state_dir: type("Proxy", (), {"supervisor": Supervisor()})()
                        if calls else None)
    monkeypatch.setattr(supervisor, "wait_healthy",
                        lambda cfg, servers, started, timeout: calls.append(("wait", [s.name for s in servers])))
    waiting = supervisor.start(cfg, timeout=5)
    assert calls == [("supervisord",), ("wait", ["backward"]), ("start", "scorer")]
    waiting()
    assert calls[-1] == ("wait", ["scorer"])


def test_a_model_path_that_does_not_exist_is_refused_before_anything_starts(tmp_path, capsys):
    for missing in ("/nonexistent/model", "./models/typo", "~/no-such-model"):
        with pytest.raises(ValidationError, match=f"no model folder {missing}"):
            ServeSettings(backward_model=missing)
    assert ServeSettings(scorer_model="HuggingFaceTB/SmolLM2-135M-Instruct").scorer_model.startswith("Hugging")
    assert ServeSettings(scorer_model=str(tmp_path)).scorer_model == str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "humpback", "serve", "up", "--state-dir", str(tmp_path / "s"),
                          "--backward-model", "/nonexistent/model"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["humpback: error: backward_model: Value error, no model folder "
                                               "/nonexistent/model"]
    assert not (tmp_path / "s").exists()
