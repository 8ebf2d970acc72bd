"""Roles served by several replicas: how `serve up` lays them out, the registry that records each one,
and the version barrier (the guard refuses what a replica does not serve yet, the client goes
elsewhere, `swap_role` swaps one replica at a time and puts them back when one fails). These run over
real HTTP against guard-wrapped apps; tests/services/test_replicas_serve.py runs two real scorers."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from client.fanout import Fanout, FanoutConfig
from humpback.contracts import REGISTRY_ENV, SERVER_NAME_ENV, VERSION_HEADER, RequestFailed, ServeError, SwapError
from services.config import ServeSettings, default_servers
from services.guard import AdminGuard
from services import hotswap
from services.hotswap import role_servers, swap_role
from services.registry import Registry, ServedVersion, record_swap, reset_server, updating
from tests.services.helpers import edit_config, linked_checkpoint
from tests.services.test_guard import served

BODY = {"model": "scorer", "messages": [{"role": "user", "content": "hi"}]}


# --- layout ---------------------------------------------------------------------------------------


def test_replicas_get_their_own_names_ports_and_cores():
    specs = default_servers(ServeSettings(replicas={"scorer": 2}), device="cpu")
    assert [(s.name, s.role, s.replica, s.port) for s in specs] == [
        ("backward", "backward", 0, 8001), ("scorer", "scorer", 0, 8002), ("scorer-1", "scorer", 1, 8012)]
    binds = [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs]
    assert len(binds) == 3


def test_a_role_can_have_no_server_and_ports_must_not_collide():
    specs = default_servers(ServeSettings(replicas={"backward": 0, "scorer": 2}), device="cpu")
    assert [s.name for s in specs] == ["scorer", "scorer-1"]
    with pytest.raises(ServeError, match="no server"):
        default_servers(ServeSettings(replicas={"backward": 0, "scorer": 0}), device="cpu")
    with pytest.raises(ServeError, match="collide"):
        default_servers(ServeSettings(replicas={"backward": 2}, replica_port_step=1), device="cpu")
    with pytest.raises(ValueError, match="no role 'judge'"):
        ServeSettings(replicas={"judge": 1})


def test_serve_up_flag_takes_role_counts(tmp_path):
    from services.cli import up_config
    from tests.services.test_cli import _commands

    args = _commands()["up"].parse_args(["--state-dir", str(tmp_path), "--replicas", "scorer=2",
                                         "--replicas", "backward=0", "--scorer-port", "9100"])
    cfg, _ = up_config(args)
    assert [(s.name, s.port) for s in cfg.servers] == [("scorer", 9100), ("scorer-1", 9110)]


# --- registry -------------------------------------------------------------------------------------


def _reset(args: tuple[str, str]) -> None:
    path, name = args
    reset_server(Path(path), name, "scorer", f"http://{name}")


def test_replicas_starting_at_once_all_get_recorded(tmp_path):
    """Each replica's launcher records itself at start, all at once: none may undo another's entry."""
    registry = tmp_path / "registry.json"
    names = [f"scorer-{i}" for i in range(12)]
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        pool.map(_reset, [(str(registry), n) for n in names])
    assert sorted(Registry.load(registry).servers) == sorted(names)


def test_role_version_is_the_one_every_replica_serves(tmp_path):
    registry = tmp_path / "registry.json"
    reset_server(registry, "scorer", "scorer", "http://a")
    reset_server(registry, "scorer-1", "scorer", "http://b")
    reset_server(registry, "backward", "backward", "http://c")
    reg = Registry.load(registry)
    assert reg.role_version("scorer") == "base" and role_servers("scorer", "http://b/", registry) == {
        "scorer": "http://a", "scorer-1": "http://b"}
    assert role_servers("scorer", "http://z", registry) == {"scorer": "http://z"}
    record_swap(registry, "scorer", "m1", "/ckpt/m1", "reload", "ft:m1", name="scorer-1")
    reg = Registry.load(registry)
    assert reg.role_version("scorer") is None  # half-way: no version is the role's
    assert reg.aliases("scorer-1") == {"ft:m1": "scorer"} and reg.aliases("scorer") == {}
    assert reg.servers["scorer-1"].url == "http://b"  # a swap keeps where the server is
    record_swap(registry, "scorer", "m1", "/ckpt/m1", "reload", "ft:m1", name="scorer")
    assert Registry.load(registry).role_version("scorer") == "m1"


# --- the guard's barrier, over real HTTP ----------------------------------------------------------


async def _answer(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    return JSONResponse({"model": body["model"], "server": request.app.state.name,
                         "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})


def _replica(monkeypatch, registry: Path, name: str) -> AdminGuard:
    app = Starlette(routes=[Route("/v1/chat/completions", _answer, methods=["POST"])])
    app.state.name = name
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    monkeypatch.setenv(SERVER_NAME_ENV, name)
    return AdminGuard(app)  # reads its name and registry now


@pytest.fixture
def two_replicas(monkeypatch, tmp_path):
    """Two guard-wrapped scorer replicas on real sockets: `scorer` serves the base, `scorer-1` m1."""
    registry = tmp_path / "registry.json"
    with ExitStack() as stack:
        urls = {}
        for name in ("scorer", "scorer-1"):
            port = stack.enter_context(served(_replica(monkeypatch, registry, name), socket.AF_INET, "127.0.0.1"))
            urls[name] = f"http://127.0.0.1:{port}"
            reset_server(registry, name, "scorer", urls[name])
        record_swap(registry, "scorer", "m1", "/ckpt/m1", "reload", "ft:m1", name="scorer-1")
        yield registry, urls


def test_a_replica_refuses_a_version_or_name_it_does_not_serve_yet(two_replicas):
    _, urls = two_replicas
    old, new = urls["scorer"], urls["scorer-1"]
    refused = httpx.post(f"{old}/v1/chat/completions", json=BODY, headers={VERSION_HEADER: "m1"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "version_not_served"
    assert refused.headers[VERSION_HEADER] == "base" and "retry-after" in refused.headers
    # The fine-tuned name another replica answers to: refused here (retryable), not a 404.
    refused = httpx.post(f"{old}/v1/chat/completions", json={**BODY, "model": "ft:m1"})
    assert refused.status_code == 503 and "not served here yet" in refused.json()["error"]["message"]
    ok = httpx.post(f"{new}/v1/chat/completions", json={**BODY, "model": "ft:m1"}, headers={VERSION_HEADER: "m1"})
    assert ok.status_code == 200 and ok.json()["model"] == "scorer" and ok.headers[VERSION_HEADER] == "m1"
    # Unversioned requests are answered by either, each saying which version served it.
    assert httpx.post(f"{old}/v1/chat/completions", json=BODY).headers[VERSION_HEADER] == "base"


def test_the_client_sends_what_one_replica_refuses_to_the_other(two_replicas):
    _, urls = two_replicas

    async def run() -> tuple[list[dict], Fanout]:
        cfg = FanoutConfig(endpoints=list(urls.values()), concurrency=4, require_version="m1", backoff_base=5.0)
        async with Fanout(cfg) as f:
            answers = await asyncio.gather(*(f.post("/v1/chat/completions", BODY) for _ in range(40)))
        return answers, f

    answers, fanout = asyncio.run(run())
    assert {a["server"] for a in answers} == {"scorer-1"}
    # Every refusal went elsewhere at once: a 5 s backoff would have made 40 requests take minutes.
    assert fanout.version_refusals > 0
    assert fanout.endpoints[0].completed == 0 and fanout.endpoints[1].completed == 40


def test_a_request_waits_for_its_version_past_the_retries(two_replicas):
    """A version no replica serves yet is not a failure: with no retries at all, the request waits (the
    guard's Retry-After between rounds) until a swap brings the version in, then the swapped replica answers."""
    registry, urls = two_replicas

    async def run() -> tuple[dict, Fanout, float]:
        cfg = FanoutConfig(endpoints=list(urls.values()), concurrency=4, require_version="m2", max_retries=0,
                           backoff_base=0.01, backoff_max=0.02, version_wait=60)
        async with Fanout(cfg) as f:
            request = asyncio.create_task(f.post("/v1/chat/completions", BODY))
            await asyncio.sleep(2.5)
            assert not request.done()
            swapped = time.monotonic()
            record_swap(registry, "scorer", "m2", "/ckpt/m2", "reload", "ft:m2", name="scorer")
            return await request, f, time.monotonic() - swapped

    answer, fanout, after = asyncio.run(run())
    assert answer["server"] == "scorer"
    # Both replicas refused in each of at least two rounds, one Retry-After (1 s) apart.
    assert fanout.version_refusals >= 4 and fanout.retries == 0
    assert after < 3


def test_a_version_no_replica_serves_fails_after_version_wait(two_replicas):
    _, urls = two_replicas

    async def run() -> None:
        cfg = FanoutConfig(endpoints=list(urls.values()), concurrency=4, require_version="m9", max_retries=0,
                           version_wait=1.5)
        async with Fanout(cfg) as f:
            await f.post("/v1/chat/completions", BODY)

    t0 = time.monotonic()
    with pytest.raises(RequestFailed, match=r"no endpoint served version 'm9' within 1.5s.*version_not_served"):
        asyncio.run(run())
    assert 1.5 <= time.monotonic() - t0 < 10


# --- swap_role ------------------------------------------------------------------------------------


class FakeVllm:
    """The admin routes of a vLLM server that a swap uses, recording the reloads; `fail` makes the
    reload fail (a server that cannot take the new weights)."""

    def __init__(self, root: Path, fail: bool = False) -> None:
        self.root, self.fail, self.reloads = root, fail, []
        self.pause_delay = 0.0  # seconds /pause takes (past the swap's timeout: a hung server)
        self.resume_failures = 0  # how many /resume calls answer 500 before one works
        self.app = Starlette(routes=[
            Route("/health", self.ok), Route("/v1/models", self.models), Route("/pause", self.pause, methods=["POST"]),
            Route("/resume", self.resume, methods=["POST"]), Route("/collective_rpc", self.rpc, methods=["POST"]),
            Route("/reset_prefix_cache", self.reset, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load_lora, methods=["POST"])])
        self.adapters: set[str] = set()

    async def load_lora(self, request: Request) -> JSONResponse:
        body = await request.json()
        if body["lora_name"] in self.adapters and not body.get("load_inplace"):  # vLLM's own refusal
            return JSONResponse({"error": f"The lora adapter '{body['lora_name']}' has already been loaded."},
                                status_code=400)
        self.adapters.add(body["lora_name"])
        return JSONResponse({})

    async def pause(self, request: Request) -> JSONResponse:
        await asyncio.sleep(self.pause_delay)
        return JSONResponse({})

    async def resume(self, request: Request) -> JSONResponse:
        if self.resume_failures:
            self.resume_failures -= 1
            return JSONResponse({"error": "engine not paused"}, status_code=500)
        return JSONResponse({})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"id": "scorer", "root": str(self.root), "parent": None}]})

    async def ok(self, request: Request) -> JSONResponse:
        return JSONResponse({})

    async def reset(self, request: Request) -> JSONResponse:
        return JSONResponse({"success": True})

    async def rpc(self, request: Request) -> JSONResponse:
        weights = (await request.json())["kwargs"]["weights_path"]
        if self.fail and weights != str(self.root):
            return JSONResponse({"error": "out of memory"}, status_code=500)
        self.reloads.append(weights)
        return JSONResponse({})


def test_a_replica_that_fails_the_swap_puts_the_others_back(model_dir, tmp_path):
    registry = tmp_path / "registry.json"
    ckpt = linked_checkpoint(model_dir, tmp_path / "m1")
    fakes = {"scorer": FakeVllm(model_dir), "scorer-1": FakeVllm(model_dir, fail=True)}
    with ExitStack() as stack:
        urls = {n: f"http://127.0.0.1:{stack.enter_context(served(f.app, socket.AF_INET, '127.0.0.1'))}"
                for n, f in fakes.items()}
        for name, url in urls.items():
            reset_server(registry, name, "scorer", url)
        before = Registry.load(registry).servers
        with pytest.raises(SwapError, match="scorer-1 failed the swap"):
            swap_role(urls, ckpt, role="scorer", version="m1", alias="ft:m1", registry=registry)
        # The first replica took m1, then its base again; the registry holds what it held.
        assert fakes["scorer"].reloads == [str(ckpt.absolute()), str(model_dir)]
        assert Registry.load(registry).servers == before
        fakes["scorer-1"].fail = False
        result = swap_role(urls, ckpt, role="scorer", version="m1", alias="ft:m1", registry=registry)
    assert result.servers == ["scorer", "scorer-1"] and result.urls == list(urls.values())
    assert Registry.load(registry).role_version("scorer") == "m1"


def test_swap_role_needs_a_server():
    with pytest.raises(SwapError, match="no server of role"):
        swap_role({}, "/nowhere", role="scorer", version="m1")


def test_trainer_deploys_to_every_recorded_replica_of_its_server(tmp_path):
    from trainer.config import ServiceSettings
    from trainer.deploy import Deployer

    registry = tmp_path / "registry.json"
    with updating(registry) as reg:
        reg.servers = {"scorer": ServedVersion(role="scorer", url="http://127.0.0.1:8002"),
                       "scorer-1": ServedVersion(role="scorer", url="http://127.0.0.1:8012")}
    settings = ServiceSettings(data_dir=tmp_path / "t", registry=registry)
    assert Deployer(settings, None, None).servers("scorer") == {
        "scorer": "http://127.0.0.1:8002", "scorer-1": "http://127.0.0.1:8012"}
    # A registry that records other servers than the configured one is another stack's: not followed.
    other = ServiceSettings(data_dir=tmp_path / "t", registry=registry, scorer_url="http://127.0.0.1:9002")
    assert Deployer(other, None, None).servers("scorer") == {"scorer": "http://127.0.0.1:9002"}


def _fakes(stack: ExitStack, registry: Path, fakes: dict[str, FakeVllm]) -> dict[str, str]:
    urls = {n: f"http://127.0.0.1:{stack.enter_context(served(f.app, socket.AF_INET, '127.0.0.1'))}"
            for n, f in fakes.items()}
    for name, url in urls.items():
        reset_server(registry, name, "scorer", url)
    return urls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["refuses the connection", "hangs on /pause", "serves another model"])
def test_any_failure_on_a_later_replica_puts_the_others_back(model_dir, tmp_path, fault):
    """Not only a SwapError: a replica gone after the swap began, a timeout, a folder its model refuses."""
    registry = tmp_path / "registry.json"
    ckpt = linked_checkpoint(model_dir, tmp_path / "m1")
    other = tmp_path / "other"
    linked_checkpoint(model_dir, other)
    edit_config(other, hidden_size=1024)
    second_root = other if fault == "serves another model" else model_dir
    fakes = {"scorer": FakeVllm(model_dir), "scorer-1": FakeVllm(second_root)}
    # Hangs well past the swap's timeout, which leaves the put-back on the busy cores of a full test run
    # time to answer (at 1 s, it timed out there too).
    fakes["scorer-1"].pause_delay = 12.0 if fault == "hangs on /pause" else 0.0
    with ExitStack() as stack:
        urls = _fakes(stack, registry, fakes)
        if fault == "refuses the connection":  # it answered when the swap began, then went away
            gone = f"http://127.0.0.1:{_free_port()}"
            real_swap = hotswap.swap_checkpoint

            def first_then_gone(url, *args, **kwargs):
                return real_swap(gone if kwargs["name"] == "scorer-1" else url, *args, **kwargs)

            stack.enter_context(pytest.MonkeyPatch.context()).setattr(hotswap, "swap_checkpoint", first_then_gone)
        before = Registry.load(registry).servers
        with pytest.raises(SwapError) as err:
            swap_role(urls, ckpt, role="scorer", version="m1", alias="ft:m1", registry=registry, timeout=4.0)
    assert "scorer-1 failed the swap" in str(err.value)
    assert str(err.value).endswith("now every scorer server serves version 'base'")
    assert fakes["scorer"].reloads == [str(ckpt.absolute()), str(model_dir)]
    assert Registry.load(registry).servers == before


def test_a_failed_resume_is_a_failed_swap_and_is_undone(model_dir, tmp_path):
    registry = tmp_path / "registry.json"
    ckpt = linked_checkpoint(model_dir, tmp_path / "m1")
    fakes = {"scorer": FakeVllm(model_dir)}
    fakes["scorer"].resume_failures = 1
    with ExitStack() as stack:
        urls = _fakes(stack, registry, fakes)
        before = Registry.load(registry).servers
        with pytest.raises(SwapError, match="did not resume"):
            swap_role(urls, ckpt, role="scorer", version="m1", registry=registry)
    # Its new weights were reloaded away again, and the registry says what it serves.
    assert fakes["scorer"].reloads == [str(ckpt.absolute()), str(model_dir)]
    assert Registry.load(registry).servers == before


def test_a_recorded_replica_that_is_gone_is_pruned_and_the_rest_swapped(model_dir, tmp_path, caplog):
    """A registry entry outliving its server (compose's state volume after the replicas profile was
    dropped) must not fail every later swap of its role."""
    registry = tmp_path / "registry.json"
    ckpt = linked_checkpoint(model_dir, tmp_path / "m1")
    with ExitStack() as stack:
        urls = _fakes(stack, registry, {"scorer": FakeVllm(model_dir)})
        gone = f"http://127.0.0.1:{_free_port()}"
        reset_server(registry, "scorer-1", "scorer", gone)
        servers = role_servers("scorer", urls["scorer"], registry)
        assert servers == {**urls, "scorer-1": gone}
        result = swap_role(servers, ckpt, role="scorer", version="m1", registry=registry)
    assert result.servers == ["scorer"]
    assert sorted(Registry.load(registry).servers) == ["scorer"]
    assert Registry.load(registry).role_version("scorer") == "m1"
    assert "scorer-1" in caplog.text and "removed from the registry" in caplog.text
    with pytest.raises(SwapError, match="no server of role 'scorer' answers"):
        swap_role({"scorer": gone}, ckpt, role="scorer", version="m2", registry=registry)


def test_the_client_refuses_an_answer_stamped_with_another_version(monkeypatch, tmp_path):
    """An answer stamped otherwise than the version required (or not at all: a swap ran under the
    request) is not accepted: the request goes again, to the replica that serves it."""
    async def stamped(request: Request) -> JSONResponse:
        version = request.app.state.version
        return JSONResponse({"server": version}, headers={VERSION_HEADER: version} if version else {})

    apps = []
    for version in ("m0", None, "m1"):
        app = Starlette(routes=[Route("/v1/chat/completions", stamped, methods=["POST"])])
        app.state.version = version
        apps.append(app)
    with ExitStack() as stack:
        urls = [f"http://127.0.0.1:{stack.enter_context(served(a, socket.AF_INET, '127.0.0.1'))}" for a in apps]

        async def run() -> tuple[list[dict], Fanout]:
            cfg = FanoutConfig(endpoints=urls, concurrency=2, require_version="m1", backoff_base=5.0)
            async with Fanout(cfg) as f:
                return await asyncio.gather(*(f.post("/v1/chat/completions", BODY) for _ in range(12))), f

        answers, fanout = asyncio.run(run())
    assert {a["server"] for a in answers} == {"m1"} and fanout.version_refusals > 0


def test_a_lora_reswap_after_a_replica_restart_reloads_in_place_on_the_others(model_dir, tmp_path):
    """A replica restarted without its adapters, the role swapped again with the same adapter: the
    replicas that kept it load it in place instead of failing with "already loaded"."""
    registry = tmp_path / "registry.json"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    fakes = {"scorer": FakeVllm(model_dir), "scorer-1": FakeVllm(model_dir)}
    with ExitStack() as stack:
        urls = _fakes(stack, registry, fakes)
        swap_role(urls, adapter, role="scorer", version="a1", registry=registry, method="lora")
        fakes["scorer-1"].adapters.clear()  # restarted: adapters live in memory only
        reset_server(registry, "scorer-1", "scorer", urls["scorer-1"])
        result = swap_role(urls, adapter, role="scorer", version="a1", registry=registry, method="lora")
    assert result.servers == ["scorer", "scorer-1"] and result.served_model == "scorer-a1"
    assert all(f.adapters == {"scorer-a1"} for f in fakes.values())
    reg = Registry.load(registry)
    assert sorted(reg.servers) == ["scorer", "scorer-1"]  # recorded under the servers' names
    assert all(v.adapters == ["scorer-a1"] for v in reg.servers.values())
