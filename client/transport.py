"""An httpcore network backend on plain asyncio transports, for the client's hot path.

httpcore's default backend goes through anyio: every read and write opens a cancel scope, checks
the running library and yields to the loop once more, which cost the client more CPU per request
than h11's parsing. This backend plugs into httpcore's documented `network_backend=` slot and
keeps its semantics (timeouts per read/write/connect, httpcore's exception types, TLS by
`loop.start_tls`), with reads served from a protocol buffer and a timer armed only when a read
must wait. Asyncio only, like the rest of the client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
from httpcore import AsyncNetworkBackend, AsyncNetworkStream


class _Protocol(asyncio.Protocol):
    """Buffers what the socket delivers and wakes the one reader waiting for it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed, self.error = True, exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def _wake(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)
        self.reader = None


async def _wait(fut: asyncio.Future[None], timeout: float | None, error: type[Exception]) -> None:
    """Await `fut`, failing with `error` after `timeout` seconds (one timer, no extra task)."""
    if timeout is None:
        await fut
        return
    timer = asyncio.get_running_loop().call_later(
        timeout, lambda: fut.done() or fut.set_exception(error(f"no progress in {timeout:g}s")))
    try:
        await fut
    finally:
        timer.cancel()


class AsyncioStream(AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._p = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._p
        if not p.buffer and not p.closed:
            p.reader = asyncio.get_running_loop().create_future()
            await _wait(p.reader, timeout, httpcore.ReadTimeout)
        if p.buffer:
            if len(p.buffer) <= max_bytes:
                data = bytes(p.buffer)
                p.buffer.clear()
            else:
                data = bytes(p.buffer[:max_bytes])
                del p.buffer[:max_bytes]
            return data
        if p.error is not None:
            raise httpcore.ReadError(str(p.error) or type(p.error).__name__)
        return b""  # the peer closed the connection: httpcore decides whether that is an error

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._p.closed or self._transport.is_closing():
            raise httpcore.WriteError(str(self._p.error or "connection closed"))
        self._transport.write(buffer)
        if self._p.writable is not None:  # the kernel buffer is full: wait until it drains
            await _wait(self._p.writable, timeout, httpcore.WriteTimeout)

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(self._transport, self._p, ssl_context, server_hostname=server_hostname), timeout)
        except asyncio.TimeoutError as exc:
            self._transport.close()
            raise httpcore.ConnectTimeout(f"TLS handshake took over {timeout:g}s") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return AsyncioStream(transport, self._p)  # type: ignore[arg-type]

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # httpcore's test that an idle keep-alive connection was not closed
            return bool(self._p.buffer) or self._p.closed
        key = {"ssl_object": "ssl_object", "client_addr": "sockname", "server_addr": "peername",
               "socket": "socket"}.get(info)
        return self._transport.get_extra_info(key) if key else None


class AsyncioBackend(AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        return await self._connect(loop.create_connection(_Protocol, host, port, local_addr=local),
                                   timeout, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> AsyncNetworkStream:
        return await self._connect(asyncio.get_running_loop().create_unix_connection(_Protocol, path),
                                   timeout, socket_options)

    @staticmethod
    async def _connect(opening: Any, timeout: float | None, socket_options: Iterable[Any] | None) -> AsyncNetworkStream:
        try:
            transport, protocol = await asyncio.wait_for(opening, timeout)
        except asyncio.TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection within {timeout:g}s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
