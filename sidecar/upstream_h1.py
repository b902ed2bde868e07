"""HTTP/1.1 to the upstream on asyncio transports and httptools' C parser (llhttp).

The proxied path needs one thing from an HTTP client: pooled keep-alive HTTP/1.1 to a few
upstreams, streaming both ways. aiohttp's ClientSession does much more (tracing, cookies,
redirects, per-request objects) and costs for it on every request; this does only that.

Guarantees (the same as the ClientSession path): bodies stream both ways with backpressure
(the upstream socket stops being read while the client is slow; the client's body is sent no
faster than the upstream takes it); Content-Length and chunked bodies; 1xx interim answers are
skipped; trailer fields are dropped (RFC 9110 6.5.1); header bytes are decoded as aiohttp's
parser does (UTF-8, surrogateescape) so they reach the client as they came; `connect` bounds
connecting, `read` the longest silence of the upstream; a connection is reused only after an
exchange that was read completely and that both sides agreed to keep alive.

Security (a response queue out of step with the requests): a response that does not fit its
request — bytes after its end, an unexpected upgrade, a parse error — closes the connection,
and so do bytes arriving on a connection with no exchange in progress. A released connection
becomes idle only two turns of the event loop later (H1Pool.settle), so bytes an upstream sent
just after a complete answer, still in the kernel when the exchange ended, close it instead of
being read as the next request's answer. What no HTTP/1.1 pool can do (nginx's and HAProxy's
neither): bytes that arrive only after the next request went out on the connection cannot be
told apart from its answer. An upstream that answers one request twice, the second time late,
can thus answer a later request on that connection; the answer that follows then finds bytes
after its end and the connection closes. Clean request framing (the sidecar re-frames every
body) keeps clients from making the upstream do that.
WebSocket upgrades stay on aiohttp's client (see Forwarder.websocket).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# Read from the upstream at most this much ahead of the client before pausing the socket.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# RFC 9110 9.2.2: safe to send again on a fresh connection when a reused one was found closed.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose empty request still states its length (as aiohttp does): some servers want it.
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "DELETE"})


class UpstreamProtocolError(aiohttp.ClientResponseError):
    """The upstream's bytes are not a valid answer to our request."""

    def __init__(self, message: str) -> None:
        super().__init__(None, (), message=message)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.message


class _Connection(asyncio.Protocol):
    """One upstream connection and the exchange running on it (at most one at a time)."""

    def __init__(self, pool: H1Pool, key: tuple[str, int, bool]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        # The exchange in progress.
        self.busy = False
        self._head_only = False  # a HEAD: the answer has no body whatever its headers say
        self._status = 0
        self._reason = ""
        self._keep_alive_ok = False
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._headers_done = False
        self._complete = False
        self._framed = False  # Content-Length or chunked: EOF before the end is a truncation
        self._got_bytes = False
        self._desync = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self._complete:
            # Security: bytes nobody asked for can only be a desync; never reuse this socket.
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            if self._desync:
                self.close()
                self._wake()
            elif self._error is None:
                self._fail(UpstreamProtocolError(f"invalid response: {exc}"))
        if self._head_only and self._headers_done and not self._complete:
            # httptools cannot be told a HEAD answer has no body: end it here, never reuse.
            self._complete = True
            self._keep_alive_ok = False
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost finishes the exchange

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.busy and not self._complete and self._error is None:
            if self._headers_done and not self._framed:
                # RFC 9112 6.3 item 8: no length and no chunking, the body ends with the
                # connection.
                self._complete = True
                self._keep_alive_ok = False
            elif isinstance(exc, OSError):
                self._error = exc  # a reset: the client hears "connection reset by peer"
            else:
                self._error = aiohttp.ServerDisconnectedError()
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("upstream connection lost"))

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._headers_done:
            # Security: a second answer to one request is a desync: stop parsing and close
            # (the first answer, complete, is still delivered).
            self._desync = True
            raise UpstreamProtocolError("a second response to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools joins the pieces of a header that arrived split before calling this.
        if self._headers_done:
            # A chunked body's trailer fields: dropped, as aiohttp's client does (RFC 9110
            # 6.5.1: never merged into the header section, which has already gone out).
            return
        # Decoded as aiohttp's parser does, so the bytes reach the client unchanged (its
        # writer encodes UTF-8; invalid UTF-8 bytes become surrogates, which it leaves out).
        self._headers.add(
            name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status in (100, 102, 103):  # interim: llhttp restarts for the final answer
                self._headers = CIMultiDict()
                return
            raise UpstreamProtocolError(f"unexpected interim status {status}")
        codings = self._headers.getall("Transfer-Encoding", ())
        if codings and not only_chunked(codings):
            # The sidecar relays the body without decoding it and re-frames it for the client
            # without Transfer-Encoding: any other coding would reach it as if it were the
            # content (RFC 9112 6.1; the request side answers 501 for the same reason).
            raise UpstreamProtocolError("unsupported transfer coding")
        self._status = status
        self._headers_done = True
        self._framed = (
            self._parser.get_http_version() == "1.1"
            and ("Content-Length" in self._headers or bool(codings))
        ) or status in (204, 304)
        self._keep_alive_ok = self._parser.should_keep_alive()
        self._wake()

    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("utf-8", "surrogateescape")

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._headers_done:
            return  # the end of an interim answer
        self._complete = True
        self._wake()

    # -- the exchange -----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self.close()
        self._wake()

    def begin(self, head_only: bool) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.busy = True
        self._head_only = head_only
        self._status = 0
        self._reason = ""
        self._headers = CIMultiDict()
        self._headers_done = self._complete = self._framed = self._got_bytes = False
        self._keep_alive_ok = False
        self._chunks.clear()
        self._buffered = 0
        self._error = None

    def arm(self) -> asyncio.Future[None]:
        """A future the parser completes when it has news (headers, body, end, error)."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    async def wait(self, silence: float) -> None:
        """Until the parser has news, or `silence` seconds without any (TimeoutError)."""
        if self._error is not None:
            raise self._error
        waiter = self.arm()
        timer = asyncio.get_running_loop().call_later(silence, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error

    async def send_body(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if not chunk:
                continue
            if self.closed:
                raise ConnectionResetError("upstream connection lost")
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._drain is not None and not self._drain.done():
                await self._drain
        if chunked and not self.closed:
            transport.write(b"0\r\n\r\n")

    def take(self) -> bytes | None:
        """The body bytes buffered so far (b"" for none yet), None when the body is done."""
        if self._chunks:
            data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            if self._paused and self.transport is not None and not self.closed:
                self._paused = False
                self.transport.resume_reading()
            return data
        return None if self._complete else b""

    def finish(self, *, reuse: bool) -> None:
        """The exchange is over: back to the pool when it ended cleanly, else closed."""
        if self.closed:
            return
        if reuse and self._complete and self._keep_alive_ok and not self._chunks:
            self.busy = False
            self.reused = True
            self._pool.settle(self)
        else:
            self.close()

    def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if not self.closed:
            self.closed = True
            self._pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def idle_until(self, seconds: float) -> None:
        self._idle_timer = asyncio.get_running_loop().call_later(seconds, self.close)


def only_chunked(values: list[str]) -> bool:
    """Transfer-Encoding field values that say "chunked" and nothing else."""
    codings = [c.strip().lower() for value in values for c in value.split(",") if c.strip()]
    return codings == ["chunked"]


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Body:
    """The upstream's body for Forwarder: `content.iter_any()` as on aiohttp's response."""

    __slots__ = ("_response",)

    def __init__(self, response: H1Response) -> None:
        self._response = response

    def iter_any(self) -> H1Response:
        return self._response


class H1Response:
    """The subset of aiohttp.ClientResponse that Forwarder uses."""

    def __init__(
        self,
        conn: _Connection,
        writer: asyncio.Task[None] | None,
        read_timeout: float,
    ) -> None:
        self._conn = conn
        self._writer = writer
        self._read_timeout = read_timeout
        self.status = conn._status
        self.reason = conn._reason
        self.headers = CIMultiDictProxy(conn._headers)
        length = conn._headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.content = _Body(self)
        self._done = False

    def __aiter__(self) -> H1Response:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        while True:
            data = conn.take()
            if data is None:
                raise StopAsyncIteration
            if data:
                return data
            await conn.wait(self._read_timeout)

    async def read(self) -> bytes:
        """The whole body (for answers small enough to relay in one piece)."""
        conn = self._conn
        parts: list[bytes] = []
        while (data := conn.take()) is not None:
            if data:
                parts.append(data)
            else:
                await conn.wait(self._read_timeout)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with a body read to its end: the connection may serve the next request."""
        self._end(reuse=self._writer is None or self._writer.done())

    def close(self) -> None:
        self._end(reuse=False)

    def _end(self, *, reuse: bool) -> None:
        if self._done:
            return
        self._done = True
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()  # the upstream answered before taking the whole body
            reuse = False
        elif writer is not None and (writer.cancelled() or writer.exception() is not None):
            reuse = False
        self._conn.finish(reuse=reuse)


class H1Pool:
    """Keep-alive connections to the upstreams, by (host, port, tls)."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 15.0,
        max_idle_per_host: int = 256,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive_timeout
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self._settling: list[_Connection] = []
        self._settle_scheduled = False

    # -- the pool ---------------------------------------------------------------------------

    def settle(self, conn: _Connection) -> None:
        """A connection whose exchange ended cleanly: idle once the loop has polled its socket.

        Security: bytes the upstream sent after a complete answer (a second answer to one
        request: a desync) may still be in the kernel when the exchange ends. Two turns of
        the loop later every connection whose socket had such bytes has seen them and closed
        (data on a connection with no exchange closes it), so they are never read as the
        answer to the next request. One pair of callbacks per loop turn, for all connections
        released in it: uvloop polls the sockets before each of them; asyncio's loop runs
        the first before, the second after, one turn's socket callbacks.
        """
        self._settling.append(conn)
        if not self._settle_scheduled:
            self._settle_scheduled = True
            asyncio.get_running_loop().call_soon(self._settle_turn)

    def _settle_turn(self) -> None:
        batch, self._settling = self._settling, []
        self._settle_scheduled = False
        asyncio.get_running_loop().call_soon(self._put_idle_all, batch)

    def _put_idle_all(self, batch: list[_Connection]) -> None:
        for conn in batch:
            if not conn.closed and not conn.busy:
                self.put_idle(conn)

    def put_idle(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        idle.append(conn)
        conn.idle_until(self._keepalive)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    async def _connect(self, key: tuple[str, int, bool]) -> _Connection:
        host, port, tls = key
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(
                lambda: _Connection(self, key),
                host,
                port,
                ssl=self._ssl if tls else None,
                server_hostname=host if tls else None,
            )
        self._all.add(conn)
        return conn

    def _reusable(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    # -- one exchange -----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
    ) -> H1Response:
        """Send the request and wait for the answer's status and headers.

        Raises OSError (connecting, sending), TimeoutError, or an aiohttp.ClientError for an
        upstream that went away or answered nonsense. On cancellation the connection closes.
        """
        tls = url.scheme == "https"
        host = url.raw_host or ""
        port = url.port or (443 if tls else 80)
        key = (host, port, tls)
        head = self._head(method, url, headers, body is not None)
        conn = self._reusable(key)
        if conn is not None and body is None and method in _IDEMPOTENT:
            try:
                return await self._exchange(conn, method, head, None)
            except (aiohttp.ServerDisconnectedError, ConnectionError):
                # The upstream closed the idle connection as we reused it (keep-alive
                # timeouts race): nothing was answered, so sending again is safe.
                if conn._got_bytes:
                    raise
            conn = None
        if conn is None:
            conn = await self._connect(key)
        return await self._exchange(conn, method, head, body)

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
    ) -> H1Response:
        conn.begin(head_only=method == "HEAD")
        transport = conn.transport
        assert transport is not None
        writer: asyncio.Task[None] | None = None
        try:
            transport.write(head)
            if body is not None:
                writer = asyncio.get_running_loop().create_task(
                    conn.send_body(body, chunked=b"\r\nContent-Length:" not in head)
                )
                # Silence is measured only once the body is sent: an upload in progress is
                # the upstream listening, not the upstream stalling.
                while not (writer.done() or conn._headers_done):
                    news = conn.arm()
                    await asyncio.wait((writer, news), return_when=asyncio.FIRST_COMPLETED)
                    conn._waiter = None
                    if conn._error is not None:
                        raise conn._error
                if writer.done() and (exc := writer.exception()) is not None:
                    if not conn._headers_done:
                        raise aiohttp.ClientPayloadError(f"sending the body failed: {exc!r}")
            while not conn._headers_done:
                await conn.wait(self._read_timeout)
        except BaseException:
            if writer is not None and not writer.done():
                writer.cancel()
            conn.close()
            raise
        return H1Response(conn, writer, self._read_timeout)

    @staticmethod
    def _head(method: str, url: URL, headers: CIMultiDict[str], has_body: bool) -> bytes:
        lines = [
            f"{method} {url.raw_path_qs or '/'} HTTP/1.1",
            f"Host: {url.host_port_subcomponent}",
        ]
        framed = False
        for name, value in headers.items():
            lname = name.lower()
            if lname == "host":
                continue
            if lname in ("content-length", "transfer-encoding"):
                if lname == "transfer-encoding" or not has_body:
                    continue  # we frame the body ourselves
                framed = True
                name = "Content-Length"
            lines.append(f"{name}: {value}")
        if has_body and not framed:
            lines.append("Transfer-Encoding: chunked")
        elif not has_body and method not in _BODYLESS:
            lines.append("Content-Length: 0")
        text = "\r\n".join(lines)
        # Security: a CR or LF inside a name or value would start a header (or a request) of
        # its own; the only ones allowed are the separators joined in just now.
        if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
            raise ValueError("header name or value contains CR or LF")
        return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")
