"""The GPU deployment (compose.yaml, compose.env.example, trainer/Dockerfile), checked offline.

Two layers:
- a real Compose implementation validates the file against the compose-spec schema and interpolates
  it (`docker compose config`, else Debian's `docker-compose config`; skipped when neither exists);
- structural assertions on `yaml.safe_load` of the file, interpolated here twice: with no `.env` (the
  defaults) and with compose.env.example as `.env`.
Nothing talks to a Docker daemon.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / "compose.env.example"
DOCKERFILE = ROOT / "trainer" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVERS = ("backward", "scorer")
GPU_SERVICES = (*SERVERS, "trainer")
HEALTH_PORTS = {"backward": 8000, "scorer": 8000, "trainer": 8100}
GUARDED_ROUTES_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}; `$$` is a literal `$`.
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------- helpers


def parse_env_file(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """VAR=value pairs, and the comment lines directly above each."""
    values: dict[str, str] = {}
    comments: dict[str, list[str]] = {}
    block: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
        elif not stripped:
            block = []
        else:
            name, sep, value = stripped.partition("=")
            assert sep, f"{path.name}: not VAR=value: {line!r}"
            values[name.strip()] = value.strip()
            comments[name.strip()] = block
            block = []
    return values, comments


def interpolate(node, env: dict[str, str]):
    """Compose's variable substitution over a loaded document."""
    if isinstance(node, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise KeyError(f"{name} is required: {arg}")
        return value or ""

    parts = node.split("$$")
    return "$".join(VAR_RE.sub(sub, p) for p in parts)


def variables(node) -> dict[str, set[str | None]]:
    """Every ${VAR} in a loaded document (keys and values) and the `:-`/`-` defaults it is given."""
    found: dict[str, set[str | None]] = {}
    children = [*node.keys(), *node.values()] if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        for name, defaults in variables(child).items():
            found.setdefault(name, set()).update(defaults)
    if isinstance(node, str):
        for m in VAR_RE.finditer(node.replace("$$", "")):
            found.setdefault(m.group(1), set()).add(m.group(3) if m.group(2) in (":-", "-") else None)
    return found


def duration_s(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value))
    assert parts and "".join(a + b for a, b in parts) == str(value), f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def size_bytes(value) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)b?", str(value).strip().lower())
    assert m, f"not a size: {value!r}"
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), short or long volume syntax."""
    out: dict[str, tuple[str, bool]] = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            mode = parts[2] if len(parts) > 2 else "rw"
            out[target] = (source, "ro" in mode.split(","))
        else:
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only", False)))
    return out


def networks_of(service: dict) -> set[str]:
    nets = service.get("networks", ["default"])
    return set(nets) if isinstance(nets, list) else set(nets.keys())


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return str(command[command.index(name) + 1])


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def subnet(doc: dict) -> str:
    configs = doc["networks"]["internal"]["ipam"]["config"]
    assert len(configs) == 1, "declare exactly one subnet on the internal network"
    return configs[0]["subnet"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def raw(text) -> dict:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)[0]


@pytest.fixture(scope="module", params=["defaults", "example-env"])
def doc(request, raw, example_env) -> dict:
    """compose.yaml as Compose resolves it without a .env, and with compose.env.example as .env."""
    return interpolate(raw, {} if request.param == "defaults" else example_env)


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def run_compose_config(env_file: Path, tmp_path: Path) -> dict:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Compose implementation (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUMPBACK_", "HF_", "COMPOSE_"))}
    proc = subprocess.run(
        [*cmd, "--env-file", str(env_file), "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, f"compose config rejected compose.yaml:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


# ---------------------------------------------------------------- a real Compose implementation


@pytest.mark.parametrize("which", ["defaults", "example-env"])
def test_compose_config_accepts_file(which, tmp_path, raw, example_env):
    env_file = tmp_path / "env"
    env_file.write_text("" if which == "defaults" else ENV_EXAMPLE.read_text())
    resolved = run_compose_config(env_file, tmp_path)
    ours = interpolate(raw, {} if which == "defaults" else example_env)
    # Our interpolation (used by every test below) agrees with Compose's.
    for name in GPU_SERVICES:
        assert [d["device_ids"] for d in gpu_devices(resolved["services"][name])] == [
            d["device_ids"] for d in gpu_devices(ours["services"][name])
        ]
        assert environment(resolved["services"][name]) == environment(ours["services"][name])
    assert subnet(resolved) == subnet(ours)
    assert resolved["networks"]["internal"].get("internal") is True


# ---------------------------------------------------------------- images and builds


def test_every_service_has_image_or_build(raw):
    for name, svc in raw["services"].items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"


def test_servers_use_pinned_official_vllm_image(raw, doc):
    for name in SERVERS:
        image = raw["services"][name]["image"]
        m = re.fullmatch(r"vllm/vllm-openai:\$\{(\w+):-(v\d+\.\d+\.\d+)\}", image)
        assert m, f"{name}: image {image!r} should be vllm/vllm-openai:${{VAR:-vX.Y.Z}}"
        assert doc["services"][name]["image"].startswith("vllm/vllm-openai:v")


def test_trainer_and_client_build_from_trainer_dockerfile(doc):
    for name in ("trainer", "client"):
        build = doc["services"][name]["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == "trainer/Dockerfile"
    assert doc["services"]["client"]["image"] == doc["services"]["trainer"]["image"]


# ---------------------------------------------------------------- GPUs


def test_gpu_reservations(raw, doc):
    ids: dict[str, list[str]] = {}
    for name in GPU_SERVICES:
        devices = gpu_devices(doc["services"][name])
        assert len(devices) == 1, f"{name}: expected one GPU reservation"
        dev = devices[0]
        assert dev["driver"] == "nvidia"
        assert "gpu" in dev["capabilities"]
        assert "count" not in dev, f"{name}: pin devices with device_ids, not count"
        ids[name] = [str(i) for i in dev["device_ids"]]
        raw_ids = gpu_devices(raw["services"][name])[0]["device_ids"]
        assert all(VAR_RE.search(str(i)) for i in raw_ids), f"{name}: device ids must come from env vars"
    assert not set(ids["backward"]) & set(ids["scorer"]), f"backward and scorer share a GPU: {ids}"
    var = {n: VAR_RE.search(str(gpu_devices(raw["services"][n])[0]["device_ids"][0])).group(1) for n in GPU_SERVICES}
    assert len(set(var.values())) == 3, f"each GPU service needs its own device variable: {var}"


def test_servers_have_shared_memory(doc):
    for name in (*SERVERS, "trainer"):
        svc = doc["services"][name]
        assert svc.get("ipc") == "host" or size_bytes(svc.get("shm_size", 0)) >= 8 * 1024**3, (
            f"{name}: needs ipc: host or shm_size >= 8gb"
        )


# ---------------------------------------------------------------- health and ordering


def test_healthchecks(doc):
    for name, port in HEALTH_PORTS.items():
        hc = doc["services"][name].get("healthcheck")
        assert hc and not hc.get("disable"), f"{name}: no healthcheck"
        probe = " ".join(hc["test"]) if isinstance(hc["test"], list) else hc["test"]
        assert re.search(rf":{port}/health\b", probe), f"{name}: healthcheck must GET :{port}/health, got {probe!r}"
        assert duration_s(hc["start_period"]) >= 120, f"{name}: start_period too short for model loading"
        assert duration_s(hc["interval"]) > 0 and int(hc["retries"]) >= 1
    for name in SERVERS:
        assert duration_s(doc["services"][name]["healthcheck"]["start_period"]) >= 300


def test_depends_on_healthy(doc):
    wanted = {"trainer": {"backward", "scorer"}, "client": {"backward", "scorer", "trainer"}}
    for name, deps in wanted.items():
        dep = doc["services"][name]["depends_on"]
        assert isinstance(dep, dict), f"{name}: depends_on needs conditions"
        assert set(dep) >= deps, f"{name}: depends on {set(dep)}, wants {deps}"
        for d in deps:
            assert dep[d]["condition"] == "service_healthy", f"{name} -> {d}"


def test_client_is_one_shot(doc):
    client = doc["services"]["client"]
    assert client.get("profiles") or client.get("restart") == "no"
    assert str(client.get("restart", "no")) == "no"
    command = client["entrypoint"] + client["command"]
    assert command[:2] == ["humpback", "run"] and "--config" in command


# ---------------------------------------------------------------- networks and exposure


def test_internal_network(doc):
    nets = doc["networks"]
    assert nets["internal"].get("internal") is True
    for name in (*SERVERS, "trainer", "client"):
        svc = doc["services"][name]
        assert "network_mode" not in svc, f"{name}: network_mode bypasses the internal network"
        on = networks_of(svc)
        assert on and all(nets[n].get("internal") is True for n in on), f"{name} is on a non-internal network: {on}"


def test_no_published_ports(doc):
    for name, svc in doc["services"].items():
        assert not svc.get("ports"), f"{name} publishes ports; publishing must be an explicit opt-in"


def test_publishing_is_documented_opt_in(text):
    assert re.search(r"^\s*#\s*ports:", text, re.M), "document the opt-in ports entry as a comment"


def test_only_tools_reach_outside(doc):
    for name, svc in doc["services"].items():
        outside = {n for n in networks_of(svc) if not doc["networks"].get(n, {}).get("internal")}
        if outside:
            assert svc.get("profiles"), f"{name} reaches outside but is not an opt-in profile"
            assert not gpu_devices(svc) and not svc.get("ports")


# ---------------------------------------------------------------- vLLM servers and the guard


def test_vllm_server_command(doc, raw):
    for name in SERVERS:
        cmd = [str(c) for c in doc["services"][name]["command"]]
        assert VAR_RE.search(str(flag(raw["services"][name]["command"], "--model"))), f"{name}: --model from env"
        assert flag(cmd, "--served-model-name") == name
        assert flag(cmd, "--host") == "0.0.0.0"
        assert flag(cmd, "--port") == "8000"
        assert "--enable-lora" in cmd
        # vLLM accepts only these ranks; 16 is the trainer presets' lora_r.
        assert int(flag(cmd, "--max-lora-rank")) in {16, 32, 64, 128, 256, 320, 512}
        assert int(flag(cmd, "--max-loras")) >= 2, "two adapter versions must fit during a swap"
        assert flag(cmd, "--middleware") == "services.guard.AdminGuard"
        env = environment(doc["services"][name])
        for key, value in GUARDED_ROUTES_ENV.items():
            assert env.get(key) == value, f"{name}: {key}"


def test_api_key_wired(raw):
    for name in SERVERS:
        svc = raw["services"][name]
        via_env = "HUMPBACK_API_KEY" in str(environment(svc).get("VLLM_API_KEY"))
        via_flag = "--api-key" in svc["command"] and "HUMPBACK_API_KEY" in flag(svc["command"], "--api-key")
        assert via_env or via_flag, f"{name}: API key not wired from HUMPBACK_API_KEY"
    for name in ("trainer", "client"):
        assert "HUMPBACK_API_KEY" in str(environment(raw["services"][name]).get("HUMPBACK_API_KEY"))


def test_guard_is_mounted_and_importable(doc):
    assert "class AdminGuard" in (ROOT / "services" / "guard.py").read_text()
    for name in SERVERS:
        svc = doc["services"][name]
        source, read_only = mounts(svc)["/opt/humpback/services"]
        assert source.rstrip("/") in ("./services", str(ROOT / "services")) and read_only
        assert environment(svc)["PYTHONPATH"].split(":")[0] == "/opt/humpback"


def test_admin_allow_is_internal_subnet(raw, doc):
    assert environment(raw["services"]["backward"])["HUMPBACK_ADMIN_ALLOW"] == subnet(raw)
    for name in SERVERS:
        assert environment(doc["services"][name])["HUMPBACK_ADMIN_ALLOW"] == subnet(doc)
    assert ipaddress.ip_network(subnet(doc)).is_private


def test_registry_on_state_volume(doc):
    for name in (*SERVERS, "trainer"):
        svc = doc["services"][name]
        assert environment(svc)["HUMPBACK_REGISTRY"] == "/state/registry.json"
        assert mounts(svc)["/state"][0] == "state"
    assert not mounts(doc["services"]["trainer"])["/state"][1], "the trainer writes the registry"


# ---------------------------------------------------------------- volumes


def test_shared_volumes(doc):
    assert set(doc["volumes"]) >= {"models", "checkpoints", "hf-cache", "state"}
    where = {"models": "/models", "checkpoints": "/checkpoints", "hf-cache": "/root/.cache/huggingface", "state": "/state"}
    for name in (*SERVERS, "trainer"):
        m = mounts(doc["services"][name])
        for volume, target in where.items():
            assert m.get(target, ("",))[0] == volume, f"{name}: {volume} not at {target}"
    trainer = mounts(doc["services"]["trainer"])
    assert not trainer["/checkpoints"][1], "the trainer writes checkpoints"
    for name in SERVERS:
        assert mounts(doc["services"][name])["/checkpoints"][1], f"{name} should mount checkpoints read-only"


def test_trainer_settings(doc):
    svc = doc["services"]["trainer"]
    env = environment(svc)
    assert env["HUMPBACK_BACKWARD_URL"] == "http://backward:8000"
    assert env["HUMPBACK_SCORER_URL"] == "http://scorer:8000"
    cmd = [str(c) for c in svc.get("command", [])]
    assert flag(cmd, "--backward-url") == env["HUMPBACK_BACKWARD_URL"]
    assert flag(cmd, "--scorer-url") == env["HUMPBACK_SCORER_URL"]
    assert flag(cmd, "--registry") == env["HUMPBACK_REGISTRY"]
    data_dir = flag(cmd, "--data-dir")
    volume_targets = {t for t, (src, _) in mounts(svc).items() if src in doc["volumes"]}
    assert any(data_dir == t or data_dir.startswith(t + "/") for t in volume_targets), "data dir must be on a volume"
    # Checkpoints (<data-dir>/checkpoints/...) must resolve at the same path inside the servers.
    assert data_dir.startswith("/checkpoints")


# ---------------------------------------------------------------- settings file


def test_every_variable_documented(raw):
    values, comments = parse_env_file(ENV_EXAMPLE)
    used = variables(raw)
    missing = sorted(set(used) - set(values))
    assert not missing, f"used in compose.yaml but not in compose.env.example: {missing}"
    unused = sorted(set(values) - set(used))
    assert not unused, f"in compose.env.example but unused by compose.yaml: {unused}"
    for name in values:
        assert comments[name], f"{name}: add a comment line above it in compose.env.example"
    for name, defaults in used.items():
        assert len(defaults) == 1, f"{name} has different defaults in compose.yaml: {defaults}"
        default = next(iter(defaults))
        if default and values[name]:
            assert values[name] == default, f"{name}: example says {values[name]!r}, compose default {default!r}"


def test_no_dotenv_committed():
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    git = shutil.which("git")
    if git:
        tracked = subprocess.run([git, "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True)
        assert not tracked.stdout.strip(), ".env is tracked: it holds secrets"


# ---------------------------------------------------------------- trainer image


def test_trainer_dockerfile():
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    body = "\n".join(lines)
    from_line = next(ln for ln in lines if ln.upper().startswith("FROM "))
    assert re.search(r"vllm/vllm-openai|pytorch/pytorch|nvcr\.io/nvidia/pytorch", from_line), from_line
    assert re.search(r"pip install [^\n]*['\"]?\.\[trainer\]", body), "pip install '.[trainer]'"
    entry = next(ln for ln in lines if ln.upper().startswith("ENTRYPOINT"))
    assert yaml.safe_load(entry.split(None, 1)[1]) == [
        "humpback", "trainer", "serve", "--host", "0.0.0.0", "--port", "8100",
    ]
    assert re.search(r"HEALTHCHECK[^\n]*\n?.*:8100/health", body), "HEALTHCHECK on :8100/health"


def test_dockerignore():
    entries = {ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert entries >= {".venv", "models", ".humpback", "runs", ".git"}
