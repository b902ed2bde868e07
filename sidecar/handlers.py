"""The proxied path: authenticate, then forward the request or relay the websocket; and health."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar import keys
from sidecar.auth import authenticate, login_redirect
from sidecar.cors import is_preflight, preflight_answer
from sidecar.errors import Forbidden, Unauthorized
from sidecar.exchanges import Exchange
from sidecar.headers import client_ip_trusted, upstream_request_headers
from sidecar.observe import finisher
from sidecar.request_head import check_request_head
from sidecar.sessions.origin import cross_site_cookie_use
from sidecar.sgbridge import SessionBridge
from sidecar.targets import target_url


async def defer_continue(request: web.Request) -> None:
    """aiohttp would answer `Expect: 100-continue` before authentication, inviting anyone to
    upload; the proxy handler sends it after authenticating instead."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        request[keys.CONTINUE_DEFERRED] = True


async def options_handler(request: web.Request) -> web.StreamResponse:
    """OPTIONS on a database path: a CORS preflight is answered here from the database's
    `cors` lists — security: never authenticated (it carries no credentials) and never
    forwarded; any other OPTIONS is proxied like every method."""
    if not is_preflight(request.headers):
        return await proxy_handler(request)
    db = request.app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    login = request.match_info.get("tail") == "_session"
    return preflight_answer(request, request.app[keys.CORS][db.name], login=login)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    db = app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    # Security: a Host or framing the upstream could read differently is refused up front.
    host = check_request_head(request.headers, request.version)
    try:
        identity = await authenticate(request, db)  # raises: nothing below runs unauthenticated
    except Unauthorized:
        if (to_login := login_redirect(request, db)) is None:  # a browser: off to sign in
            raise
        return to_login
    request[keys.IDENTITY] = identity
    websocket = _is_websocket_upgrade(request)
    if websocket and cross_site_cookie_use(
        request, db, by_cookie=identity.via == "session"
    ):  # security: cross-site websocket hijacking; the upstream never sees it
        raise Forbidden("Origin not allowed to use a cookie session")
    # Tracked from here until it ends: revocation (any replica) or the credential's end stops
    # it, whatever the forwarder is doing (sidecar/exchanges.py).
    exchanges = app[keys.EXCHANGES]
    exchange = exchanges.open(request, db.name, identity)
    try:
        bridge = app[keys.SG_BRIDGES].get(db.name)  # Sync Gateway: it must see the user too
        sg_session = await bridge.upstream_cookie(identity) if bridge is not None else None
        if request.get(keys.CONTINUE_DEFERRED):
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
            host=host,
            trusted=client_ip_trusted(peer, app[keys.TRUSTED_NETWORKS]),
            pass_authorization=settings.pass_authorization,
            session_cookie_name=db.cookie_name,
            request_id=request[keys.REQUEST_ID],
            couchdb=settings.couchdb_proxy_auth if settings.couchdb_proxy_auth.enabled else None,
            strip=settings.strip_request_headers,
        )
        if sg_session is not None:
            SessionBridge.apply(headers, db.cookie_name, sg_session)
            request[keys.SG_SESSION] = sg_session
        target = target_url(db.upstream, request.raw_path, db.name)
        if websocket:
            return await _relay_websocket(request, exchange, target, headers)
        return await app[keys.FORWARDER].http(
            request, target, headers, before_send=finisher(request)
        )
    finally:
        exchanges.close(exchange)


async def _relay_websocket(
    request: web.Request, exchange: Exchange, target: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    """Relay a websocket; once upgraded, its exchange closes it with 1008 when it must end."""
    gauge = request.app[keys.METRICS].websockets

    def on_open(ws: web.WebSocketResponse) -> None:
        exchange.websocket = ws
        gauge.inc()

    try:
        return await request.app[keys.FORWARDER].websocket(
            request, target, headers, on_open=on_open, before_send=finisher(request)
        )
    finally:
        if exchange.websocket is not None:
            gauge.dec()


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
