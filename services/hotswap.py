"""Server side of checkpoint hot-swap: put new weights into a running vLLM server without dropping requests.

Two methods, both validated before the server is touched:
- `reload` (the CPU default, works on GPU too): full merged weights are reloaded in place. The engine
  is paused with `mode=keep` (in-flight requests freeze, none fail), `reload_weights` reads the new
  folder, the prefix cache is reset with running requests preempted (so no request continues on KV
  computed by the old weights), and the engine resumes. Needs `VLLM_SERVER_DEV_MODE=1`.
- `lora` (GPU): a LoRA adapter is loaded at runtime under a versioned name; the base keeps serving.
The registry records the served version (shown by `serve status`) and the alias clients may request.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from pydantic import BaseModel

from humpback.contracts import SwapError
from services.checkpoint import validate_adapter, validate_checkpoint
from services.config import SwapMethod
from services.registry import Registry, default_registry, record_swap

__all__ = ["SwapResult", "swap_checkpoint", "served_root", "served_version"]



class SwapResult(BaseModel):
    role: str
    url: str
    version: str
    method: SwapMethod
    checkpoint: str
    # The `model` name that requests the new weights: the alias, the adapter name, or the role.
    served_model: str
    # How long new requests were held back (pause to resume), in seconds.
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
    """The version the registry says `role` serves now (None: no swap or start recorded it)."""
    served = Registry.load(registry or default_registry()).roles.get(role)
    return served.version if served else None


def _reload(http: httpx.Client, weights: Path) -> None:
    _post(http, "/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": str(weights)}})
    body = _post(http, "/reset_prefix_cache", params={"reset_running_requests": "true"}).json()
    if not body.get("success", False):
        raise SwapError("the prefix cache could not be reset after the reload")


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
) -> SwapResult:
    """Swap `checkpoint` into the server at `url` that serves `role`.

    Raises CheckpointError (nothing was touched) when the folder is unfit, SwapError when the server
    failed the swap.
    """
    checkpoint = Path(checkpoint).absolute()
    registry = registry or default_registry()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
        reference = served_root(http, role)
        if method == "lora":
            validate_adapter(checkpoint)
            name = alias or f"{role}-{version}"
            _post(http, "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(checkpoint)})
            stall = 0.0  # the base model never stops serving
            served = name
        else:
            validate_checkpoint(checkpoint, reference)
            previous = Registry.load(registry).roles.get(role)
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
                    raise SwapError(f"swap failed ({exc}); restoring {fallback} failed too ({exc2})") from exc
                raise SwapError(f"swap failed, {fallback} serves again: {exc}") from exc
            finally:
                try:
                    _post(http, "/resume")
                except (SwapError, httpx.HTTPError):
                    pass  # the server is gone; the supervisor restarts it and the error above says why
            stall = time.monotonic() - start
            served = alias or role
    record_swap(registry, role, version, str(checkpoint), method, served)
    return SwapResult(
        role=role, url=url, version=version, method=method, checkpoint=str(checkpoint), served_model=served, stall_s=stall
    )
