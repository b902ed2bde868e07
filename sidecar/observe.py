"""Every request's bookkeeping: request id, errors as JSON (HTML pages for browsers), final
headers, one log line, metrics.

Routes are registered wrapped in `observed` rather than through an aiohttp middleware: the
middleware machinery (two extra coroutine layers and a cache lookup per request) measured
about 30 µs a request, more than authentication.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar import keys
from sidecar.browser import is_page_load
from sidecar.cors import grant
from sidecar.errors import NotFound, SidecarError
from sidecar.observability import ACCESS_LOG, Metrics
from sidecar.pages import error_page
from sidecar.request_head import check_request_head
from sidecar.sessions.cookies import set_session_cookie, sets_session_cookie
from sidecar.sessions.store import StoreUnavailable
from sidecar.sgbridge import strip_set_cookies

log = logging.getLogger("sidecar")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


# Request ids need to be unique, not secret: a random per-process prefix and a counter cost
# no system call per request (secrets.token_hex reads the kernel's random source each time).
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count(1)


def request_id_of(request: web.Request) -> str:
    """The caller's X-Request-ID when it is short and plain, else a fresh one."""
    given = request.headers.get("X-Request-ID")
    if given and len(given) <= 128 and _REQUEST_ID_OK.issuperset(given):
        return given
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


def error_response(exc: SidecarError, request: web.Request | None = None) -> web.Response:
    """JSON `{"error", "reason"}`; a small HTML page with the same status and reason when
    `request` is a person's browser loading a page (sidecar.browser.is_page_load)."""
    return _error_answer(
        request, exc.status, exc.error, exc.reason, headers=exc.headers, retry=exc.retry
    )


def http_error_response(exc: web.HTTPException, request: web.Request) -> web.Response:
    """One of aiohttp's own HTTP errors (an unrouted path or method, a body too large...) as
    the sidecar's: JSON, or the error page for a browser's page load; a 405 keeps `Allow`."""
    reason = exc.text or exc.reason
    if reason.startswith(f"{exc.status}: "):  # aiohttp's default text: "404: Not Found"
        reason = reason.partition(": ")[2]
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    return _error_answer(request, exc.status, exc.reason, reason, headers=headers)


def _error_answer(
    request: web.Request | None,
    status: int,
    error: str,
    reason: str,
    *,
    headers: dict[str, str],
    retry: str | None = None,
) -> web.Response:
    if request is not None and is_page_load(request.method, request.headers):
        return error_page(status, error, reason, retry_url=retry, headers=headers)
    # Security: reasons may echo provider-sent text (an error_description); never let a
    # browser sniff the JSON as HTML.
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", **headers}
    return web.json_response({"error": error, "reason": reason}, status=status, headers=headers)


def observed(handler: Handler, *, check_head: bool = False) -> Handler:
    """`handler` wrapped in `observe`. Every route is registered this way instead of through
    an aiohttp middleware: the middleware machinery (two extra coroutine layers and a cache
    lookup per request) measured about 30 µs a request, more than authentication.

    `check_head`: refuse a bad Host or framing (`request_head.check_request_head`) before the
    handler runs — for the public listener's own endpoints, which build URLs from the Host
    (the proxied routes check it themselves, once, in `handlers.proxy_handler`)."""

    inner = _head_checked(handler) if check_head else handler

    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await observe(request, inner)

    return wrapped


def _head_checked(handler: Handler) -> Handler:
    async def checked(request: web.Request) -> web.StreamResponse:
        check_request_head(request.headers, request.version)  # raises 400 / 501
        return await handler(request)

    return checked


def observed_routes(defs: list[web.RouteDef], *, check_head: bool = False) -> list[web.RouteDef]:
    return [
        web.route(d.method, d.path, observed(d.handler, check_head=check_head), **d.kwargs)
        for d in defs
    ]


async def not_found(request: web.Request) -> web.StreamResponse:
    raise NotFound("404: Not Found")


async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, error → JSON, one log line and metrics per request."""
    started = time.perf_counter()
    request[keys.REQUEST_ID] = rid = request_id_of(request)
    try:
        response = await handler(request)
        outcome = "ok"
    except SidecarError as exc:
        response = error_response(exc, request)
        outcome = "rejected" if exc.status < 500 else "failed"
        if isinstance(exc, StoreUnavailable):
            _metrics(request).store_errors.inc()
    except web.HTTPException as exc:  # aiohttp's own errors (404/405, 413 reading a body...)
        if exc.status < 400:
            raise
        response = http_error_response(exc, request)
        outcome = "rejected" if exc.status < 500 else "failed"
    except (asyncio.CancelledError, ConnectionResetError):
        _log_request(request, 499, time.perf_counter() - started, "client_gone")
        raise
    except Exception:
        log.exception("unhandled error", extra={"request_id": rid})
        response = web.json_response(
            {"error": "Internal Server Error", "reason": "internal error; see the sidecar's log"},
            status=500,
        )
        outcome = "failed"
    if not response.prepared:
        finish_response(request, response)
    _log_request(request, response.status, time.perf_counter() - started, outcome)
    return response


def finish_response(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every answer gets before it goes out: the request id it was logged under, and
    the session cookie again when the session's idle expiry was just extended. Called by
    `observe` for answers still unprepared, and by the Forwarder for ones it streams (an
    on_response_prepare signal did this at a measurable cost per request)."""
    rid = request.get(keys.REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-ID"] = rid
    if "Origin" in request.headers:  # the only CORS cost of a request without Origin
        _cors(request, response)
    sg_session = request.get(keys.SG_SESSION)
    if sg_session is not None:  # security: Sync Gateway's session cookie stays in the pod
        strip_set_cookies(response.headers)
        if response.status == 401:  # Sync Gateway no longer knows that session
            bridge = request.app[keys.SG_BRIDGES][request[keys.DB_NAME]]
            bridge.forget(request[keys.IDENTITY].name, sg_session)
    identity = request.get(keys.IDENTITY)
    if identity is not None and identity.session_expires is not None and identity.session_id:
        db = request.app[keys.DATABASES].get(request[keys.DB_NAME])
        if sets_session_cookie(response, db):  # the handler set one of its own (new session)
            return
        set_session_cookie(request, response, db, identity.session_id, identity.session_expires)


def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """The database's CORS grant (sidecar/cors.py) on any answer under `/{db}/`."""
    policies = request.app.get(keys.CORS)  # absent on the admin listener: no CORS there
    db = request.get(keys.DB_NAME) or request.match_info.get("db")
    policy = policies.get(db) if policies is not None and db is not None else None
    if policy is not None:
        grant(request, response, policy)


def finisher(request: web.Request) -> Callable[[web.StreamResponse], None]:
    return functools.partial(finish_response, request)


def _metrics(request: web.Request) -> Metrics:
    app = request.app
    return app[keys.METRICS] if keys.METRICS in app else app[keys.PUBLIC_APP][keys.METRICS]


def logged_path(path: str) -> str:
    """`path` as the access log shows it. Security: a session id in a path (the admin API's
    `/{db}/_session/{id}`, Sync Gateway's `/{db}/_user/{name}/_session/{id}`) is a bearer
    credential: it is logged as `<sha256:` + the first 12 hex digits of its SHA-256 (the
    start of its store key, enough to tell two sessions apart) + `>`."""
    if "/_session/" not in path:
        return path
    return _SESSION_IN_PATH.sub(_redacted_session, path)


_SESSION_IN_PATH = re.compile(r"(?<=/_session/)[^/]+")


def _redacted_session(match: re.Match[str]) -> str:
    digest = hashlib.sha256(match[0].encode("utf-8", "surrogateescape")).hexdigest()
    return f"<sha256:{digest[:12]}>"


def _log_request(request: web.Request, status: int, seconds: float, outcome: str) -> None:
    identity = request.get(keys.IDENTITY)
    db = request.get(keys.DB_NAME, "-")
    _metrics(request).request(db, outcome, status, seconds)
    if ACCESS_LOG.enabled() and not request.get(keys.QUIET, False):
        ACCESS_LOG.request(
            {
                "method": request.method,
                # Path only: query strings may carry code / refresh_token; session ids redacted.
                "path": logged_path(request.path),
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "user": identity.name if identity is not None else None,
                "db": db,
                "request_id": request[keys.REQUEST_ID],
                "remote": request.remote,
                "listener": "admin" if keys.PUBLIC_APP in request.app else "public",
            }
        )
