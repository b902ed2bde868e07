"""Streaming HTTP and WebSocket forwarding to the upstream, for a caller already authenticated.

Bodies stream both ways with backpressure and are never buffered whole. A failure before the
response started becomes a 502/504 error; after it started, the client connection is aborted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.errors import (
    BadRequest,
    GatewayTimeout,
    PayloadTooLarge,
    SidecarError,
    UpstreamError,
)
from sidecar.headers import downstream_response_headers
from sidecar.upstream_h1 import H1Pool, H1Response, only_chunked

log = logging.getLogger(__name__)

DEFAULT_WS_MAX_MSG_SIZE = 16 * 1024 * 1024  # 0 means unlimited (aiohttp's convention)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; logged, never sent
# A transparent proxy adds nothing the client did not send: no default Accept, Accept-Encoding,
# User-Agent, or Content-Type: application/octet-stream on bodies without one.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
# Close codes that must never appear in a Close frame (RFC 6455 7.4.1).
_UNSENDABLE_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})
# Control characters RFC 9110 5.5 forbids in field values (and RFC 9112 4 in a reason phrase);
# aiohttp's writer refuses to send them, so an answer holding one cannot be relayed.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _RelayedStream(web.StreamResponse):
    """An upstream's answer: aiohttp adds no header the upstream did not send, neither its
    default `Content-Type: application/octet-stream` nor a `Server` header (Date it may add:
    RFC 9110 6.6.1 asks that of a proxy relaying an answer without one)."""

    async def _prepare_headers(self) -> None:
        headers = self._headers
        typed = hdrs.CONTENT_TYPE in headers
        named = hdrs.SERVER in headers
        await super()._prepare_headers()
        if not typed:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not named:
            headers.popall(hdrs.SERVER, None)


class _RelayedResponse(_RelayedStream, web.Response):
    """An upstream's small answer, relayed in one piece (see _RelayedStream)."""


class _DeclinedProtocolsFilter(logging.Filter):
    """Drops aiohttp's warning that a client's WebSocket subprotocols "don't overlap" the
    server's. The sidecar has none of its own: it offers the upstream what the client offered
    and answers the client with the upstream's choice, and choosing none is the upstream's
    right (RFC 6455 4.2.2), not a fault worth a warning per connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and "don’t overlap server-known" in record.msg)


logging.getLogger("aiohttp.websocket").addFilter(_DeclinedProtocolsFilter())


# Bytes that are not UTF-8, as aiohttp's parser decodes them (surrogateescape).
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _any_value(headers: CIMultiDict[str] | CIMultiDictProxy[str], pattern: re.Pattern[str]) -> bool:
    # isprintable() first: a C scan that is True for almost every value (even non-ASCII).
    return any(not value.isprintable() and pattern.search(value) for value in headers.values())


class _Connector(aiohttp.TCPConnector):
    """aiohttp's pool, but a connection the upstream wrote to while it was idle is closed,
    not reused. aiohttp parses such bytes into a queued answer that the next request on the
    connection would read as its own, and every answer after it would be one request late:
    upstream answers reaching the wrong clients. (httptools' transport: upstream_h1.py.)"""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (conn := await super()._get(key, traces)) is not None:
            protocol = conn.protocol
            if protocol is not None and not protocol.should_close:
                return conn
            conn.close()  # its protocol holds bytes nobody asked for: closed, never reused
        return None


def make_client_session(
    *,
    connect_timeout: float,
    read_timeout: float,
    limit: int = 0,
    keepalive_timeout: float = 15.0,
) -> aiohttp.ClientSession:
    """The pooled keep-alive session `Forwarder` needs; create it inside the running loop.

    `auto_decompress=False` is required: bodies pass through still encoded, matching the
    Content-Encoding and Content-Length headers that are copied. No cookie jar: upstream
    cookies belong to the client, never to the sidecar. `limit` is 0 (none) because WebSockets and
    continuous _changes feeds each hold a connection for as long as they live.
    """
    return aiohttp.ClientSession(
        connector=_Connector(limit=limit, limit_per_host=0, keepalive_timeout=keepalive_timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=_client_timeout(connect_timeout, read_timeout),
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        trust_env=False,  # security: HTTP(S)_PROXY from the environment must not divert traffic
    )


def _client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    # `connect` also bounds waiting for a free pooled connection; `sock_read` is the longest
    # silence allowed between bytes, not a total, so long-lived streams are fine.
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)


def _upstream_failure(exc: BaseException) -> SidecarError:
    """Map a failed upstream exchange to the error the client sees (no upstream address)."""
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts included
        return GatewayTimeout("upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        detail = "cannot resolve host"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        detail = os.strerror(errno).lower() if errno and errno > 0 else "cannot connect"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        detail = "connection closed"
    elif isinstance(exc, aiohttp.ClientResponseError):
        detail = "invalid response"
    elif isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        detail = os.strerror(exc.errno).lower()
    else:
        detail = "connection failed"
    return UpstreamError(f"upstream unavailable: {detail}")


def _abort(request: web.BaseRequest) -> None:
    """Cut the client connection: a truncated body must not look like a complete one."""
    transport = request.transport
    if transport is not None:
        transport.close()


async def _until_client_gone(request: web.BaseRequest, interval: float) -> None:
    # aiohttp only cancels handlers on disconnect when run with handler_cancellation=True;
    # without it a silent long-poll would hold its upstream connection until the upstream
    # answered. Polling the transport works in both modes.
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(interval)


class _RequestBody:
    """The client's body as an async iterator for aiohttp, counting bytes against the limit."""

    def __init__(self, content: aiohttp.StreamReader, limit: int | None) -> None:
        self._content = content
        self._limit = limit
        self.too_large = False
        self.client_error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        try:
            async for chunk in self._content.iter_any():
                seen += len(chunk)
                if self._limit is not None and seen > self._limit:
                    self.too_large = True
                    raise PayloadTooLarge(f"request body exceeds {self._limit} bytes")
                yield chunk
        except PayloadTooLarge:
            raise
        except Exception as exc:  # client gone, or a malformed chunked body
            self.client_error = exc
            raise


SMALL_BODY = 64 * 1024  # answers with a Content-Length up to this are relayed in one piece


class Forwarder:
    """Relays requests and WebSockets to the upstream through one pooled ClientSession.

    The session must come from `make_client_session` (or be built the same way: above all
    `auto_decompress=False`, and no cookie jar). With `h1`, plain HTTP exchanges go through
    that leaner transport instead (config `upstream_transport: h1`); WebSockets always use
    the session.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_body_bytes: int | None,
        ws_max_msg_size: int = DEFAULT_WS_MAX_MSG_SIZE,
        ws_close_timeout: float = 10.0,
        disconnect_poll_interval: float | None = 1.0,
        h1: H1Pool | None = None,
    ) -> None:
        self._session = session
        self._h1 = h1
        self._timeout = _client_timeout(connect_timeout, read_timeout)
        self._handshake_timeout = connect_timeout + read_timeout
        self._max_body = max_body_bytes
        self._ws_max_msg_size = ws_max_msg_size
        self._ws_close_timeout = ws_close_timeout
        self._poll = disconnect_poll_interval

    def http(
        self,
        request: web.Request,
        target_url: URL,
        headers: CIMultiDict[str],
        *,
        before_send: Callable[[web.StreamResponse], None] | None = None,
    ) -> Awaitable[web.StreamResponse]:
        """Forward `request` (any method) to `target_url` with `headers`; stream the answer.

        `before_send` gets a streamed answer just before its headers go out; an answer small
        enough to be returned whole comes back unprepared for the caller to finish. (A plain
        function returning the awaitable: one coroutine frame less per request.)
        """
        length = request.content_length
        if self._max_body is not None and length is not None and length > self._max_body:
            raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes")
        started: list[web.StreamResponse] = []
        if self._poll is None:
            # The server runs with handler_cancellation: a client that goes away cancels this
            # handler, and _forward's cleanup closes the upstream connection. No watcher task.
            return self._forward(request, target_url, headers, started, before_send)
        return self._watched(request, target_url, headers, started, before_send)

    async def _watched(
        self,
        request: web.Request,
        target_url: URL,
        headers: CIMultiDict[str],
        started: list[web.StreamResponse],
        before_send: Callable[[web.StreamResponse], None] | None,
    ) -> web.StreamResponse:
        """`_forward` with a watcher that cancels it when the client goes away (servers run
        without handler_cancellation)."""
        forward = asyncio.ensure_future(
            self._forward(request, target_url, headers, started, before_send)
        )
        watch = asyncio.ensure_future(_until_client_gone(request, self._poll or 1.0))
        try:
            await asyncio.wait((forward, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not forward.done():
                forward.cancel()  # its cleanup closes the upstream connection
                await asyncio.wait((forward,))
        if not forward.cancelled():
            return forward.result()
        log.debug("client went away during %s %s", request.method, target_url.path)
        return started[0] if started else web.Response(status=CLIENT_CLOSED_REQUEST)

    async def _forward(
        self,
        request: web.Request,
        url: URL,
        headers: CIMultiDict[str],
        started: list[web.StreamResponse],
        before_send: Callable[[web.StreamResponse], None] | None = None,
    ) -> web.StreamResponse:
        body = _RequestBody(request.content, self._max_body) if request.body_exists else None
        upstream: aiohttp.ClientResponse | H1Response
        try:
            if self._h1 is not None:
                upstream = await self._h1.request(
                    request.method, url, headers, body.chunks() if body is not None else None
                )
            else:
                if _any_value(headers, _NOT_UTF8):
                    # Security: aiohttp's client would leave those bytes out, so the upstream
                    # would read a value the sidecar never checked ("Sess\xffion" as "Session").
                    # httptools' transport sends them unchanged.
                    raise BadRequest("header value is not UTF-8")
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body.chunks() if body is not None else None,
                    allow_redirects=False,  # redirects are the client's to follow
                    auto_decompress=False,
                    timeout=self._timeout,
                )
        except (aiohttp.ClientError, OSError) as exc:
            if body is not None and body.too_large:
                raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes") from None
            if body is not None and body.client_error is not None:
                if isinstance(body.client_error, OSError):
                    return web.Response(status=CLIENT_CLOSED_REQUEST)
                raise BadRequest("malformed request body") from None
            log.warning("upstream %s %s failed: %r", request.method, url.path, exc)
            raise _upstream_failure(exc) from exc

        status, reason = upstream.status, upstream.reason
        if (
            not 200 <= status <= 599  # 1xx are interim (101 without an upgrade: a desync)
            or (reason and not reason.isprintable() and _CONTROL.search(reason))
            # httptools refuses control characters in field values, and the h1 transport any
            # transfer coding but chunked; aiohttp's lenient parser lets both through.
            or (
                self._h1 is None
                and (
                    _any_value(upstream.headers, _CONTROL)
                    or not only_chunked(upstream.headers.getall("Transfer-Encoding", ["chunked"]))
                )
            )
        ):
            upstream.close()  # never reused
            log.warning(
                "upstream %s %s answered an invalid status line or header: %r %r",
                request.method,
                url.path,
                status,
                reason,
            )
            raise UpstreamError("upstream unavailable: invalid response")
        length = upstream.content_length
        if (
            length is not None
            and length <= SMALL_BODY
            and request.method != "HEAD"
            and status not in (204, 304)
        ):
            # Small answers (most sync traffic) in one piece: one write instead of a stream.
            try:
                payload = await upstream.read()
            except (aiohttp.ClientError, OSError) as exc:
                upstream.close()
                raise _upstream_failure(exc) from exc
            upstream.release()
            return _RelayedResponse(
                status=status,
                reason=reason,
                headers=downstream_response_headers(upstream.headers),
                body=payload,
            )
        response = _RelayedStream(
            status=status,
            reason=reason,
            headers=downstream_response_headers(upstream.headers),
        )
        complete = False
        try:
            started.append(response)
            if before_send is not None:  # last headers of the caller's, for a streamed answer
                before_send(response)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            complete = True
        except (aiohttp.ClientError, OSError) as exc:
            # Either side broke after the status line went out: nothing to report but a cut.
            log.info("aborting %s %s mid-response: %r", request.method, url.path, exc)
            _abort(request)
        finally:
            if complete:
                upstream.release()  # keep-alive: back to the pool
            else:
                upstream.close()  # security/leaks: never reuse a half-read connection
        return response

    async def websocket(
        self,
        request: web.Request,
        target_url: URL,
        headers: CIMultiDict[str],
        *,
        on_open: Callable[[web.WebSocketResponse], None] | None = None,
        before_send: Callable[[web.StreamResponse], None] | None = None,
    ) -> web.WebSocketResponse:
        """Connect to the upstream WebSocket first, then upgrade the client and relay frames.

        Pings and pongs are relayed, not answered here (autoping off on both legs), so a
        client's ping measures the whole path. Messages above `ws_max_msg_size` close that
        leg with 1009. `on_open` receives the client socket once upgraded; calling
        `close(code=..., message=...)` on it closes the upstream with the same code and reason.
        """
        offered = [
            token.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", ())
            for token in value.split(",")
            if token.strip()
        ]
        # The probe knows the client's protocols, or aiohttp warns that they "don't overlap".
        if not web.WebSocketResponse(protocols=offered).can_prepare(request):
            raise BadRequest("not a WebSocket upgrade request")
        if _any_value(headers, _NOT_UTF8):  # as in _forward: aiohttp would leave them out
            raise BadRequest("header value is not UTF-8")
        try:
            async with asyncio.timeout(self._handshake_timeout):
                upstream = await self._session.ws_connect(
                    target_url,
                    headers=headers,
                    protocols=offered,
                    autoping=False,
                    autoclose=False,
                    heartbeat=None,
                    max_msg_size=self._ws_max_msg_size,
                    timeout=aiohttp.ClientWSTimeout(
                        ws_receive=None, ws_close=self._ws_close_timeout
                    ),
                )
        except aiohttp.WSServerHandshakeError as exc:
            log.warning("upstream refused WebSocket %s: %s", target_url.path, exc.status)
            raise UpstreamError(
                f"upstream refused the WebSocket upgrade (status {exc.status})"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("upstream WebSocket %s failed: %r", target_url.path, exc)
            raise _upstream_failure(exc) from exc

        try:
            client = _ClientWebSocket(
                protocols=(upstream.protocol,) if upstream.protocol else (),
                autoping=False,
                autoclose=False,
                heartbeat=None,
                max_msg_size=self._ws_max_msg_size,
                timeout=self._ws_close_timeout,
            )
            client.upstream = upstream
            if before_send is not None:
                before_send(client)
            await client.prepare(request)
            if on_open is not None:
                on_open(client)
            await _relay(client, upstream)
        finally:
            if not upstream.closed:
                await upstream.close(code=WSCloseCode.GOING_AWAY)
        return client


class _ClientWebSocket(web.WebSocketResponse):
    """Remembers the code and reason of a close() the sidecar started, for the upstream."""

    sidecar_close: tuple[int, bytes] | None = None
    upstream: aiohttp.ClientWebSocketResponse[Any] | None = None

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        # aiohttp's own closes (peer gone, protocol error) set close_code before calling close().
        if self.close_code is None and not self.closed and self.sidecar_close is None:
            self.sidecar_close = (code, message)
            # Close the upstream first with the same code and reason: once the client's
            # connection is gone the server cancels the relay, which could not pass them on.
            if self.upstream is not None and not self.upstream.closed:
                await self.upstream.close(code=code, message=message)
        return await super().close(code=code, message=message, drain=drain)


@dataclass(frozen=True, slots=True)
class _End:
    """How one direction of a relay ended."""

    how: Literal["close", "closing", "gone"]  # peer sent Close / closed locally / vanished
    code: int = WSCloseCode.OK
    reason: bytes = b""


_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse[Any]


async def _pump(source: _Socket, sink: _Socket) -> _End:
    """Copy messages from `source` to `sink` until `source` stops."""
    while True:
        msg = await source.receive()
        try:
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return _End("close", msg.data, (msg.extra or "").encode())
            elif msg.type is WSMsgType.CLOSING:
                return _End("closing")
            else:  # CLOSED, ERROR
                return _End("gone")
        except ConnectionError:
            continue  # the sink is going away; its own pump reports how


def _sendable(code: int | None, fallback: int) -> int:
    if code is None or code < 1000 or code >= 5000 or code in _UNSENDABLE_CLOSE_CODES:
        return fallback
    return code


async def _relay(client: _ClientWebSocket, upstream: aiohttp.ClientWebSocketResponse[Any]) -> None:
    """Relay both ways; whichever side ends first decides how the other is closed."""
    from_client = asyncio.ensure_future(_pump(client, upstream))
    from_upstream = asyncio.ensure_future(_pump(upstream, client))
    try:
        await asyncio.wait((from_client, from_upstream), return_when=asyncio.FIRST_COMPLETED)
        if from_client.done():
            end = from_client.result()
            if end.how == "close":
                code, reason = _sendable(end.code, WSCloseCode.OK), end.reason
            elif client.sidecar_close is not None:
                code, reason = client.sidecar_close
            else:
                code, reason = WSCloseCode.GOING_AWAY, b""
            await upstream.close(code=code, message=reason)
            # Echo the upstream's answer to a client that asked to close (RFC 6455 5.5.1).
            await client.close(code=_sendable(upstream.close_code, code), message=reason)
        else:
            end = from_upstream.result()
            if client.sidecar_close is not None:  # we closed the upstream on the client's behalf
                code, reason = client.sidecar_close
            elif end.how == "close":
                code, reason = _sendable(end.code, WSCloseCode.OK), end.reason
            else:
                code, reason = WSCloseCode.BAD_GATEWAY, b"upstream went away"
            await client.close(code=code, message=reason)
            await upstream.close(code=code)
        # The other pump sees CLOSING (or CLOSED) and returns now.
        await asyncio.wait((from_client, from_upstream), timeout=5.0)
    finally:
        for task in (from_client, from_upstream):
            task.cancel()
        await asyncio.wait((from_client, from_upstream))
        for task in (from_client, from_upstream):
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("WebSocket relay failed", exc_info=exc)
