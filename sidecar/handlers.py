"""The proxied path: authenticate, then forward the request or relay the websocket; and health."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar import keys
from sidecar.auth import authenticate
from sidecar.databases import Database
from sidecar.exchanges import Exchange
from sidecar.headers import client_ip_trusted, upstream_request_headers
from sidecar.identity import Identity
from sidecar.observe import finisher
from sidecar.proxy import target_url
from sidecar.sgbridge import SessionBridge


async def defer_continue(request: web.Request) -> None:
    """aiohttp would answer `Expect: 100-continue` before authentication, inviting anyone to
    upload; the proxy handler sends it after authenticating instead."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        request[keys.CONTINUE_DEFERRED] = True


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    db = app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    identity = await authenticate(request, db)  # raises: nothing below runs unauthenticated
    request[keys.IDENTITY] = identity
    # Tracked from here until it ends: revocation (any replica) or the credential's end stops
    # it, whatever the forwarder is doing (sidecar/exchanges.py).
    exchanges = app[keys.EXCHANGES]
    exchange = exchanges.open(request, db.name, identity)
    try:
        return await _forward(request, db, identity, exchange)
    finally:
        exchanges.close(exchange)


async def _forward(
    request: web.Request, db: Database, identity: Identity, exchange: Exchange
) -> web.StreamResponse:
    app = request.app
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
        return await _relay_websocket(request, exchange, target, headers)
    return await forwarder.http(request, target, headers, before_send=finisher(request))


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
