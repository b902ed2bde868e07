"""The session cookie: set on login, expired on logout (Sync Gateway's name and path)."""

from __future__ import annotations

from email.utils import formatdate
from http.cookies import SimpleCookie

from aiohttp import web

from sidecar import keys
from sidecar.databases import Database


def secure_cookies(request: web.Request) -> bool:
    mode = request.app[keys.SETTINGS].session.cookie_secure
    return mode == "always" or (mode == "auto" and request.scheme == "https")


def set_session_cookie(
    request: web.Request,
    response: web.StreamResponse,
    db: Database,
    session_id: str,
    expires: float,
) -> None:
    response.set_cookie(
        db.cookie_name,
        session_id,
        path=f"/{db.name}",
        expires=formatdate(expires, usegmt=True),
        httponly=True,  # Security: scripts never see the session id
        secure=secure_cookies(request),
        samesite="Lax",
    )


def add_session_cookie_header(
    request: web.Request,
    response: web.StreamResponse,
    db: Database,
    session_id: str,
    expires: float,
) -> None:
    """The same cookie as a header: for `on_response_prepare`, which aiohttp calls after it
    has already turned `response.cookies` into headers."""
    jar: SimpleCookie = SimpleCookie()
    jar[db.cookie_name] = session_id
    morsel = jar[db.cookie_name]
    morsel["path"] = f"/{db.name}"
    morsel["expires"] = formatdate(expires, usegmt=True)
    morsel["httponly"] = True
    morsel["secure"] = secure_cookies(request)
    morsel["samesite"] = "Lax"
    response.headers.add("Set-Cookie", morsel.OutputString())


def expire_session_cookie(request: web.Request, response: web.StreamResponse, db: Database) -> None:
    response.set_cookie(
        db.cookie_name,
        "",
        path=f"/{db.name}",
        expires="Thu, 01 Jan 1970 00:00:00 GMT",
        max_age=0,
        httponly=True,
        secure=secure_cookies(request),
        samesite="Lax",
    )
