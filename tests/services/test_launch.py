"""How a server is launched: vLLM's command line, environment, core binding and restore after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from services.config import ServerSpec, cpu_binds, default_servers
from services.launch import FALLBACK_CHAT_TEMPLATE, model_to_serve, reap_previous, vllm_argv, vllm_env
from services.registry import Registry, record_swap
from tests.services.helpers import linked_checkpoint


def test_cpu_binds_are_disjoint():
    assert cpu_binds(2, 2) == ["0", "1"]
    assert cpu_binds(2, 16) == ["0-7", "8-15"]
    assert cpu_binds(2, 1) == ["0", "0"]


def test_default_servers_bind_distinct_cores_on_cpu():
    specs = default_servers()
    assert [s.role for s in specs] == ["backward", "scorer"]
    assert [s.port for s in specs] == [8001, 8002]
    assert all(s.host == "127.0.0.1" for s in specs)
    if all(s.device == "cpu" for s in specs):
        binds = [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs]
        assert len(set(binds)) == len(binds) or (os.cpu_count() or 1) < 2


def test_argv_serves_role_with_guard_and_sized_cache(model_dir):
    spec = ServerSpec(role="scorer", port=9, device="cpu", model=str(model_dir))
    argv = vllm_argv(spec, str(model_dir))
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--served-model-name") + 1] == "scorer"
    assert argv[argv.index("--middleware") + 1] == "services.guard.AdminGuard"
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == "1G"
    assert "--enable-lora" not in argv and "--chat-template" not in argv


def test_gpu_argv_enables_lora_and_memory_fraction(model_dir):
    spec = ServerSpec(role="backward", port=9, device="cuda", model=str(model_dir))
    argv = vllm_argv(spec, str(model_dir))
    assert "--enable-lora" in argv and "--gpu-memory-utilization" in argv
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


def test_restart_restores_the_served_checkpoint(model_dir, tmp_path):
    registry = tmp_path / "registry.json"
    spec = ServerSpec(role="scorer", port=9, device="cpu", model=str(model_dir))
    ckpt = linked_checkpoint(model_dir, tmp_path / "m1")
    record_swap(registry, "scorer", "m1", str(ckpt), "reload", "ft:m1")
    assert model_to_serve(spec, registry) == str(ckpt)
    assert Registry.load(registry).roles["scorer"].version == "m1"
    # A checkpoint that no longer validates: back to the base, and the registry says so.
    (ckpt / "model.safetensors").unlink()
    assert model_to_serve(spec, registry) == str(model_dir)
    assert Registry.load(registry).roles["scorer"].version == "base"


def test_reap_previous_kills_the_old_process_group(tmp_path):
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    pgid_file = tmp_path / "scorer.pgid"
    pgid_file.write_text(str(orphan.pid))
    reap_previous(pgid_file)
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert pgid_file.read_text() == str(os.getpgrp())
