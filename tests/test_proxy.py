"""Forwarder against a real upstream on 127.0.0.1: streaming, errors, disconnects, WebSockets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from conftest import raw_exchange, raw_http
from multidict import CIMultiDict
from support.redis_server import free_port
from support.sidecar import base_config, running_sidecar
from yarl import URL

from sidecar.config import IdentityHeaders
from sidecar.errors import SidecarError
from sidecar.headers import upstream_request_headers
from sidecar.identity import Identity
from sidecar.proxy import Forwarder, make_client_session
from sidecar.targets import target_url
from sidecar.upstream_h1 import H1Pool

MiB = 1024 * 1024
IDENTITY = Identity(name="alice", email="alice@example.com", roles=frozenset({"editor", "admin"}))
PATTERN = bytes(range(256)) * 1024  # 256 KiB


# --------------------------------------------------------------------------- upstream


@dataclass
class Upstream:
    server: TestServer = field(init=False)
    requests: list[str] = field(default_factory=list)  # raw paths seen
    events: dict[str, asyncio.Event] = field(default_factory=dict)
    ws_log: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)

    @property
    def base(self) -> str:
        return str(self.server.make_url(""))

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())


UPSTREAM = web.AppKey("upstream", Upstream)


async def _echo(request: web.Request) -> web.StreamResponse:
    digest, length = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": list(request.headers.items()),
            "length": length,
            "sha256": digest.hexdigest(),
        }
    )


async def _download(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    response = web.StreamResponse()
    if request.query.get("length") == "1":
        response.content_length = size
    await response.prepare(request)
    sent = size if request.method == "HEAD" else 0
    while sent < size:
        piece = PATTERN[: min(len(PATTERN), size - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def _gzip(request: web.Request) -> web.StreamResponse:
    body = gzip.compress(b"hello " * 1000)
    return web.Response(
        body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    )


async def _slow_headers(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(3)
    return web.Response(text="late")


async def _slow_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"x" * 100)
    await asyncio.sleep(3)
    await response.write(b"y" * 100)
    return response


async def _truncate(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    if request.query.get("length") == "1":
        response.content_length = 1000
    await response.prepare(request)
    await response.write(b"x" * 100)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return response


async def _infinite(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    try:
        while True:
            await response.write(PATTERN)
    finally:  # the proxy closed the connection: a write failed or the handler was cancelled
        request.app[UPSTREAM].event("infinite_closed").set()


async def _hold(request: web.Request) -> web.StreamResponse:
    request.app[UPSTREAM].event("hold_started").set()
    try:
        await asyncio.Event().wait()  # forever: TestServer cancels handlers on disconnect
    finally:
        request.app[UPSTREAM].event("hold_closed").set()
    return web.Response()


async def _upload_hold(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    try:
        async for _ in request.content.iter_any():
            upstream.event("upload_started").set()
    except BaseException:  # connection reset, or handler cancelled because of it
        upstream.event("upload_broken").set()
        raise
    upstream.event("upload_done").set()
    return web.Response()


async def _redirect(request: web.Request) -> web.StreamResponse:
    response = web.Response(status=302, headers={"Location": "/elsewhere"})
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    return response


async def _ws(request: web.Request) -> web.StreamResponse:
    log = request.app[UPSTREAM].ws_log
    ws = web.WebSocketResponse(protocols=("b", "c"), autoping=False, autoclose=False)
    await ws.prepare(request)
    log.put_nowait(("open", request.headers.get("Sec-WebSocket-Protocol"), dict(request.headers)))
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            if msg.data == "ping-me":
                await ws.ping(b"u1")
            elif msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"server bye")
                log.put_nowait(("closed", ws.close_code))
                break
            elif msg.data == "vanish":
                assert request.transport is not None
                request.transport.close()
                break
            else:
                await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            log.put_nowait(("ping", msg.data))
            await ws.pong(msg.data)
        elif msg.type is WSMsgType.PONG:
            log.put_nowait(("pong", msg.data))
        elif msg.type is WSMsgType.CLOSE:
            log.put_nowait(("close", msg.data, msg.extra))
            await ws.close(code=msg.data)
            break
        else:
            log.put_nowait(("end", msg.type))
            break
    return ws


async def _ws_refuse(request: web.Request) -> web.StreamResponse:
    return web.Response(status=403, text="no")


ROUTES: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    "echo": _echo,
    "download": _download,
    "gzip": _gzip,
    "slow-headers": _slow_headers,
    "slow-body": _slow_body,
    "truncate": _truncate,
    "infinite": _infinite,
    "hold": _hold,
    "upload-hold": _upload_hold,
    "redirect": _redirect,
    "ws": _ws,
    "ws-refuse": _ws_refuse,
}


async def _dispatch(request: web.Request) -> web.StreamResponse:
    request.app[UPSTREAM].requests.append(request.raw_path)
    return await ROUTES[request.path.split("/")[1]](request)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    app[UPSTREAM] = upstream = Upstream()
    upstream.server = await aiohttp_server(app)
    return upstream


# --------------------------------------------------------------------------- proxy


@dataclass
class Proxy:
    port: int
    opened: list[web.WebSocketResponse]
    transport: str  # the upstream transport: "aiohttp" or "h1"

    def url(self, raw: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{raw}", encoded=True)


MakeProxy = Callable[..., Awaitable[Proxy]]


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except SidecarError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@pytest.fixture(params=["aiohttp", "h1"])
async def make_proxy(request: pytest.FixtureRequest) -> AsyncIterator[MakeProxy]:
    """Every forwarder test runs against both upstream transports."""
    sessions: list[aiohttp.ClientSession] = []
    pools: list[H1Pool] = []
    runners: list[web.AppRunner] = []

    async def make(
        base: str,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        handler_cancellation: bool = False,
        **kwargs: Any,
    ) -> Proxy:
        session = make_client_session(connect_timeout=connect_timeout, read_timeout=read_timeout)
        sessions.append(session)
        kwargs.setdefault("max_body_bytes", None)
        kwargs.setdefault("disconnect_poll_interval", 0.05)
        if request.param == "h1":
            pool = H1Pool(connect_timeout=connect_timeout, read_timeout=read_timeout)
            pools.append(pool)
            kwargs["h1"] = pool
        forwarder = Forwarder(
            session, connect_timeout=connect_timeout, read_timeout=read_timeout, **kwargs
        )
        opened: list[web.WebSocketResponse] = []

        async def handle(request: web.Request) -> web.StreamResponse:
            headers = upstream_request_headers(
                request.headers,
                identity=IDENTITY,
                names=IdentityHeaders(),
                peer=request.remote,
                scheme=request.scheme,
                host=request.host,
                trusted=False,
                pass_authorization=False,
                session_cookie_name="SyncGatewaySession",
                request_id="req-1",
            )
            url = target_url(base, request.raw_path)
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await forwarder.websocket(request, url, headers, on_open=opened.append)
            return await forwarder.http(request, url, headers)

        app = web.Application(middlewares=[_errors])
        app.router.add_route("*", "/{tail:.*}", handle)
        # A runner of our own: aiohttp's TestServer forces handler_cancellation=True, while
        # production (AppRunner, run_app) defaults to False; both must release the upstream.
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return Proxy(runner.addresses[0][1], opened, request.param)

    yield make
    for runner in runners:
        await runner.cleanup()
    for session in sessions:
        await session.close()
    for pool in pools:
        await pool.close()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: Upstream) -> Proxy:
    return await make_proxy(upstream.base)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "REPORT"])
async def test_all_methods(proxy: Proxy, client: aiohttp.ClientSession, method: str) -> None:
    body = None if method == "GET" else b"hello"
    async with client.request(method, proxy.url("/echo/x"), data=body) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["method"] == method
    assert seen["length"] == (0 if body is None else 5)


async def test_head(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    async with client.get(proxy.url("/download?size=1234&length=1")) as resp:
        assert resp.headers["Content-Length"] == "1234"
    async with client.head(proxy.url("/download?size=1234&length=1")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1234"
        assert await resp.read() == b""


@pytest.mark.parametrize(
    "raw",
    [
        "/echo/db/doc%2Fwith%2Fslashes",
        "/echo/db/doc;rev=1-abc?attachments=true",
        "/echo/a%20b/%7Euser?q=%2F&r=a+b;c=d&e=%26",
        "/echo/db/_changes?feed=longpoll&since=0%3A1&filter=sync_gateway%2Fbychannel",
        "/echo/%E2%9C%93/%e2%9c%93?x=%E2%9C%93",
        "/echo//double//slash/",
    ],
)
async def test_path_and_query_unchanged(
    proxy: Proxy, client: aiohttp.ClientSession, raw: str
) -> None:
    async with client.get(proxy.url(raw)) as resp:
        assert resp.status == 200
        assert (await resp.json())["raw_path"] == raw


async def test_identity_and_hygiene_reach_upstream(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer secret-token",
        "Cookie": "other=1; SyncGatewaySession=abc",
        "X-Forwarded-User": "mallory",
        "X_Forwarded_Roles": "admin",
        "X-Forwarded-For": "6.6.6.6",
        "X-Custom": "kept",
    }
    async with client.get(proxy.url("/echo/x"), headers=headers) as resp:
        seen = CIMultiDict((await resp.json())["headers"])
    assert seen.getall("X-Forwarded-User") == ["alice"]
    assert seen["X-Forwarded-Roles"] == "admin,editor"
    assert seen["X-Forwarded-Email"] == "alice@example.com"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Request-ID"] == "req-1"
    assert seen["Cookie"] == "other=1"
    assert seen["X-Custom"] == "kept"
    assert "Authorization" not in seen
    assert "X_Forwarded_Roles" not in seen


async def test_no_default_headers_added(proxy: Proxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /echo/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    )
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    seen = dict(json.loads(raw.split(b"\r\n\r\n", 1)[1])["headers"])
    for name in ("User-Agent", "Accept", "Accept-Encoding", "Content-Type"):
        assert name not in seen
    assert seen["Content-Length"] == "3"
    assert seen["Host"].startswith("127.0.0.1:")


async def test_content_length_upload_preserved(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    body = os.urandom(300_000)
    async with client.put(proxy.url("/echo/x"), data=body) as resp:
        seen = await resp.json()
    headers = dict(seen["headers"])
    assert headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in headers
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()


async def test_chunked_upload(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    pieces = [os.urandom(n) for n in (1, 70_000, 3, 200_000)]

    async def gen() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.01)

    async with client.post(proxy.url("/echo/x"), data=gen()) as resp:
        seen = await resp.json()
    headers = dict(seen["headers"])
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in headers
    assert seen["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


@pytest.mark.parametrize("with_length", [True, False])
async def test_download(proxy: Proxy, client: aiohttp.ClientSession, with_length: bool) -> None:
    size = 3 * MiB + 7
    async with client.get(proxy.url(f"/download?size={size}&length={int(with_length)}")) as resp:
        body = await resp.read()
        if with_length:
            assert resp.headers["Content-Length"] == str(size)
            assert "Transfer-Encoding" not in resp.headers
        else:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in resp.headers
    assert body == (PATTERN * 13)[:size]


async def test_no_decompression(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    async with client.get(proxy.url("/gzip"), headers={"Accept-Encoding": "gzip"}) as resp:
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(raw))
    assert gzip.decompress(raw) == b"hello " * 1000


async def test_redirect_not_followed_and_cookies_relayed(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url("/redirect"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_large_streams_stay_in_bounded_memory(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    size = 200 * MiB
    peak = start = rss()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await asyncio.sleep(0.05)

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(size // len(PATTERN)):
            yield PATTERN

    sampler = asyncio.create_task(sample())
    try:
        async with client.post(proxy.url("/echo/big"), data=upload()) as resp:
            assert (await resp.json())["length"] == size
        received = 0
        async with client.get(proxy.url(f"/download?size={size}")) as resp:
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        assert received == size
    finally:
        sampler.cancel()
    assert peak - start < 50 * MiB, f"memory grew by {(peak - start) / MiB:.0f} MiB"


async def test_upstream_down_is_502(make_proxy: MakeProxy, client: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(f"http://127.0.0.1:{closed_port()}")
    async with client.get(proxy.url("/echo/x")) as resp:
        assert resp.status == 502
        assert await resp.json() == {
            "error": "Bad Gateway",
            "reason": "upstream unavailable: connection refused",
        }


async def _broken_upstream(behaviour: str) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if behaviour == "garbage":
            writer.write(b"SMTP ready\r\n\r\n")
            await writer.drain()
        elif behaviour == "gzip-coded":  # a transfer coding the sidecar would not decode
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc")
            await writer.drain()
        elif behaviour == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("close", "upstream unavailable: connection closed"),
        ("garbage", "upstream unavailable: invalid response"),
        ("gzip-coded", "upstream unavailable: invalid response"),
        ("reset", "upstream unavailable: connection reset by peer"),
    ],
)
async def test_broken_upstream_is_502(
    make_proxy: MakeProxy, client: aiohttp.ClientSession, behaviour: str, reason: str
) -> None:
    server = await _broken_upstream(behaviour)
    try:
        port = server.sockets[0].getsockname()[1]
        proxy = await make_proxy(f"http://127.0.0.1:{port}")
        async with client.get(proxy.url("/x")) as resp:
            assert resp.status == 502
            assert await resp.json() == {"error": "Bad Gateway", "reason": reason}
    finally:
        server.close()
        await server.wait_closed()


async def test_upstream_slow_is_504(
    make_proxy: MakeProxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.base, read_timeout=0.3)
    async with client.get(proxy.url("/slow-headers")) as resp:
        assert resp.status == 504
        assert await resp.json() == {
            "error": "Gateway Timeout",
            "reason": "upstream did not answer in time",
        }


async def test_upstream_slow_mid_body_aborts(
    make_proxy: MakeProxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.base, read_timeout=0.3)
    async with client.get(proxy.url("/slow-body")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


@pytest.mark.parametrize("with_length", [True, False])
async def test_upstream_closing_mid_body_aborts(
    proxy: Proxy, client: aiohttp.ClientSession, with_length: bool
) -> None:
    async with client.get(proxy.url(f"/truncate?length={int(with_length)}")) as resp:
        if with_length:
            # A small body with a Content-Length is read whole before answering, so the cut
            # is seen in time for a clean 502 instead of a truncated 200.
            assert resp.status == 502
            assert (await resp.json())["error"] == "Bad Gateway"
            return
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


@pytest.fixture(params=[False, True], ids=["default", "handler_cancellation"])
async def either_proxy(
    request: pytest.FixtureRequest, make_proxy: MakeProxy, upstream: Upstream
) -> Proxy:
    return await make_proxy(upstream.base, handler_cancellation=request.param)


async def test_client_disconnect_mid_download_releases_upstream(
    either_proxy: Proxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = either_proxy
    resp = await client.get(proxy.url("/infinite"))
    await resp.content.readexactly(MiB)
    resp.close()
    await asyncio.wait_for(upstream.event("infinite_closed").wait(), 5)


async def test_client_disconnect_mid_upload_releases_upstream(
    either_proxy: Proxy, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", either_proxy.port)
    writer.write(
        b"POST /upload-hold HTTP/1.1\r\nHost: h\r\nContent-Length: 10000000\r\n\r\n" + PATTERN
    )
    await writer.drain()
    await asyncio.wait_for(upstream.event("upload_started").wait(), 5)
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(upstream.event("upload_broken").wait(), 5)
    assert not upstream.event("upload_done").is_set()


async def test_client_disconnect_while_waiting_releases_upstream(
    either_proxy: Proxy, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", either_proxy.port)
    writer.write(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(upstream.event("hold_started").wait(), 5)
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(upstream.event("hold_closed").wait(), 5)


async def test_declared_body_too_large_never_reaches_upstream(
    make_proxy: MakeProxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.base, max_body_bytes=1000)
    async with client.post(proxy.url("/echo/x"), data=b"x" * 1001) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "Request Entity Too Large"
    assert upstream.requests == []
    async with client.post(proxy.url("/echo/x"), data=b"x" * 1000) as resp:
        assert resp.status == 200


async def test_streamed_body_too_large(
    make_proxy: MakeProxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.base, max_body_bytes=100_000)

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 40_000

    async with client.post(proxy.url("/echo/x"), data=gen()) as resp:
        assert resp.status == 413


# --------------------------------------------------------------------------- what the upstream answers


@asynccontextmanager
async def _answering(response: bytes) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw upstream answering every request with exactly `response` (keep-alive); it lists
    the request heads it read."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads
    finally:
        server.close()


async def _raw_get(port: int, headers: bytes = b"") -> bytes:
    """The client's view, byte for byte: status line, header section and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n" + headers + b"Connection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def _length(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def _chunked(body: bytes) -> bytes:
    return b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 O\x01K\r\n" + _length(b"ok"),
        b"HTTP/1.1 200 O\x01K\r\n" + _chunked(b"ok"),
        b"HTTP/1.1 200 O\x7fK\r\n" + _length(b"ok"),
        b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\n" + _length(b"ok"),
        b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\n" + _chunked(b"ok"),
        b"HTTP/1.1 000 Zero\r\n" + _length(b"ok"),
        b"HTTP/1.1 999 Nine\r\n" + _length(b"ok"),
        b"HTTP/1.1 600 Six\r\n" + _chunked(b"ok"),
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=[
        "reason-ctl",
        "reason-ctl-streamed",
        "reason-del",
        "value-ctl",
        "value-del-streamed",
        "status-0",
        "status-999",
        "status-600",
        "unasked-101",
    ],
)
async def test_answers_aiohttp_cannot_write_are_502(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture, answer: bytes
) -> None:
    """Never a traceback and a cut connection: a clean 502 before anything was sent."""
    async with _answering(answer) as (base, _):
        proxy = await make_proxy(base)
        with caplog.at_level(logging.WARNING):
            got = await raw_http(proxy.port, "/x")
    assert got.status == 502
    assert got.json() == {
        "error": "Bad Gateway",
        "reason": "upstream unavailable: invalid response",
    }
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # Reason phrases and field values the writer can send arrive byte for byte.
        (b"HTTP/1.1 200 O\tK\r\n" + _length(b"ok"), b"HTTP/1.1 200 O\tK\r\n"),
        (b"HTTP/1.1 299 Caf\xc3\xa9\r\n" + _length(b"ok"), b"HTTP/1.1 299 Caf\xc3\xa9\r\n"),
        (
            b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\n" + _length(b"ok"),
            b"\r\nX-Name: caf\xc3\xa9\r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\n" + _chunked(b"ok"),
            b"\r\nX-Name: caf\xc3\xa9\r\n",
        ),
        (b"HTTP/1.1 200 OK\r\nX-Tab: a\tb\r\n" + _length(b"ok"), b"\r\nX-Tab: a\tb\r\n"),
        # The upstream's own Server and Content-Type are kept.
        (
            b"HTTP/1.1 200 OK\r\nServer: upstream/1\r\n" + _length(b"ok"),
            b"\r\nServer: upstream/1\r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/x\r\n" + _chunked(b"ok"),
            b"\r\nContent-Type: text/x\r\n",
        ),
    ],
    ids=[
        "reason-tab",
        "reason-utf8",
        "value-utf8",
        "value-utf8-streamed",
        "value-tab",
        "server",
        "type",
    ],
)
async def test_answers_pass_unchanged(
    make_proxy: MakeProxy, answer: bytes, expected: bytes
) -> None:
    async with _answering(answer) as (base, _):
        proxy = await make_proxy(base)
        data = await _raw_get(proxy.port)
    assert expected in data.split(b"\r\n\r\n")[0] + b"\r\n", data


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\n" + _length(b"ok"),
        b"HTTP/1.1 200 OK\r\n" + _chunked(b"ok"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Trailer: t\r\nSet-Cookie: planted=1\r\nContent-Type: text/evil\r\n\r\n",
    ],
    ids=["small", "streamed", "trailers"],
)
async def test_nothing_is_added_to_an_answer(make_proxy: MakeProxy, answer: bytes) -> None:
    """A transparent proxy adds no Content-Type (aiohttp's default application/octet-stream)
    and no Server header, and trailers never become header fields (RFC 9110 6.5.1)."""
    async with _answering(answer) as (base, _):
        proxy = await make_proxy(base)
        got = await raw_http(proxy.port, "/x")
        again = await raw_http(proxy.port, "/x")  # the same pooled connection: still clean
    for answered in (got, again):
        assert answered.status == 200 and answered.body == b"ok"
        names = {name.lower() for name, _ in answered.headers}
        assert names & {"content-type", "server", "x-trailer", "set-cookie"} == set()


async def test_request_header_bytes_reach_the_upstream_unchanged(make_proxy: MakeProxy) -> None:
    async with _answering(b"HTTP/1.1 204 No Content\r\n\r\n") as (base, heads):
        proxy = await make_proxy(base)
        data = await _raw_get(proxy.port, b"X-Name: caf\xc3\xa9\r\nX-Tab: a\tb\r\n")
        assert data.startswith(b"HTTP/1.1 204 ")
        assert b"\r\nX-Name: caf\xc3\xa9\r\n" in heads[0]
        assert b"\r\nX-Tab: a\tb\r\n" in heads[0]
        # Not UTF-8: aiohttp's client would leave the byte out ("Sess\xffion" would reach the
        # upstream as "Session"), so that transport refuses; httptools' sends it unchanged.
        cookie = b"Cookie: SyncGatewaySess\xffion=planted\r\n"
        data = await _raw_get(proxy.port, cookie)
    if proxy.transport == "aiohttp":
        assert data.startswith(b"HTTP/1.1 400 ")
        assert len(heads) == 1
    else:
        assert data.startswith(b"HTTP/1.1 204 ")
        assert b"\r\n" + cookie in heads[1]


async def test_bytes_on_an_idle_upstream_connection_close_it(make_proxy: MakeProxy) -> None:
    """Security: an answer nobody asked for (a late second answer to one request) is never
    read as the next request's answer, nor does it shift every later answer by one."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\n" + _length(b"one" if first else b"two"))
                if first:
                    await asyncio.sleep(0.05)
                    writer.write(b"HTTP/1.1 200 OK\r\n" + _length(b"EVIL"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        proxy = await make_proxy(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        bodies = []
        for _ in range(3):
            bodies.append((await raw_http(proxy.port, "/x")).body)
            await asyncio.sleep(0.2)
    finally:
        server.close()
    assert bodies == [b"one", b"two", b"two"]
    assert connections == 2


async def test_the_sidecars_own_answers_name_no_versions(upstream: Upstream) -> None:
    config = base_config(free_port(), free_port(), upstream=upstream.base, databases={"db": {}})
    async with running_sidecar(config) as sidecar:
        own = [
            await raw_exchange(
                sidecar.port, b"GET /_health HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            ),
            await raw_exchange(
                sidecar.port, b"GET /db/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            ),
            # aiohttp's own 400 for a request it cannot parse
            await raw_exchange(sidecar.port, b"GET /_health HTTP/1.1\r\nBad Header\r\n\r\n"),
        ]
    assert [answer.status for answer in own] == [200, 401, 400]
    for answer in own:
        assert answer.header("Server") == ["oidc-sidecar"]


# --------------------------------------------------------------------------- WebSocket


async def next_log(upstream: Upstream, kind: str) -> tuple[Any, ...]:
    while True:
        entry = await asyncio.wait_for(upstream.ws_log.get(), 5)
        if entry[0] == kind:
            return entry


async def test_ws_relays_text_and_binary(
    proxy: Proxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(proxy.url("/ws")) as ws:
        _, _, headers = await next_log(upstream, "open")
        assert headers["X-Forwarded-User"] == "alice"
        await ws.send_str("hello ✓")
        assert await ws.receive_str(timeout=5) == "hello ✓"
        await ws.send_bytes(b"\x00\x01" * 1000)
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01" * 1000


async def test_ws_relays_pings_both_ways(
    proxy: Proxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(proxy.url("/ws"), autoping=False) as ws:
        await ws.ping(b"p1")
        assert await next_log(upstream, "ping") == ("ping", b"p1")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"p1")
        await ws.send_str("ping-me")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PING, b"u1")
        await ws.pong(b"u1")
        assert await next_log(upstream, "pong") == ("pong", b"u1")


async def test_ws_client_close_reaches_upstream(
    proxy: Proxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    ws = await client.ws_connect(proxy.url("/ws"))
    await ws.close(code=4001, message=b"bye")
    assert await next_log(upstream, "close") == ("close", 4001, "bye")
    assert ws.close_code == 4001


async def test_ws_upstream_close_reaches_client(
    proxy: Proxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(proxy.url("/ws"), autoclose=False) as ws:
        await ws.send_str("close:4002")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "server bye")
        await ws.close(code=4002)
    assert await next_log(upstream, "closed") == ("closed", 4002)


async def test_ws_sidecar_close_closes_both(
    proxy: Proxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(proxy.url("/ws")) as ws:
        await next_log(upstream, "open")
        assert len(proxy.opened) == 1
        await proxy.opened[0].close(code=1008, message=b"session revoked")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "session revoked")
    assert await next_log(upstream, "close") == ("close", 1008, "session revoked")


async def test_ws_client_vanishing_closes_upstream(proxy: Proxy, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    await next_log(upstream, "open")
    writer.close()
    await writer.wait_closed()
    assert await next_log(upstream, "close") == ("close", 1001, "")


async def test_ws_upstream_vanishing_closes_client(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(proxy.url("/ws")) as ws:
        await ws.send_str("vanish")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1014, "upstream went away")


@pytest.mark.parametrize(
    ("offered", "chosen", "header"),
    [(("a", "b"), "b", "a,b"), (("x",), None, "x"), ((), None, None)],
)
async def test_ws_subprotocol(
    proxy: Proxy,
    upstream: Upstream,
    client: aiohttp.ClientSession,
    offered: tuple[str, ...],
    chosen: str | None,
    header: str | None,
) -> None:
    async with client.ws_connect(proxy.url("/ws"), protocols=offered) as ws:
        assert ws.protocol == chosen
        _, seen, _ = await next_log(upstream, "open")
        assert seen == header


@pytest.mark.parametrize(
    "offered", [("b",), ("BLIP_3+CBMobile_3",), ("x", "c")], ids=["chosen", "declined", "second"]
)
async def test_ws_subprotocols_log_no_warnings(
    proxy: Proxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    offered: tuple[str, ...],
) -> None:
    """The sidecar relays the upstream's choice of subprotocol (none is a valid one): aiohttp's
    "protocols don't overlap" warnings (twice per Couchbase Lite connection) are noise."""
    with caplog.at_level(logging.DEBUG, logger="aiohttp.websocket"):
        async with client.ws_connect(proxy.url("/ws"), protocols=offered) as ws:
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=5) == "hi"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_ws_message_too_big(
    make_proxy: MakeProxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.base, ws_max_msg_size=1024)
    async with client.ws_connect(proxy.url("/ws")) as ws:
        await ws.send_bytes(b"x" * 1000)
        assert len(await ws.receive_bytes(timeout=5)) == 1000
        await ws.send_bytes(b"x" * 2000)
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    assert await next_log(upstream, "close") == ("close", 1001, "")


async def test_ws_upstream_refusal_is_502(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(proxy.url("/ws-refuse"))
    assert info.value.status == 502
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with client.get(proxy.url("/ws-refuse"), headers=headers) as resp:
        assert resp.status == 502
        assert await resp.json() == {
            "error": "Bad Gateway",
            "reason": "upstream refused the WebSocket upgrade (status 403)",
        }


async def test_ws_upstream_down_is_502(
    make_proxy: MakeProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(proxy.url("/ws"))
    assert info.value.status == 502


async def test_ws_bad_upgrade_request_is_400(
    proxy: Proxy, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(
        proxy.url("/ws"), headers={"Upgrade": "websocket", "Connection": "Upgrade"}
    ) as resp:
        assert resp.status == 400
    assert upstream.requests == []
