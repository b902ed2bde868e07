"""`GET|POST|DELETE /{db}/_session` on the public port, with Sync Gateway's bodies."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from sidecar import keys
from sidecar.auth import authenticate, bearer_token, session_cookie
from sidecar.databases import Database
from sidecar.errors import BadRequest, NotFound, Unauthorized
from sidecar.identity import Identity
from sidecar.observability import audit
from sidecar.sessions.cookies import NO_STORE, expire_session_cookie, set_session_cookie
from sidecar.sessions.models import hash_session_id
from sidecar.sessions.origin import cross_site_cookie_use
from sidecar.sessions.store import is_well_formed_session_id
from sidecar.streams import read_json_object

AUTH_HANDLERS = ["default", "cookie"]


def session_body(identity: Identity | None) -> dict[str, Any]:
    channels = {ch: 1 for ch in sorted(identity.channels)} if identity else {}
    return {
        "authentication_handlers": AUTH_HANDLERS,
        "ok": True,
        "userCtx": {"channels": channels, "name": identity.name if identity else None},
    }


async def get_session(request: web.Request) -> web.Response:
    db = request.app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    if bearer_token(request) is None and session_cookie(request, db.cookie_name) is None:
        # no credentials: Sync Gateway's guest answer
        return web.json_response(session_body(None), headers=NO_STORE)
    identity = await authenticate(request, db)
    request[keys.IDENTITY] = identity
    return web.json_response(session_body(identity), headers=NO_STORE)


def _refuse_cross_site(request: web.Request, db: Database, *, by_cookie: bool) -> None:
    """Sync Gateway's answer to a login/logout from another site's page (security: CSRF)."""
    if cross_site_cookie_use(request, db, by_cookie=by_cookie):
        raise BadRequest("No CORS")


async def post_session(request: web.Request) -> web.Response:
    """An authenticated caller (e.g. a bearer ID token) gets a session and its cookie."""
    db = request.app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    has_cookie = session_cookie(request, db.cookie_name) is not None
    _refuse_cross_site(request, db, by_cookie=has_cookie and bearer_token(request) is None)
    body = await read_json_object(request)
    if "name" in body or "password" in body:
        # Sync Gateway's password login: there are no passwords here, only OpenID Connect.
        raise Unauthorized("Invalid login: password authentication is not supported")
    identity = await authenticate(request, db)
    request[keys.IDENTITY] = identity
    store = request.app[keys.STORE]
    user = await store.get_user(db.name, identity.name)
    if user is None or user.disabled:
        raise Unauthorized("Invalid login")
    session_id, session = await store.create_session(
        user,
        ttl=request.app[keys.SETTINGS].session.ttl,
        provider=identity.provider,
        now=time.time(),
    )
    request.app[keys.METRICS].sessions_created.labels("post_session").inc()
    response = web.json_response(session_body(session.to_identity(session_id)), headers=NO_STORE)
    set_session_cookie(request, response, db, session_id, session.expires)
    return response


async def delete_session(request: web.Request) -> web.Response:
    """Logout: the session is deleted server-side (every replica), the cookie expired."""
    db = request.app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    session_id = session_cookie(request, db.cookie_name)
    if session_id is None:
        raise NotFound("no session")
    _refuse_cross_site(request, db, by_cookie=True)  # logout acts on the cookie alone
    if is_well_formed_session_id(session_id):
        store = request.app[keys.STORE]
        session = await store.get_session_by_key(db.name, hash_session_id(session_id), time.time())
        if session is not None and await store.delete_session_by_key(db.name, session.key):
            audit("logout", user=session.name, provider=session.provider, db=db.name, reason="api")
    response = web.json_response({"ok": True}, headers=NO_STORE)
    expire_session_cookie(request, response, db)
    return response


def routes() -> list[web.RouteDef]:
    return [
        web.get("/{db}/_session", get_session),
        web.post("/{db}/_session", post_session),
        web.delete("/{db}/_session", delete_session),
    ]
