"""The proxied path: authenticate, then forward the request or relay the websocket; and health."""

from __future__ import annotations

import contextlib

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar import keys
from sidecar.auth import authenticate, login_redirect
from sidecar.databases import Database
from sidecar.errors import Forbidden, Unauthorized
from sidecar.headers import client_ip_trusted, upstream_request_headers
from sidecar.identity import Identity
from sidecar.observe import finisher
from sidecar.request_head import check_request_head
from sidecar.sessions.origin import cross_site_cookie_use
from sidecar.sessions.store import hash_session_id
from sidecar.sgbridge import SessionBridge
from sidecar.targets import target_url


async def defer_continue(request: web.Request) -> None:
    """aiohttp would answer `Expect: 100-continue` before authentication, inviting anyone to
    upload; the proxy handler sends it after authenticating instead."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        request[keys.CONTINUE_DEFERRED] = True


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
        return await _relay_websocket(request, db, identity, target, headers)
    return await app[keys.FORWARDER].http(request, target, headers, before_send=finisher(request))


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
            request, target, headers, on_open=on_open, before_send=finisher(request)
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
