"""create_app(): the only wiring — resources and routes of both listeners."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web, web_response

from sidecar import admin as admin_routes
from sidecar import cors, keys
from sidecar.admin_auth import AdminGuard
from sidecar.config import OIDCConfig, Settings
from sidecar.databases import Databases
from sidecar.exchanges import Exchanges
from sidecar.handlers import defer_continue, live, options_handler, proxy_handler, ready
from sidecar.identity_cache import BearerIdentities
from sidecar.lifecycle import Lifecycle
from sidecar.observability import Metrics
from sidecar.observe import not_found, observed_routes
from sidecar.oidc import routes as oidc_routes
from sidecar.oidc import self_fetch
from sidecar.oidc.login_limit import LoginLimiter
from sidecar.oidc.provider import Provider, ProviderRegistry, discovery_url
from sidecar.oidc.test_provider import TestProvider
from sidecar.proxy import Forwarder, make_client_session
from sidecar.server import SidecarRunner
from sidecar.sessions import routes as session_routes
from sidecar.sessions.store import create_store
from sidecar.sgbridge import SessionBridge
from sidecar.upstream_h1 import H1Pool

log = logging.getLogger("sidecar")

# Security: the sidecar's own answers (and aiohttp's, such as its 400 for a malformed request)
# name no software versions. aiohttp has no setting for its `Server: Python/3.x aiohttp/3.x`;
# it reads this module global for every answer. Relayed answers carry the upstream's own Server
# header or none (sidecar/proxy.py).
SERVER_NAME = "oidc-sidecar"
web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]  # not re-exported

PROXIED = "/{db}/{tail:(?!_oidc|_session).*}"
CLIENT_IDLE = 75.0  # timeouts.client_idle's default
MAX_FIELD_SIZE = 24 * 1024
MAX_LINE_SIZE = 16 * 1024


def make_runner(app: web.Application, *, shutdown_timeout: float) -> web.AppRunner:
    """How both listeners are served. handler_cancellation: a client that goes away cancels
    its handler, which closes the upstream connection (the Forwarder relies on it).
    keepalive_timeout (`timeouts.client_idle`): aiohttp counts it from the connection's start
    and from each answer's end while no request is in progress, so it also closes a client
    that never finishes sending a request head (aiohttp's default is an hour: a few thousand
    idle sockets would exhaust the process's files)."""
    public = app.get(keys.PUBLIC_APP, app)
    settings = public.get(keys.SETTINGS)
    return SidecarRunner(  # aiohttp's own refusals answered as JSON (sidecar.server)
        app,
        keepalive_timeout=settings.timeouts.client_idle if settings else CLIENT_IDLE,
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
    app[keys.EXCHANGES] = Exchanges()
    app[keys.BEARER_IDENTITIES] = BearerIdentities()
    app[keys.LOGIN_LIMITER] = LoginLimiter(settings.login_rate_limit)
    app[keys.TRUSTED_NETWORKS] = tuple(
        ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies
    )
    app[keys.CORS] = cors.policies(settings)
    app.cleanup_ctx.append(_resources)

    # Order matters: the Sync Gateway-compatible endpoints before the catch-all proxy routes.
    # The common case first, one pattern match: aiohttp's router tries `/{db}/...` resources in
    # order, and a proxied path would otherwise be matched against every endpoint below. Tails
    # starting with `_oidc` or `_session` skip it and reach their endpoints (or the catch-all).
    # proxy_handler makes the Host/framing check itself. OPTIONS has a route of its own on the
    # same resource (a CORS preflight is answered without authentication): the method is a
    # dict lookup, no cost to the other methods.
    app.add_routes(
        observed_routes(
            [
                # one resource (same path and name): the method picks the route
                web.route(method, PROXIED, handler, expect_handler=defer_continue, name="proxied")
                for method, handler in (("OPTIONS", options_handler), ("*", proxy_handler))
            ]
        )
    )
    defs = [web.get("/_health", live), web.get("/_ready", ready)]
    defs += oidc_routes.routes() + session_routes.routes()
    if settings.unsupported.oidc_test_provider.enabled:
        test_provider = TestProvider(
            public_url=settings.public_url,
            callback_urls=[
                provider.callback_url
                for conf in settings.databases.values()
                if conf.oidc is not None
                for provider in conf.oidc.providers.values()
                if provider.callback_url
            ],
        )
        defs += oidc_routes.without_referrer(test_provider.routes(prefix="/{db}/_oidc_testing"))
    # The sidecar's own endpoints get the Host/framing check before their handler (they build
    # URLs from the Host); the proxied routes make it themselves, once.
    app.add_routes(observed_routes(defs, check_head=True))
    proxied = [
        web.route(method, path, handler, expect_handler=defer_continue)
        for path in ("/{db}", "/{db}/{tail:.*}")
        for method, handler in (("OPTIONS", options_handler), ("*", proxy_handler))
    ]
    app.add_routes(observed_routes(proxied))
    app.add_routes(observed_routes([web.route("*", "/{tail:.*}", not_found)], check_head=True))
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
        app[keys.PROVIDER_HTTP] = provider_http
        h1 = None
        if settings.upstream_transport == "h1":
            h1 = H1Pool(
                connect_timeout=timeouts.upstream_connect, read_timeout=timeouts.upstream_read
            )
            stack.push_async_callback(h1.close)
        app[keys.FORWARDER] = Forwarder(
            upstream_http,
            connect_timeout=timeouts.upstream_connect,
            read_timeout=timeouts.upstream_read,
            max_body_bytes=settings.max_body_bytes,
            disconnect_poll_interval=None,  # make_runner's handler_cancellation does it
            h1=h1,
        )

        store = create_store(
            settings.session_store.get() if settings.session_store else None,
            local_cache_seconds=settings.session.local_cache_seconds,
            max_lifetime=settings.session.max_lifetime,
        )
        if settings.session_store is None:
            log.warning(
                "no session_store configured: sessions live in this process only; "
                "run a single replica or set session_store to a Redis URL"
            )
        await store.start()
        stack.push_async_callback(store.close)
        app[keys.STORE] = store
        exchanges = app[keys.EXCHANGES]
        exchanges.start(store)
        stack.push_async_callback(exchanges.stop)
        stack.callback(store.subscribe(exchanges.on_store_event))
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
        listening = app[keys.LIFECYCLE].listening
        refreshers = [
            asyncio.create_task(
                _refresh(provider, listening), name=f"provider-refresh-{provider.name}"
            )
            for registry in app[keys.DATABASES].registries()
            for provider in registry.providers
        ]

        async def stop_refreshers() -> None:
            for task in refreshers:
                task.cancel()
            await asyncio.gather(*refreshers, return_exceptions=True)

        stack.push_async_callback(stop_refreshers)
        stack.push_async_callback(exchanges.close_all)
        yield


SELF_HOSTED_WAIT = 5.0  # seconds; a runner that never says it listens delays only this much


async def _refresh(provider: Provider, listening: asyncio.Event) -> None:
    """`provider`'s refresh loop. The built-in test provider is served by this process: its
    first discovery waits until the listener is up, instead of failing (a scary warning on
    a newcomer's first screen) and retrying."""
    if self_fetch.headers_for(discovery_url(provider.config)):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listening.wait(), SELF_HOSTED_WAIT)
    await provider.run_refresh()


def create_admin_app(public: web.Application) -> web.Application:
    """The admin listener: health, metrics and (with the login flow) the user/session API;
    behind AdminGuard: no web page may use it, and `admin_auth` when configured."""
    admin = web.Application(client_max_size=1024**2)
    admin[keys.PUBLIC_APP] = public
    defs = [
        web.get("/_health", live),
        web.get("/_ready", ready),
        web.get("/_metrics", metrics_handler),
        *admin_routes.routes(),
        web.route("*", "/{tail:.*}", not_found),
    ]
    # One guard: no web page (Origin, DNS-rebinding Host), then admin_auth when configured.
    defs = AdminGuard(public[keys.SETTINGS]).guard_routes(defs)
    admin.add_routes(observed_routes(defs))
    return admin


async def metrics_handler(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    body = request.app[keys.PUBLIC_APP][keys.METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
