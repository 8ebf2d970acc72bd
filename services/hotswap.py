"""Server side of checkpoint hot-swap: put new weights into a running vLLM server without dropping requests.

Two methods, both validated before the server is touched:
- `reload` (the CPU default, works on GPU too): full merged weights are reloaded in place. The engine
  is paused with `mode=keep` (in-flight requests freeze, none fail), `reload_weights` reads the new
  folder, the prefix cache is reset with running requests preempted (so no request continues on KV
  computed by the old weights), and the engine resumes. Needs `VLLM_SERVER_DEV_MODE=1`.
- `lora` (GPU): a LoRA adapter is loaded at runtime under a versioned name; the base keeps serving.
The registry records the served version (shown by `serve status`) and the alias clients may request.

A role served by several replicas is swapped by `swap_role`, one replica at a time (the others keep
serving), each recorded as it finishes: the guard of a replica refuses requests that name a version or
alias it does not serve yet, so clients that name the new version are answered by the replicas done so
far, and when `swap_role` returns every replica serves it (the version barrier). A replica that fails
the swap in any way (it refused the connection, timed out, failed the reload or the resume, or the
folder was refused) puts the ones done back on their previous weights, so the role never stays split;
where a put-back fails too, the registry records what each replica serves and the error names them.
A recorded replica that refuses the connection before the swap starts (a server gone, such as a
replica of a compose profile no longer run) is pruned from the registry with a warning and skipped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
from pydantic import BaseModel

from humpback.contracts import CheckpointError, SwapError, auth_headers
from services.checkpoint import validate_adapter, validate_checkpoint
from services.config import SwapMethod
from services.registry import Registry, ServedVersion, default_registry, record_swap, updating

__all__ = ["SwapResult", "describe_role", "role_servers", "served_root", "served_version", "swap_checkpoint",
           "swap_role"]

log = logging.getLogger(__name__)
# What a swap may raise from a replica: the server's answer, the connection, or the folder refused.
SWAP_FAILURES = (SwapError, CheckpointError, httpx.HTTPError, OSError)


class SwapResult(BaseModel):
    role: str
    # The servers swapped (names as in the registry) and their URLs, in swap order.
    servers: list[str]
    urls: list[str]
    version: str
    method: SwapMethod
    checkpoint: str
    # The `model` name that requests the new weights: the alias, the adapter name, or the role.
    served_model: str
    # How long new requests were held back (pause to resume) on the server held longest, in seconds.
    stall_s: float


def _post(http: httpx.Client, path: str, **kwargs) -> httpx.Response:
    resp = http.post(path, **kwargs)
    if resp.status_code >= 400:
        raise SwapError(f"{http.base_url}{path} answered {resp.status_code}: {resp.text[:500]}")
    return resp


def served_root(http: httpx.Client, role: str) -> Path:
    """The folder the server loaded at start (`root` in /v1/models), the reference for validation."""
    resp = http.get("/v1/models")
    resp.raise_for_status()
    for model in resp.json()["data"]:
        if model["id"] == role and model.get("parent") is None:
            return Path(model["root"])
    raise SwapError(f"{http.base_url} serves no model named {role!r}")


def served_version(role: str, registry: Path | None = None) -> str | None:
    """The version every server of `role` serves now, by the registry (None: no start recorded one, or
    a swap is under way)."""
    return Registry.load(registry or default_registry()).role_version(role)


def role_servers(role: str, url: str, registry: Path | None = None) -> dict[str, str]:
    """name -> URL of every server of `role` the registry records (each records itself at start) when
    the server at `url` is one of them; else that server alone, named after the role (a registry
    that does not record it is another stack's, no guide to this one)."""
    url = url.rstrip("/")
    recorded = {name: v.url for name, v in Registry.load(registry or default_registry()).of_role(role).items()
                if v.url}
    return recorded if url in recorded.values() else {role: url}


def describe_role(role: str, registry: Path | None = None) -> str:
    """What the registry says `role`'s servers serve now, in words: the truth after a failed swap."""
    servers = Registry.load(registry or default_registry()).of_role(role)
    versions = {v.version for v in servers.values()}
    if not servers:
        return f"no {role} server is recorded in the registry"
    if len(versions) == 1:
        return f"every {role} server serves version {versions.pop()!r}"
    return f"the {role} servers serve different versions ({', '.join(f'{n}: {v.version}' for n, v in servers.items())})"


def _prune_gone(servers: dict[str, str], role: str, api_key: str | None, registry: Path) -> dict[str, str]:
    """`servers` less those that refuse the connection, whose registry entries are removed with a
    warning: a server that is gone (its supervisor restarts a crashed one, and it records itself
    again when it is back) must not fail every later swap of its role."""
    alive: dict[str, str] = {}
    for name, url in servers.items():
        try:
            with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=10.0) as http:
                http.get("/health")
        except httpx.ConnectError as exc:
            if Registry.load(registry).servers.get(name, ServedVersion(role=role)).url == url:
                log.warning("%s (%s) refuses the connection (%s): removed from the registry, not swapped",
                            name, url, exc)
                with updating(registry) as reg:
                    reg.servers.pop(name, None)
            continue
        except httpx.HTTPError:
            pass  # it answers, if badly: the swap says what is wrong with it
        alive[name] = url
    if not alive:
        raise SwapError(f"no server of role {role!r} answers: {', '.join(servers.values())} "
                        f"refuse{'s' if len(servers) == 1 else ''} the connection")
    return alive


def _reload(http: httpx.Client, weights: Path) -> None:
    _post(http, "/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": str(weights)}})
    body = _post(http, "/reset_prefix_cache", params={"reset_running_requests": "true"}).json()
    if not body.get("success", False):
        raise SwapError("the prefix cache could not be reset after the reload")


def _resume(http: httpx.Client, cause: BaseException | None) -> None:
    """Let the paused server take requests again; a SwapError when it does not (it holds every request)."""
    try:
        _post(http, "/resume")
    except (SwapError, httpx.HTTPError) as exc:
        why = f" after {cause}" if cause else ""
        raise SwapError(f"{http.base_url} did not resume{why} ({exc}): it holds its requests until it is "
                        "resumed or restarted") from cause or exc


def _touch(registry: Path) -> None:
    """Rewrite the registry unchanged: a new file tells each guard that the weights its server holds are
    the recorded ones again (services.guard stops trusting its entry while a reload runs)."""
    with updating(registry):
        pass


def swap_checkpoint(
    url: str,
    checkpoint: str | Path,
    *,
    role: str,
    version: str,
    alias: str | None = None,
    api_key: str | None = None,
    registry: Path | None = None,
    method: SwapMethod = "reload",
    timeout: float = 300.0,
    name: str | None = None,
) -> SwapResult:
    """Swap `checkpoint` into the server at `url` that serves `role`, recorded in the registry as server
    `name` (default: the role's name, its first server).

    Raises CheckpointError (nothing was touched) when the folder is unfit, SwapError when the server
    failed the swap.
    """
    name = name or role
    checkpoint = Path(checkpoint).absolute()
    registry = registry or default_registry()
    with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout) as http:
        reference = served_root(http, role)
        if method == "lora":
            validate_adapter(checkpoint)
            served = alias or f"{role}-{version}"
            # A replica that kept the adapter (its sibling restarted and lost it) takes it again in place.
            previous = Registry.load(registry).servers.get(name)
            again = previous is not None and served in previous.adapters
            _post(http, "/v1/load_lora_adapter",
                  json={"lora_name": served, "lora_path": str(checkpoint), **({"load_inplace": True} if again else {})})
            stall = 0.0  # the base model never stops serving
        else:
            validate_checkpoint(checkpoint, reference)
            previous = Registry.load(registry).servers.get(name)
            fallback = Path(previous.checkpoint) if previous and previous.checkpoint else reference
            start = time.monotonic()
            _post(http, "/pause", params={"mode": "keep"})
            try:
                _reload(http, checkpoint)
            except (SwapError, httpx.HTTPError) as exc:
                # The new folder passed validation, so this is the server's failure: put back what it
                # served before, so requests keep getting the old weights.
                try:
                    _reload(http, fallback)
                except (SwapError, httpx.HTTPError) as exc2:
                    _resume(http, exc)
                    raise SwapError(f"swap failed ({exc}); restoring {fallback} failed too ({exc2})") from exc
                _resume(http, exc)
                _touch(registry)  # the guard learns that its server's weights are known again
                raise SwapError(f"swap failed, {fallback} serves again: {exc}") from exc
            try:
                _resume(http, None)
            except SwapError:
                # The new weights are in, but the server holds every request: not a swap that worked.
                # Record the truth (its weights are the new ones) so that a put-back reloads them away.
                record_swap(registry, role, version, str(checkpoint), method, alias or role, name=name)
                raise
            stall = time.monotonic() - start
            served = alias or role
    record_swap(registry, role, version, str(checkpoint), method, served, name=name)
    return SwapResult(role=role, servers=[name], urls=[url], version=version, method=method,
                      checkpoint=str(checkpoint), served_model=served, stall_s=stall)


def swap_role(
    servers: dict[str, str],
    checkpoint: str | Path,
    *,
    role: str,
    version: str,
    alias: str | None = None,
    api_key: str | None = None,
    registry: Path | None = None,
    method: SwapMethod = "reload",
    timeout: float = 300.0,
) -> SwapResult:
    """Swap `checkpoint` into every server of `role` (`servers`: name -> URL), one at a time; when it
    returns, all of them serve `version`. Servers that refuse the connection before the swap starts are
    pruned from the registry and skipped. On any failure (SwapError, CheckpointError, a connection
    error, a timeout) the servers already swapped are put back on what they served before, and a
    SwapError says so, or which ones could not be put back (the registry records what they serve)."""
    if not servers:
        raise SwapError(f"no server of role {role!r} is recorded in the registry")
    registry = registry or default_registry()
    servers = _prune_gone(servers, role, api_key, registry)
    before = Registry.load(registry).servers
    done: list[SwapResult] = []
    for name, url in servers.items():
        try:
            done.append(swap_checkpoint(url, checkpoint, role=role, version=version, alias=alias, api_key=api_key,
                                        registry=registry, method=method, timeout=timeout, name=name))
        except SWAP_FAILURES as exc:
            if not done and isinstance(exc, CheckpointError):
                raise  # refused before any server was touched
            # The failed one too, when its registry entry says it took the new weights (it did not resume).
            now = Registry.load(registry).servers
            touched = [(n, u) for n, u in servers.items()
                       if n in now and now[n].version == version and now[n] != before.get(n)]
            failed = [f"{n}: {e}" for n, u in touched
                      if (e := _put_back(n, u, role, method, alias, before, api_key, registry, timeout))]
            what = (f"the replicas swapped before it were put back, except {'; '.join(failed)}" if failed
                    else "the replicas it reached were put back" if touched else "no replica was changed")
            raise SwapError(f"{name} failed the swap ({type(exc).__name__}: {exc}); {what}; "
                            f"now {describe_role(role, registry)}") from exc
    return SwapResult(role=role, servers=[r.servers[0] for r in done], urls=[r.urls[0] for r in done],
                      version=version, method=method, checkpoint=str(Path(checkpoint).absolute()),
                      served_model=done[0].served_model, stall_s=max(r.stall_s for r in done))


def _put_back(name: str, url: str, role: str, method: SwapMethod, alias: str | None,
              before: dict[str, ServedVersion], api_key: str | None, registry: Path, timeout: float) -> str | None:
    """Undo one replica's swap (what `swap_role` does when a later replica fails); why it failed, or None."""
    prev = before.get(name, ServedVersion(role=role, url=url))
    try:
        if method == "lora":  # the base kept serving beside the adapter: unload it
            adapter = alias or f"{role}-{Registry.load(registry).servers[name].version}"
            with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout) as http:
                _post(http, "/v1/unload_lora_adapter", json={"lora_name": adapter})
        else:
            with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout) as http:
                weights = prev.checkpoint or str(served_root(http, role))
            swap_checkpoint(url, weights, role=role, version=prev.version, alias=next(iter(prev.aliases), None),
                            api_key=api_key, registry=registry, timeout=timeout, name=name)
        with updating(registry) as reg:  # exactly the entry it had: its checkpoint None when it was the base
            reg.servers[name] = prev
        return None
    except SWAP_FAILURES as exc:
        return str(exc)
