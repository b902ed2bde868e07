"""The httptools upstream transport against scripted raw upstreams on 127.0.0.1: framing,
connection reuse, interim answers, and the desyncs that must close a connection.

The upstreams here are raw asyncio servers that write exact bytes, so each case shows what the
transport does with a response no well-behaved server library would produce. The forwarder's
end-to-end behaviour over this transport is covered by tests/test_proxy.py (parametrized)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from sidecar.upstream_h1 import HIGH_WATER, H1Pool, UpstreamProtocolError

Script = Callable[["RawConn"], Awaitable[None]]


@dataclass
class RawConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self) -> bytes:
        """One request's head (and a Content-Length body, or a chunked body to its end)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        if b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            return head + await self.reader.readexactly(length)
        if b"transfer-encoding: chunked" in lower:
            return head + await self.reader.readuntil(b"0\r\n\r\n")
        return head


@dataclass
class RawUpstream:
    script: Script
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> URL:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}/doc?x=1", encoded=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(RawConn(reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Script], Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> RawUpstream:
        upstream = RawUpstream(script)
        upstream.server = await asyncio.start_server(upstream._handle, "127.0.0.1", 0)
        servers.append(upstream.server)
        return upstream

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def pool() -> AsyncIterator[H1Pool]:
    p = H1Pool(connect_timeout=2.0, read_timeout=2.0)
    yield p
    await p.close()


def answer(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s%s" % (len(body), body, extra)


def serve_forever(response: bytes, upstream_box: list[RawUpstream]) -> Script:
    async def script(conn: RawConn) -> None:
        while True:
            upstream_box[0].requests.append(await conn.request())
            conn.writer.write(response)
            await conn.writer.drain()

    return script


async def settled() -> None:
    """Two turns of the loop: a released connection is idle (reusable) from then on."""
    for _ in range(2):
        await asyncio.sleep(0)


async def get(pool: H1Pool, url: URL, method: str = "GET") -> tuple[int, bytes]:
    response = await pool.request(method, url, CIMultiDict(), None)
    body = await response.read()
    response.release()
    await settled()  # as a client's next request comes after a round trip
    return response.status, body


async def start_serving(
    raw: Callable[[Script], Awaitable[RawUpstream]], response: bytes
) -> RawUpstream:
    box: list[RawUpstream] = []
    upstream = await raw(serve_forever(response, box))
    box.append(upstream)
    return upstream


async def test_keep_alive_reuses_one_connection(raw, pool: H1Pool) -> None:
    upstream = await start_serving(raw, answer())
    for _ in range(3):
        assert await get(pool, upstream.url) == (200, b"hello")
    assert upstream.connections == 1
    assert len(upstream.requests) == 3


async def test_request_head_on_the_wire(raw, pool: H1Pool) -> None:
    upstream = await start_serving(raw, answer())
    headers = CIMultiDict([("X-Two", "a"), ("X-Two", "b"), ("Host", "spoofed")])
    response = await pool.request("GET", upstream.url, headers, None)
    await response.read()
    response.release()
    head = upstream.requests[0].decode()
    lines = head.split("\r\n")
    assert lines[0] == "GET /doc?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{upstream.url.port}" in lines
    assert "Host: spoofed" not in lines
    assert lines.count("X-Two: a") == 1 and lines.count("X-Two: b") == 1


async def test_body_framing(raw, pool: H1Pool) -> None:
    upstream = await start_serving(raw, answer())

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defg"

    # No length known: chunked, whatever the client's framing was.
    r = await pool.request("POST", upstream.url, CIMultiDict(), body())
    await r.read()
    r.release()
    await settled()
    assert upstream.requests[-1].endswith(
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    # A Content-Length the server already checked: sent as is, the body raw.
    r = await pool.request("PUT", upstream.url, CIMultiDict({"content-length": "7"}), body())
    await r.read()
    r.release()
    await settled()
    assert upstream.requests[-1].endswith(b"Content-Length: 7\r\n\r\nabcdefg")
    # No body on a POST: an explicit zero length (some servers answer 411 without one).
    r = await pool.request("POST", upstream.url, CIMultiDict(), None)
    await r.read()
    r.release()
    assert upstream.requests[-1].endswith(b"Content-Length: 0\r\n\r\n")
    assert upstream.connections == 1


@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
async def test_header_injection_is_refused(raw, pool: H1Pool, bad: str) -> None:
    upstream = await start_serving(raw, answer())
    with pytest.raises(ValueError):
        await pool.request("GET", upstream.url, CIMultiDict({"X-A": bad}), None)
    with pytest.raises(ValueError):
        await pool.request("GET", upstream.url, CIMultiDict({bad: "v"}), None)
    assert upstream.requests == []


async def test_unread_body_is_never_reused(raw, pool: H1Pool) -> None:
    upstream = await start_serving(raw, answer(b"x" * 100_000))
    response = await pool.request("GET", upstream.url, CIMultiDict(), None)
    response.close()  # the client went away mid-body
    assert await get(pool, upstream.url) == (200, b"x" * 100_000)
    assert upstream.connections == 2


async def test_bytes_after_the_response_close_the_connection(raw, pool: H1Pool) -> None:
    """Security: a smuggled second answer must never become the answer to the next request."""
    evil = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
    upstream = await start_serving(raw, answer(b"first", extra=evil))
    assert await get(pool, upstream.url) == (200, b"first")
    assert await get(pool, upstream.url) == (200, b"first")
    assert upstream.connections == 2


async def test_unsolicited_bytes_on_an_idle_connection_close_it(raw, pool: H1Pool) -> None:
    async def script(conn: RawConn) -> None:
        await conn.request()
        conn.writer.write(answer(b"one"))
        await conn.writer.drain()
        await asyncio.sleep(0.05)
        conn.writer.write(answer(b"EVIL"))  # nobody asked
        await conn.writer.drain()
        await conn.request()
        conn.writer.write(answer(b"late"))

    box: list[RawUpstream] = []

    async def second(conn: RawConn) -> None:
        if box[0].connections == 1:
            await script(conn)
        else:
            await conn.request()
            conn.writer.write(answer(b"two"))
            await conn.writer.drain()

    upstream = await raw(second)
    box.append(upstream)
    assert await get(pool, upstream.url) == (200, b"one")
    await asyncio.sleep(0.2)
    assert await get(pool, upstream.url) == (200, b"two")
    assert upstream.connections == 2


async def test_a_released_connection_is_reused_only_once_polled(raw, pool: H1Pool) -> None:
    """Security: a second answer the upstream sent just after the first may still be in the
    kernel when the first exchange ends. Had the connection gone back to the pool at once,
    the next request would read it as its own answer; it is idle only after two turns of the
    loop, by which time those bytes have arrived and closed it."""

    async def script(conn: RawConn) -> None:
        await conn.request()
        conn.writer.write(answer(b"one"))
        # A separate segment, sent as the client is about to take the first answer.
        for _ in range(2):
            await asyncio.sleep(0)
        conn.writer.write(answer(b"EVIL"))
        await conn.request()
        conn.writer.write(answer(b"EVIL"))

    box: list[RawUpstream] = []

    async def first_then_honest(conn: RawConn) -> None:
        if box[0].connections == 1:
            await script(conn)
        else:
            await serve_forever(answer(b"two"), box)(conn)

    upstream = await raw(first_then_honest)
    box.append(upstream)
    response = await pool.request("GET", upstream.url, CIMultiDict(), None)
    assert await response.read() == b"one"
    response.release()
    assert await get(pool, upstream.url) == (200, b"two")  # at once: not reused yet
    assert await get(pool, upstream.url) == (200, b"two")  # settled: the first one closed
    assert upstream.connections == 2


async def test_interim_answers_are_skipped(raw, pool: H1Pool) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    )
    upstream = await start_serving(raw, interim + answer(b"final"))
    response = await pool.request("GET", upstream.url, CIMultiDict(), None)
    assert response.status == 200
    assert "Link" not in response.headers
    assert await response.read() == b"final"
    response.release()
    await settled()
    assert await get(pool, upstream.url) == (200, b"final")
    assert upstream.connections == 1


async def test_head_answer_has_no_body(raw, pool: H1Pool) -> None:
    upstream = await start_serving(raw, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    response = await pool.request("HEAD", upstream.url, CIMultiDict(), None)
    assert response.status == 200
    assert response.content_length == 10
    assert await response.read() == b""
    response.release()
    # httptools cannot skip a HEAD answer's announced body, so that connection is not reused.
    assert (await pool.request("HEAD", upstream.url, CIMultiDict(), None)).status == 200
    assert upstream.connections == 2


async def test_body_until_close(raw, pool: H1Pool) -> None:
    async def script(conn: RawConn) -> None:
        await conn.request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await conn.writer.drain()

    upstream = await raw(script)
    assert await get(pool, upstream.url) == (200, b"all of it")


async def test_chunked_answer(raw, pool: H1Pool) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    upstream = await start_serving(raw, chunked)
    assert await get(pool, upstream.url) == (200, b"abcde")
    assert await get(pool, upstream.url) == (200, b"abcde")
    assert upstream.connections == 1


async def test_trailers_are_dropped(raw, pool: H1Pool) -> None:
    """RFC 9110 6.5.1: trailer fields are never merged into the header section."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: h\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Trailer: t\r\nSet-Cookie: planted=1\r\n\r\n"
    )
    upstream = await start_serving(raw, chunked)
    for _ in range(2):
        response = await pool.request("GET", upstream.url, CIMultiDict(), None)
        assert await response.read() == b"ok"
        response.release()
        await settled()
        assert response.headers["X-Head"] == "h"
        assert "X-Trailer" not in response.headers and "Set-Cookie" not in response.headers
    assert upstream.connections == 1


async def test_non_ascii_bytes_are_decoded_as_aiohttp_does(raw, pool: H1Pool) -> None:
    """UTF-8 with surrogateescape, as aiohttp's parser: its writer then sends valid UTF-8
    unchanged (latin-1 here would double-encode it)."""
    upstream = await start_serving(
        raw,
        b"HTTP/1.1 200 Caf\xc3\xa9\r\nX-A: caf\xc3\xa9\r\nX-B: caf\xe9\r\nContent-Length: 0\r\n\r\n",
    )
    response = await pool.request("GET", upstream.url, CIMultiDict(), None)
    await response.read()
    response.release()
    assert response.reason == "Café"
    assert response.headers["X-A"] == "café"
    assert response.headers["X-B"] == "caf\udce9"


async def test_request_header_bytes_are_sent_unchanged(raw, pool: H1Pool) -> None:
    """Valid UTF-8 as aiohttp's client sends it; bytes that are not UTF-8 (surrogates, as
    aiohttp's server decodes them) as they came, where aiohttp's client would leave them out."""
    upstream = await start_serving(raw, answer())
    headers = CIMultiDict({"X-A": "café", "X-B": "caf\udce9", "X-C": "a\tb"})
    response = await pool.request("GET", upstream.url, headers, None)
    await response.read()
    response.release()
    assert b"\r\nX-A: caf\xc3\xa9\r\nX-B: caf\xe9\r\nX-C: a\tb\r\n" in upstream.requests[0]


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 199 Odd\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=[
        "cl-and-te",
        "two-lengths",
        "negative-length",
        "bad-chunk",
        "bad-header",
        "upgrade",
        "odd-1xx",
        "garbage",
    ],
)
async def test_ambiguous_or_invalid_answers_fail_and_close(
    raw, pool: H1Pool, response: bytes
) -> None:
    upstream = await start_serving(raw, response)
    with pytest.raises((aiohttp.ClientError, OSError)):
        r = await pool.request("GET", upstream.url, CIMultiDict(), None)
        await r.read()
    with pytest.raises((aiohttp.ClientError, OSError)):
        r = await pool.request("GET", upstream.url, CIMultiDict(), None)
        await r.read()
    assert upstream.connections == 2  # never reused


async def test_truncated_body_is_an_error(raw, pool: H1Pool) -> None:
    async def script(conn: RawConn) -> None:
        await conn.request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await conn.writer.drain()

    upstream = await raw(script)
    response = await pool.request("GET", upstream.url, CIMultiDict(), None)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await response.read()


async def test_stale_keep_alive_is_retried_for_idempotent_requests(raw, pool: H1Pool) -> None:
    async def script(conn: RawConn) -> None:
        await conn.request()
        conn.writer.write(answer(b"ok"))
        await conn.writer.drain()
        # then the upstream's keep-alive timeout closes the connection

    upstream = await raw(script)
    assert await get(pool, upstream.url) == (200, b"ok")
    await asyncio.sleep(0.05)
    assert await get(pool, upstream.url) == (200, b"ok")
    assert upstream.connections == 2


async def test_silence_is_a_timeout(raw) -> None:
    async def script(conn: RawConn) -> None:
        await conn.request()
        await asyncio.sleep(5)

    upstream = await raw(script)
    pool = H1Pool(connect_timeout=1.0, read_timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            await pool.request("GET", upstream.url, CIMultiDict(), None)
    finally:
        await pool.close()


async def test_early_answer_during_upload_is_delivered_and_not_reused(raw, pool: H1Pool) -> None:
    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        conn.writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
        await conn.writer.drain()
        await asyncio.sleep(1)

    upstream = await raw(script)
    gate = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await gate.wait()
        yield b"y" * 10

    response = await pool.request("POST", upstream.url, CIMultiDict(), slow_body())
    assert response.status == 401
    assert await response.read() == b"no"
    response.release()
    gate.set()
    await asyncio.sleep(0)
    assert (await pool.request("GET", upstream.url, CIMultiDict(), None)).status == 401
    assert upstream.connections == 2


async def test_slow_reader_pauses_the_upstream(raw, pool: H1Pool) -> None:
    """Backpressure: a client that does not read leaves the upstream's bytes in the kernel."""
    size = 20 * 1024 * 1024

    async def script(conn: RawConn) -> None:
        await conn.request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"z" * 65536
        for _ in range(size // len(chunk)):
            conn.writer.write(chunk)
            await conn.writer.drain()

    upstream = await raw(script)
    response = await pool.request("GET", upstream.url, CIMultiDict(), None)
    await asyncio.sleep(0.3)
    buffered = response._conn._buffered
    assert buffered <= HIGH_WATER + 256 * 1024
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
    assert total == size
    response.release()


async def test_connect_failure_is_an_os_error(pool: H1Pool) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError) as info:
        await pool.request("GET", URL(f"http://127.0.0.1:{port}/"), CIMultiDict(), None)
    assert isinstance(info.value, ConnectionRefusedError)


async def test_protocol_error_type() -> None:
    assert issubclass(UpstreamProtocolError, aiohttp.ClientError)
