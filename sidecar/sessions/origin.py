"""Cross-site use of a cookie session (the Origin policy), and how the client reached us.

A browser sends `Origin` with websocket handshakes and with script-made POST/DELETE requests;
a page of another site must not use a visitor's cookie session that way (cross-site websocket
hijacking, login/logout CSRF). Bearer tokens are not sent by browsers on their own: unaffected.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from sidecar import keys
from sidecar.browser import Origin, parse_origin, serialize_origin
from sidecar.databases import Database
from sidecar.errors import BadRequest
from sidecar.headers import ClientView, client_view
from sidecar.request_head import valid_host


def request_view(request: web.Request) -> ClientView:
    """How the client reached us (TLS? which Host?), believing trusted proxies only."""
    return client_view(
        request.headers,
        request.forwarded if "Forwarded" in request.headers else (),
        https=request.scheme == "https",
        # The Host header itself: aiohttp's request.host would resolve our own name (a
        # blocking DNS lookup) for a request without one.
        host=request.headers.get("Host"),
        peer=request.remote,
        trusted_networks=request.app.get(keys.TRUSTED_NETWORKS, ()),
    )


def public_base(request: web.Request) -> str:
    """Where the sidecar's own URLs start (callback, post-logout return, the test provider's
    issuer): `public_url` without its trailing `/`, else `scheme://host` as the client
    addressed us (`request_view`: a trusted proxy's Forwarded / X-Forwarded-Proto / -Host).

    Security: a URL is never built from a Host (or a trusted proxy's forwarded host) that
    fails `request_head.valid_host`, nor without one: 400."""
    settings = request.app.get(keys.SETTINGS)  # absent: the test provider mounted alone
    if settings is not None and settings.public_url:
        return settings.public_url.rstrip("/")
    view = request_view(request)
    if view.host is None:
        raise BadRequest("no Host header: the sidecar cannot name its own URL (set public_url)")
    if not valid_host(view.host):
        raise BadRequest("invalid Host header")
    return f"{'https' if view.https else 'http'}://{view.host}"


def own_origins(request: web.Request) -> set[Origin]:
    """The sidecar's origin as this client sees it, and `public_url`'s when configured."""
    view = request_view(request)
    origins = set()
    if view.host:
        own = parse_origin(f"{'https' if view.https else 'http'}://{view.host}")
        if own is not None:
            origins.add(own)
    public_url = request.app[keys.SETTINGS].public_url
    if public_url:
        parts = urlsplit(public_url)
        public = parse_origin(f"{parts.scheme}://{parts.netloc}")
        if public is not None:
            origins.add(public)
    return origins


def cross_site_cookie_use(request: web.Request, db: Database, *, by_cookie: bool) -> bool:
    """The Origin policy, decided here only: True (refuse) when a request that a session
    cookie authenticates carries an `Origin` that is neither the sidecar's own nor listed in
    `databases.<db>.cors.origin` (for `_session` POST/DELETE: or in `cors.login_origin`).

    No Origin: not a browser's cross-site request (native and command-line clients), allowed.
    Security: `null` (sandboxed pages, file: URLs), several Origin headers, or anything not
    a plain serialized origin is refused.
    """
    if not by_cookie:
        return False
    values = request.headers.getall("Origin", ())
    if not values:
        return False
    origin = parse_origin(values[0]) if len(values) == 1 else None
    if origin is None:
        return True
    if origin in own_origins(request):
        return False
    # One list for both: the CORS policy (sidecar/cors.py) of the database; a login or logout
    # (`_session` POST/DELETE) may also come from `cors.login_origin`, a websocket (GET) not.
    policy = request.app[keys.CORS][db.name]
    return not policy.allows(serialize_origin(origin), login=request.method != "GET")
