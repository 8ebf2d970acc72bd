"""The stack's key on the wire: `Authorization: Bearer <key>`, built here for every sender (the client,
the loop, the hot-swap) and for the servers' own check, so the scheme is spelled once."""

from __future__ import annotations

AUTHORIZATION = "Authorization"


def bearer(api_key: str) -> str:
    """The `Authorization` value that carries `api_key`."""
    return f"Bearer {api_key}"


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The headers that carry `api_key`; none without a key (a server without one takes any request)."""
    return {AUTHORIZATION: bearer(api_key)} if api_key else {}
