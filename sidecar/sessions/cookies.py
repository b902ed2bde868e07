"""The session cookie: set on login, sent again on extension, expired on logout (Sync Gateway's
name, path /{db})."""

from __future__ import annotations

import hashlib
from email.utils import formatdate
from http.cookies import SimpleCookie

from aiohttp import web

from sidecar import keys
from sidecar.databases import Database

EXPIRED = "Thu, 01 Jan 1970 00:00:00 GMT"


def secure_cookies(request: web.Request) -> bool:
    mode = request.app[keys.SETTINGS].session.cookie_secure
    return mode == "always" or (mode == "auto" and request.scheme == "https")


def _session_cookie(request: web.Request, db: Database, value: str, expires: str) -> str:
    """The Set-Cookie value; every session cookie the sidecar writes is built here."""
    jar: SimpleCookie = SimpleCookie()
    jar[db.cookie_name] = value
    morsel = jar[db.cookie_name]
    morsel["path"] = f"/{db.name}"
    morsel["expires"] = expires
    if not value:
        morsel["max-age"] = 0
    morsel["httponly"] = True  # Security: scripts never see the session id
    morsel["secure"] = secure_cookies(request)
    morsel["samesite"] = "Lax"
    return morsel.OutputString()


def set_session_cookie(
    request: web.Request,
    response: web.StreamResponse,
    db: Database,
    session_id: str,
    expires: float,
) -> None:
    """Works before and after aiohttp turned `response.cookies` into headers (it does that
    before on_response_prepare and the Forwarder's last-minute headers)."""
    header = _session_cookie(request, db, session_id, formatdate(expires, usegmt=True))
    response.headers.add("Set-Cookie", header)


def expire_session_cookie(request: web.Request, response: web.StreamResponse, db: Database) -> None:
    response.headers.add("Set-Cookie", _session_cookie(request, db, "", EXPIRED))


def sets_session_cookie(response: web.StreamResponse, db: Database) -> bool:
    """Whether the handler already wrote a session cookie into this answer."""
    prefix = db.cookie_name + "="
    return any(v.startswith(prefix) for v in response.headers.getall("Set-Cookie", ()))


def logout_csrf_token(session_id: str) -> str:
    """The sign-out form's CSRF token: bound to the session cookie (which a cross-site page can
    neither read nor choose), so only a page the sidecar served to this browser knows it."""
    return hashlib.sha256(("logout-csrf:" + session_id).encode()).hexdigest()
