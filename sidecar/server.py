"""How both listeners are served: aiohttp's AppRunner with the sidecar's answer to a request
aiohttp itself refuses before any handler runs (one its parser cannot read, a handler timeout
or crash outside `observe`).

aiohttp's own answer there is text/plain and quotes the offending bytes (`Got more than 24576
bytes when reading: b'SyncGatewaySession=...'`). Security: a script on the origin can provoke
one (a cookie bomb, then fetch) and read the HttpOnly session cookie back from it. Here every
such answer is `{"error", "reason"}` JSON with a fixed reason per kind of failure that never
quotes the request, `no-store`, `nosniff`, and the connection closed (aiohttp's rule).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

# The fixed reason for each parser failure, most specific class first.
_PARSE_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "request line or header field too long"),
    (http_exceptions.BadHttpMethod, "malformed request method"),
    (http_exceptions.InvalidURLError, "malformed request target"),
    (http_exceptions.BadStatusLine, "malformed request line"),
    (http_exceptions.InvalidHeader, "malformed header field"),
    (http_exceptions.TransferEncodingError, "malformed chunked body"),
    (http_exceptions.ContentLengthError, "body shorter than its Content-Length"),
    (http_exceptions.ContentEncodingError, "malformed content coding"),
)
MALFORMED = "malformed HTTP request"
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def parse_error_answer(status: int, exc: BaseException | None) -> tuple[int, dict[str, str]]:
    """Status and JSON body for a request aiohttp refused: pure, never quotes `exc`'s text.

    Parser failures are 400 (aiohttp's status; one status whatever the limit hit), a handler
    timeout 504, anything else (a crash that escaped `observe`) 500."""
    if status >= 500 or exc is None or not isinstance(exc, http_exceptions.HttpProcessingError):
        status = status if status in (500, 504) else 500
        reason = "handler timed out" if status == 504 else "internal error"
    else:
        reason = next((r for kind, r in _PARSE_REASONS if isinstance(exc, kind)), MALFORMED)
        status = 400
    return status, {"error": HTTPStatus(status).phrase, "reason": reason}


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler with `handle_error` answering the sidecar's JSON."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status, body = parse_error_answer(status, exc)
        # Logged as aiohttp does; observability.MalformedRequestFilter turns a parser refusal
        # into a line of ours that never quotes the bytes.
        self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:  # part of an answer went out: nothing to add
            raise ConnectionError("Response is sent already, cannot send the error answer")
        response = web.Response(
            status=status,
            text=json.dumps(body),
            content_type="application/json",
            headers=_HEADERS,
        )
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """aiohttp's low-level server making `JsonErrorHandler`s."""

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class SidecarRunner(web.AppRunner):
    """An AppRunner whose server is a `JsonErrorServer` (built from aiohttp's own, so every
    runner setting — limits, handler_cancellation, access log — carries over)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
