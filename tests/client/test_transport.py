"""The asyncio network backend under httpcore: keep-alive, large bodies, timeouts, closed and refused
connections, and TLS, against raw asyncio servers that do exactly what each test needs."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpcore
import pytest

from client.transport import AsyncioBackend
from tests.client.fake_server import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 request's body (Content-Length framing)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    return await reader.readexactly(length)


def response(body: bytes, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on a free port; yields its URL and the count of connections it accepted."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/", accepted
    finally:
        server.close()


def pool(**kw: object) -> httpcore.AsyncConnectionPool:
    return httpcore.AsyncConnectionPool(network_backend=AsyncioBackend(), **kw)  # type: ignore[arg-type]


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        body = await read_request(reader)
        writer.write(response(body))
        await writer.drain()


async def test_keep_alive_and_bodies_larger_than_buffers() -> None:
    big = bytes(range(256)) * (24 * 1024)  # 6 MiB: the write waits for the kernel to drain
    async with serve(echo_forever) as (url, accepted), pool() as p:
        for body in (b"hello", big, b"again"):
            resp = await p.request("POST", url, content=body)
            assert resp.status == 200 and resp.content == body
    assert len(accepted) == 1  # one keep-alive connection served all three


async def test_read_timeout_is_httpcore_s() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with serve(silent) as (url, _), pool() as p:
        with pytest.raises(httpcore.ReadTimeout):
            await p.request("POST", url, content=b"x", extensions={"timeout": {"read": 0.2}})


async def test_idle_connection_closed_by_server_is_replaced() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await read_request(reader)
        writer.write(response(body))  # keep-alive promised, then the server closes anyway
        await writer.drain()

    async with serve(one_then_close) as (url, accepted), pool() as p:
        assert (await p.request("POST", url, content=b"1")).content == b"1"
        await asyncio.sleep(0.1)  # the close reaches the client while the connection is idle
        assert (await p.request("POST", url, content=b"2")).content == b"2"
    assert len(accepted) == 2


async def test_connection_dropped_mid_response_is_an_error() -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    async with serve(truncated) as (url, _), pool() as p:
        with pytest.raises((httpcore.ReadError, httpcore.RemoteProtocolError)):
            await p.request("POST", url, content=b"x")


async def test_refused_connection_is_a_connect_error() -> None:
    async with pool() as p:
        with pytest.raises(httpcore.ConnectError):
            await p.request("POST", f"http://127.0.0.1:{free_port()}/", content=b"x")


async def test_tls(tmp_path: Path) -> None:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))

    async with serve(echo_forever, tls=server_ctx) as (url, _):
        async with pool(ssl_context=client_ctx) as p:
            resp = await p.request("POST", url, content=b"secret")
            assert resp.content == b"secret"
        async with pool() as p:  # the system CAs do not trust a self-signed certificate
            with pytest.raises(httpcore.ConnectError):
                await p.request("POST", url, content=b"secret")
