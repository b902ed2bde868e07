"""create_app(): the only wiring — resources, middleware and routes of both listeners."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar import admin as admin_routes
from sidecar import keys
from sidecar.auth import authenticate
from sidecar.config import OIDCConfig, Settings
from sidecar.databases import Database, Databases
from sidecar.errors import NotFound, SidecarError
from sidecar.headers import client_ip_trusted, upstream_request_headers
from sidecar.identity import Identity
from sidecar.identity_cache import BearerIdentities
from sidecar.lifecycle import Lifecycle
from sidecar.observability import ACCESS_LOG, Metrics
from sidecar.oidc import routes as oidc_routes
from sidecar.oidc.provider import ProviderRegistry
from sidecar.oidc.test_provider import TestProvider
from sidecar.proxy import Forwarder, make_client_session, target_url
from sidecar.sessions import routes as session_routes
from sidecar.sessions.cookies import add_session_cookie_header
from sidecar.sessions.store import StoreUnavailable, create_store, hash_session_id
from sidecar.sgbridge import SessionBridge, strip_set_cookies
from sidecar.websockets import WebSocketRegistry

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


def error_response(exc: SidecarError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


def observed(handler: Handler) -> Handler:
    """`handler` wrapped in `observe`. Every route is registered this way instead of through
    an aiohttp middleware: the middleware machinery (two extra coroutine layers and a cache
    lookup per request) measured about 30 µs a request, more than authentication."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await observe(request, handler)

    return wrapped


def _observed_routes(defs: list[web.RouteDef]) -> list[web.RouteDef]:
    return [web.route(d.method, d.path, observed(d.handler), **d.kwargs) for d in defs]


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
        response = error_response(exc)
        outcome = "rejected" if exc.status < 500 else "failed"
        if isinstance(exc, StoreUnavailable):
            _metrics(request).store_errors.inc()
    except web.HTTPException as exc:  # aiohttp's own 404/405 for unrouted paths
        if exc.status < 400:
            raise
        response = web.json_response(
            {"error": exc.reason, "reason": exc.text or exc.reason}, status=exc.status
        )
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
    sg_session = request.get(keys.SG_SESSION)
    if sg_session is not None:  # security: Sync Gateway's session cookie stays in the pod
        strip_set_cookies(response.headers)
        if response.status == 401:  # Sync Gateway no longer knows that session
            bridge = request.app[keys.SG_BRIDGES][request[keys.DB_NAME]]
            bridge.forget(request[keys.IDENTITY].name, sg_session)
    identity = request.get(keys.IDENTITY)
    if identity is not None and identity.session_expires is not None and identity.session_id:
        db = request.app[keys.DATABASES].get(request[keys.DB_NAME])
        if db.cookie_name in response.cookies:  # the handler set a cookie of its own (new session)
            return
        add_session_cookie_header(
            request, response, db, identity.session_id, identity.session_expires
        )


def _finisher(request: web.Request) -> Callable[[web.StreamResponse], None]:
    return functools.partial(finish_response, request)


def _metrics(request: web.Request) -> Metrics:
    app = request.app
    return app[keys.METRICS] if keys.METRICS in app else app[keys.PUBLIC_APP][keys.METRICS]


def _log_request(request: web.Request, status: int, seconds: float, outcome: str) -> None:
    identity = request.get(keys.IDENTITY)
    db = request.get(keys.DB_NAME, "-")
    _metrics(request).request(db, outcome, status, seconds)
    if ACCESS_LOG.enabled():
        ACCESS_LOG.request(
            {
                "method": request.method,
                "path": request.path,  # path only: query strings may carry code / refresh_token
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "user": identity.name if identity is not None else None,
                "db": db,
                "request_id": request[keys.REQUEST_ID],
                "remote": request.remote,
            }
        )


# ---------------------------------------------------------------- the proxied path


_CONTINUE_DEFERRED = web.RequestKey[bool]("continue_deferred")


async def defer_continue(request: web.Request) -> None:
    """aiohttp would answer `Expect: 100-continue` before authentication, inviting anyone to
    upload; the proxy handler sends it after authenticating instead."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        request[_CONTINUE_DEFERRED] = True


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    db = app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    identity = await authenticate(request, db)  # raises: nothing below runs unauthenticated
    request[keys.IDENTITY] = identity
    bridge = app[keys.SG_BRIDGES].get(db.name)  # Sync Gateway: it must see the user too
    sg_session = await bridge.upstream_cookie(identity) if bridge is not None else None
    if request.get(_CONTINUE_DEFERRED):
        # RFC 9110 10.1.1: invite the body only once the caller is known.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    settings = app[keys.SETTINGS]
    peer = request.remote
    headers = upstream_request_headers(
        request.headers,
        identity=identity,
        names=settings.identity_headers,
        peer=peer,
        scheme=request.scheme,
        host=request.host,
        trusted=client_ip_trusted(peer, app[keys.TRUSTED_NETWORKS]),
        pass_authorization=settings.pass_authorization,
        session_cookie_name=db.cookie_name,
        request_id=request[keys.REQUEST_ID],
        couchdb=settings.couchdb_proxy_auth if settings.couchdb_proxy_auth.enabled else None,
    )
    if sg_session is not None:
        SessionBridge.apply(headers, db.cookie_name, sg_session)
        request[keys.SG_SESSION] = sg_session
    target = target_url(db.upstream, request.raw_path)
    forwarder = app[keys.FORWARDER]
    if _is_websocket_upgrade(request):
        return await _relay_websocket(request, db, identity, target, headers)
    return await forwarder.http(request, target, headers, before_send=_finisher(request))


async def _relay_websocket(
    request: web.Request, db: Database, identity: Identity, target: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    """Relay a websocket, tracked so that revocation (any replica) or shutdown closes it."""
    app = request.app
    session_key = hash_session_id(identity.session_id) if identity.session_id else None
    gauge = app[keys.METRICS].websockets
    with contextlib.ExitStack() as stack:

        def on_open(ws: web.WebSocketResponse) -> None:
            stack.enter_context(app[keys.WEBSOCKETS].track(ws, db.name, identity, session_key))
            gauge.inc()
            stack.callback(gauge.dec)

        return await app[keys.FORWARDER].websocket(
            request, target, headers, on_open=on_open, before_send=_finisher(request)
        )


def _is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and "websocket" in request.headers.get("Upgrade", "").lower()
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


# ---------------------------------------------------------------- health


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    app = request.app.get(keys.PUBLIC_APP, request.app)
    store_ok = await app[keys.STORE].ping()
    providers = {
        f"{db.name}/{name}": ok
        for db in app[keys.DATABASES]
        if db.providers is not None
        for name, ok in db.providers.status().items()
    }
    providers_ok = not providers or any(providers.values())
    draining = app[keys.LIFECYCLE].draining
    ok = store_ok and providers_ok and not draining
    body = {
        "ready": ok,
        "session_store": "ok" if store_ok else "unavailable",
        "providers": {k: "ok" if v else "unavailable" for k, v in providers.items()},
        "draining": draining,
    }
    return web.json_response(body, status=200 if ok else 503)


# ---------------------------------------------------------------- wiring


# ID tokens with large group claims exceed aiohttp's default 8 KiB header line; tokens.py
# caps the token itself at 16 KiB.
MAX_FIELD_SIZE = 24 * 1024
MAX_LINE_SIZE = 16 * 1024


def make_runner(app: web.Application, *, shutdown_timeout: float) -> web.AppRunner:
    """How both listeners are served. handler_cancellation: a client that goes away cancels
    its handler, which closes the upstream connection (the Forwarder relies on it)."""
    return web.AppRunner(
        app,
        access_log=None,  # one line per request comes from `observe`
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        handler_cancellation=True,
        max_field_size=MAX_FIELD_SIZE,
        max_line_size=MAX_LINE_SIZE,
    )


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> web.Application:
    """The public listener's app; its cleanup_ctx owns every shared resource."""
    app = web.Application(client_max_size=1024**2)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics or Metrics()
    app[keys.LIFECYCLE] = Lifecycle()
    app[keys.WEBSOCKETS] = WebSocketRegistry()
    app[keys.BEARER_IDENTITIES] = BearerIdentities()
    app[keys.TRUSTED_NETWORKS] = tuple(
        ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies
    )
    app.cleanup_ctx.append(_resources)

    # Order matters: the Sync Gateway-compatible endpoints before the catch-all proxy routes.
    defs = [web.get("/_health", live), web.get("/_ready", ready)]
    defs += oidc_routes.routes() + session_routes.routes()
    if settings.unsupported.oidc_test_provider.enabled:
        test_provider = TestProvider(public_url=settings.public_url)
        defs += test_provider.routes(prefix="/{db}/_oidc_testing")
    defs += [
        web.route("*", "/{db}", proxy_handler, expect_handler=defer_continue),
        web.route("*", "/{db}/{tail:.*}", proxy_handler, expect_handler=defer_continue),
        web.route("*", "/{tail:.*}", not_found),  # JSON, like every other answer
    ]
    app.add_routes(_observed_routes(defs))
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    timeouts = settings.timeouts
    async with contextlib.AsyncExitStack() as stack:
        upstream_override = None
        if settings.demo_upstream:
            from sidecar.demo import start_demo_upstream

            upstream_override = await stack.enter_async_context(start_demo_upstream())
        upstream_http = make_client_session(
            connect_timeout=timeouts.upstream_connect, read_timeout=timeouts.upstream_read
        )
        stack.push_async_callback(upstream_http.close)
        provider_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeouts.provider),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        stack.push_async_callback(provider_http.close)
        app[keys.UPSTREAM_HTTP] = upstream_http
        app[keys.PROVIDER_HTTP] = provider_http
        app[keys.FORWARDER] = Forwarder(
            upstream_http,
            connect_timeout=timeouts.upstream_connect,
            read_timeout=timeouts.upstream_read,
            max_body_bytes=settings.max_body_bytes,
            disconnect_poll_interval=None,  # make_runner's handler_cancellation does it
        )

        store = create_store(
            settings.session_store.get() if settings.session_store else None,
            local_cache_seconds=settings.session.local_cache_seconds,
        )
        if settings.session_store is None:
            log.warning(
                "no session_store configured: sessions live in this process only; "
                "run a single replica or set session_store to a Redis URL"
            )
        await store.start()
        stack.push_async_callback(store.close)
        app[keys.STORE] = store
        stack.callback(store.subscribe(app[keys.WEBSOCKETS].on_store_event))
        stack.callback(store.subscribe(app[keys.BEARER_IDENTITIES].on_store_event))

        def make_registry(oidc: OIDCConfig) -> ProviderRegistry:
            return ProviderRegistry(
                oidc,
                provider_http,
                timeout=timeouts.provider,
                on_fetch=app[keys.METRICS].provider_fetch,
            )

        app[keys.DATABASES] = Databases.build(settings, make_registry, upstream_override)
        app[keys.SG_BRIDGES] = bridges = {
            name: SessionBridge(conf.sync_gateway, name, provider_http)
            for name, conf in settings.databases.items()
            if conf.sync_gateway is not None
        }
        for bridge in bridges.values():
            stack.callback(store.subscribe(bridge.on_store_event))
            stack.push_async_callback(bridge.close)
        refreshers = [
            asyncio.create_task(provider.run_refresh(), name=f"provider-refresh-{provider.name}")
            for registry in app[keys.DATABASES].registries()
            for provider in registry.providers
        ]

        async def stop_refreshers() -> None:
            for task in refreshers:
                task.cancel()
            await asyncio.gather(*refreshers, return_exceptions=True)

        stack.push_async_callback(stop_refreshers)
        stack.push_async_callback(app[keys.WEBSOCKETS].close_all)
        yield


def create_admin_app(public: web.Application) -> web.Application:
    """The admin listener: health, metrics and (with the login flow) the user/session API."""
    admin = web.Application(client_max_size=1024**2)
    admin[keys.PUBLIC_APP] = public
    defs = [
        web.get("/_health", live),
        web.get("/_ready", ready),
        web.get("/_metrics", metrics_handler),
        *admin_routes.routes(),
        web.route("*", "/{tail:.*}", not_found),
    ]
    admin.add_routes(_observed_routes(defs))
    return admin


async def metrics_handler(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = request.app[keys.PUBLIC_APP][keys.METRICS].registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
