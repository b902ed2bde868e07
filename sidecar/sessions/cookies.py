"""The cookies the sidecar writes: the session cookie (set on login, sent again on extension,
expired on logout; Sync Gateway's name, path /{db}) and the login-state cookie. Every one is
built here, Secure when the client reached us over TLS, and never left in a shared cache.

Both live under `{public_url's path}/{db}`: behind a proxy that adds a path prefix
(`public_url: https://sync.example.com/prefix`) the browser only sends back cookies whose
Path matches the URL it sees, `/prefix/db/...`.

The login-state cookie holds the pending logins' states, newest first, separated by `.`
(never in a state), at most MAX_PENDING_STATES: two tabs may sign in at once. One pending
login gives exactly Sync Gateway's cookie, the state alone."""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from email.utils import formatdate
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from aiohttp import web

from sidecar import keys
from sidecar.databases import Database
from sidecar.sessions.origin import request_view

EXPIRED = "Thu, 01 Jan 1970 00:00:00 GMT"
STATE_COOKIE = "sg-oidc-state"  # Sync Gateway's name for the login state
STATE_COOKIE_TTL = 300  # seconds a login may take, as Sync Gateway's state cookie
NO_STORE = {"Cache-Control": "no-store"}  # for every answer that carries session data
# One Cache-Control directive: anything up to a comma outside a quoted string.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_DIRECTIVE = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_SHARED_ONLY = frozenset({"public", "s-maxage", "proxy-revalidate", "private"})
MAX_PENDING_STATES = 4  # logins one browser may have under way at once (tabs)
_STATE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # secrets.token_urlsafe's alphabet
_STATE_SEPARATOR = "."


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


def cookie_path(public_url: str | None, db: str) -> str:
    """`/{db}` under `public_url`'s path prefix, if any (`https://host/prefix` -> `/prefix/db`)."""
    prefix = urlsplit(public_url).path.rstrip("/") if public_url else ""
    return f"{prefix}/{db}"


def _path(request: web.Request, db: Database) -> str:
    return cookie_path(request.app[keys.SETTINGS].public_url, db.name)


def _session_cookie(request: web.Request, db: Database, value: str, expires: str) -> str:
    max_age = None if value else 0
    path = _path(request, db)
    return _cookie(request, db.cookie_name, value, path, expires=expires, max_age=max_age)


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


def pending_states(value: str | None) -> list[str]:
    """The states a login-state cookie holds, newest first; anything that is no state of
    ours is skipped, duplicates dropped, at most MAX_PENDING_STATES kept."""
    states: list[str] = []
    for part in (value or "").split(_STATE_SEPARATOR):
        if _STATE.fullmatch(part) and part not in states:
            states.append(part)
    return states[:MAX_PENDING_STATES]


def holds_state(value: str | None, state: str) -> bool:
    """Whether the login-state cookie `value` holds `state` (each compared in constant time)."""
    found = False
    for pending in pending_states(value):
        found |= hmac.compare_digest(pending.encode(), state.encode())
    return found


def _write_states(
    request: web.Request, response: web.StreamResponse, db: Database, states: Sequence[str]
) -> None:
    path = _path(request, db)
    if states:
        value = _STATE_SEPARATOR.join(states)
        cookie = _cookie(request, STATE_COOKIE, value, path, expires="", max_age=STATE_COOKIE_TTL)
    else:
        cookie = _cookie(request, STATE_COOKIE, "", path, expires=EXPIRED, max_age=0)
    response.headers.add("Set-Cookie", cookie)


def set_state_cookie(
    request: web.Request, response: web.StreamResponse, db: Database, state: str
) -> None:
    """Binds a new login's state to this browser until the provider sends it back, beside
    the logins already pending in it (the oldest beyond MAX_PENDING_STATES forgotten). The
    answer carrying it (a redirect to the provider, or a 401 challenge) is never stored."""
    others = [s for s in pending_states(request.cookies.get(STATE_COOKIE)) if s != state]
    _write_states(request, response, db, [state, *others][:MAX_PENDING_STATES])
    response.headers.update(NO_STORE)


def release_state_cookie(
    request: web.Request, response: web.StreamResponse, db: Database, state: str
) -> None:
    """The callback used `state`: the cookie keeps the other pending logins, and is expired
    when none is left."""
    others = [s for s in pending_states(request.cookies.get(STATE_COOKIE)) if s != state]
    _write_states(request, response, db, others)
    _keep_private(response)
