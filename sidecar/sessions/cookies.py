"""The cookies the sidecar writes: the session cookie (set on login, sent again on extension,
expired on logout; Sync Gateway's name, path /{db}) and the login-state cookie. Every one is
built here, Secure when the client reached us over TLS, and never left in a shared cache."""

from __future__ import annotations

import re
from email.utils import formatdate
from http.cookies import SimpleCookie

from aiohttp import web

from sidecar import keys
from sidecar.databases import Database
from sidecar.sessions.origin import request_view

EXPIRED = "Thu, 01 Jan 1970 00:00:00 GMT"
STATE_COOKIE = "sg-oidc-state"  # Sync Gateway's name for the login state
NO_STORE = {"Cache-Control": "no-store"}  # for every answer that carries session data
# One Cache-Control directive: anything up to a comma outside a quoted string.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_DIRECTIVE = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_SHARED_ONLY = frozenset({"public", "s-maxage", "proxy-revalidate", "private"})


def secure_cookies(request: web.Request) -> bool:
    """`cookie_secure`: always, never, or (auto) when the request reached us over TLS, directly
    or through a trusted proxy that says so (see headers.client_view)."""
    mode = request.app[keys.SETTINGS].session.cookie_secure
    return mode == "always" or (mode == "auto" and request_view(request).https)


def _cookie(
    request: web.Request, name: str, value: str, path: str, *, expires: str, max_age: int | None
) -> str:
    """The Set-Cookie value; every cookie the sidecar writes is built here."""
    jar: SimpleCookie = SimpleCookie()
    jar[name] = value
    morsel = jar[name]
    morsel["path"] = path
    if expires:
        morsel["expires"] = expires
    if max_age is not None:
        morsel["max-age"] = max_age
    morsel["httponly"] = True  # Security: scripts never see the session id or login state
    morsel["secure"] = secure_cookies(request)
    morsel["samesite"] = "Lax"  # the provider's redirect back is a top-level GET navigation
    return morsel.OutputString()


def _session_cookie(request: web.Request, db: Database, value: str, expires: str) -> str:
    max_age = None if value else 0
    return _cookie(request, db.cookie_name, value, f"/{db.name}", expires=expires, max_age=max_age)


def private_cache_control(values: list[str]) -> str:
    """Cache-Control for an answer that carries a session cookie: no shared cache may keep it
    (RFC 9111 5.2.2.7 `private`). `public`, `s-maxage`, `proxy-revalidate` and any
    field-qualified `private="..."` go, `private` comes first; the browser's own directives
    (max-age, no-cache...) stay. An answer that is already `no-store` is left as it is."""
    text = ", ".join(values)
    if '"' in _QUOTED.sub("", text):
        return "no-store"  # Security: an unbalanced quote, which caches may read any way
    directives = [d.strip() for d in _DIRECTIVE.findall(text) if d.strip()]
    names = [d.partition("=")[0].strip().lower() for d in directives]
    if "no-store" in names:
        return ", ".join(directives)
    kept = [d for d, n in zip(directives, names, strict=True) if n not in _SHARED_ONLY]
    return ", ".join(["private", *kept])


def _keep_private(response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = private_cache_control(
        response.headers.getall("Cache-Control", [])
    )


def set_session_cookie(
    request: web.Request,
    response: web.StreamResponse,
    db: Database,
    session_id: str,
    expires: float,
) -> None:
    """Works before and after aiohttp turned `response.cookies` into headers (it does that
    before on_response_prepare and the Forwarder's last-minute headers). Security: the answer
    becomes private, even an upstream's `public` one re-sending the cookie on extension."""
    header = _session_cookie(request, db, session_id, formatdate(expires, usegmt=True))
    response.headers.add("Set-Cookie", header)
    _keep_private(response)


def expire_session_cookie(request: web.Request, response: web.StreamResponse, db: Database) -> None:
    response.headers.add("Set-Cookie", _session_cookie(request, db, "", EXPIRED))
    _keep_private(response)


def sets_session_cookie(response: web.StreamResponse, db: Database) -> bool:
    """Whether the handler already wrote a session cookie into this answer."""
    prefix = db.cookie_name + "="
    return any(v.startswith(prefix) for v in response.headers.getall("Set-Cookie", ()))


def set_state_cookie(
    request: web.Request, response: web.StreamResponse, db: Database, state: str, max_age: int
) -> None:
    """The login state, bound to this browser until the provider sends it back; the answer
    carrying it (a redirect to the provider, or a 401 challenge) is never stored."""
    cookie = _cookie(request, STATE_COOKIE, state, f"/{db.name}", expires="", max_age=max_age)
    response.headers.add("Set-Cookie", cookie)
    response.headers.update(NO_STORE)


def expire_state_cookie(request: web.Request, response: web.StreamResponse, db: Database) -> None:
    cookie = _cookie(request, STATE_COOKIE, "", f"/{db.name}", expires=EXPIRED, max_age=0)
    response.headers.add("Set-Cookie", cookie)
    _keep_private(response)
