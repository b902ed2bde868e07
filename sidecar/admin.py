"""The admin API (private port): users and sessions, as Sync Gateway's admin REST API."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from sidecar import keys
from sidecar.databases import Database
from sidecar.errors import BadRequest, NotFound, outside_text
from sidecar.observability import audit
from sidecar.sessions.cookies import NO_STORE
from sidecar.sessions.models import Session, User, hash_session_id
from sidecar.sessions.routes import session_body
from sidecar.sessions.store import SessionStore, is_well_formed_session_id
from sidecar.streams import read_json_object

MAX_BODY = 64 * 1024
USER_FIELDS = {"name", "email", "admin_channels", "admin_roles", "disabled"}
READ_ONLY = {"jwt_issuer", "jwt_roles", "jwt_channels", "jwt_last_updated", "roles", "all_channels"}


def _db(request: web.Request) -> tuple[Database, SessionStore]:
    public = request.app[keys.PUBLIC_APP]
    db = public[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    return db, public[keys.STORE]


def rfc3339(timestamp: float) -> str:
    """A time as Sync Gateway's admin API writes one (Go's time.Time in JSON: RFC 3339), e.g.
    `2026-11-24T09:17:12.5Z`; clients parse `expires` with an ISO 8601 parser."""
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")
    whole, _, fraction = text.removesuffix("+00:00").partition(".")
    fraction = fraction.rstrip("0")  # as Go's RFC3339Nano: no trailing zeros
    return f"{whole}.{fraction}Z" if fraction else f"{whole}Z"


def _strings(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key, [])
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{key} must be a list of non-empty strings")
    return tuple(sorted(set(value)))


def user_json(user: User) -> dict[str, Any]:
    return {
        "name": user.name,
        "email": user.email,
        "admin_channels": list(user.admin_channels),
        "admin_roles": list(user.admin_roles),
        "all_channels": list(user.channels),
        "roles": list(user.roles),
        "disabled": user.disabled,
        "jwt_issuer": user.jwt_issuer,
        "jwt_roles": list(user.jwt_roles),
        "jwt_channels": list(user.jwt_channels),
        "jwt_last_updated": rfc3339(user.jwt_last_updated) if user.jwt_last_updated else None,
    }


async def put_user(request: web.Request) -> web.Response:
    db, store = _db(request)
    name = request.match_info["name"]
    body = await read_json_object(request, limit=MAX_BODY)
    if "password" in body:  # checked first: it would otherwise read as an unknown field
        raise BadRequest("passwords are not supported: users log in with OpenID Connect")
    unknown = set(body) - USER_FIELDS - READ_ONLY
    if unknown:
        # Security: the caller's own keys, quoted as plain text only.
        names = ", ".join(outside_text(str(k), limit=64) for k in sorted(unknown))
        raise BadRequest(f"unknown field(s): {names}")
    if body.get("name", name) != name:
        raise BadRequest("name in body does not match the URL")
    email = body.get("email")
    if email is not None and (not isinstance(email, str) or "@" not in email):
        raise BadRequest("email must be a valid address")
    disabled = body.get("disabled", False)
    if not isinstance(disabled, bool):
        raise BadRequest("disabled must be true or false")
    existing = await store.get_user(db.name, name)
    base = existing or User(
        db=db.name,
        name=name,
        email=None,
        admin_channels=(),
        admin_roles=(),
        disabled=False,
        jwt_issuer=None,
        jwt_roles=(),
        jwt_channels=(),
        jwt_last_updated=None,
    )
    user = replace(
        base,
        email=email,
        admin_channels=_strings(body, "admin_channels"),
        admin_roles=_strings(body, "admin_roles"),
        disabled=disabled,
    )
    disabling = user.disabled and not (existing is not None and existing.disabled)
    # For the audit line: the sessions this ends (counted just before; put_user removes them).
    ending = len(await store.list_user_sessions(db.name, name, time.time())) if disabling else 0
    await store.put_user(user)
    if disabling:
        audit("revocation", user=name, db=db.name, reason="user disabled (admin)", sessions=ending)
    return web.json_response({}, status=200 if existing else 201)


async def get_user(request: web.Request) -> web.Response:
    db, store = _db(request)
    user = await store.get_user(db.name, request.match_info["name"])
    if user is None:
        raise NotFound("missing")
    return web.json_response(user_json(user))


async def delete_user(request: web.Request) -> web.Response:
    """Deleting a user ends their sessions and websockets on every replica."""
    db, store = _db(request)
    name = request.match_info["name"]
    ending = len(await store.list_user_sessions(db.name, name, time.time()))  # for the audit
    if not await store.delete_user(db.name, name):
        raise NotFound("missing")
    audit("revocation", user=name, db=db.name, reason="user deleted (admin)", sessions=ending)
    return web.json_response({"ok": True})


async def delete_user_sessions(request: web.Request) -> web.Response:
    db, store = _db(request)
    name = request.match_info["name"]
    if await store.get_user(db.name, name) is None:
        raise NotFound("missing")
    count = await store.delete_user_sessions(db.name, name)
    audit("revocation", user=name, db=db.name, reason="sessions revoked (admin)", sessions=count)
    return web.json_response({"ok": True, "revoked": count})


def session_json(session: Session, session_id: str, db: Database) -> dict[str, Any]:
    """Sync Gateway's session body (the public `GET /{db}/_session`'s), with our fields beside."""
    return session_body(session.to_identity(session_id)) | {
        "name": session.name,
        "expires": rfc3339(session.expires),
        "ttl": session.ttl,
        "cookie_name": db.cookie_name,
        "provider": session.provider,
    }


async def post_session(request: web.Request) -> web.Response:
    """Create a session for a user (Sync Gateway's custom authentication)."""
    db, store = _db(request)
    body = await read_json_object(request, limit=MAX_BODY)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("name is required")
    ttl = body.get("ttl", request.app[keys.PUBLIC_APP][keys.SETTINGS].session.ttl)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 60 <= ttl <= 365 * 86400:
        raise BadRequest("ttl must be whole seconds between 60 and 31536000")
    user = await store.get_user(db.name, name)
    if user is None:
        raise NotFound(f"no such user {outside_text(name, limit=64)!r}")
    if user.disabled:
        raise BadRequest(f"user {outside_text(name, limit=64)!r} is disabled")
    session_id, session = await store.create_session(user, ttl=ttl, provider=None, now=time.time())
    request.app[keys.PUBLIC_APP][keys.METRICS].sessions_created.labels("admin").inc()
    return web.json_response(
        {
            "session_id": session_id,
            "expires": rfc3339(session.expires),  # at most session.max_lifetime from now
            "cookie_name": db.cookie_name,
        },
        headers=NO_STORE,
    )


def _session_id(request: web.Request) -> str:
    session_id = request.match_info["session_id"]
    if not is_well_formed_session_id(session_id):
        raise NotFound("missing")
    return session_id


async def get_session(request: web.Request) -> web.Response:
    """Looking at a session is not using it: read from the store, never extended."""
    db, store = _db(request)
    session_id = _session_id(request)
    session = await store.get_session_by_key(db.name, hash_session_id(session_id), time.time())
    if session is None:
        raise NotFound("missing")
    return web.json_response(session_json(session, session_id, db), headers=NO_STORE)


async def delete_session(request: web.Request) -> web.Response:
    db, store = _db(request)
    key = hash_session_id(_session_id(request))
    session = await store.get_session_by_key(db.name, key, time.time())
    if session is None or not await store.delete_session_by_key(db.name, key):
        raise NotFound("missing")
    audit(
        "revocation",
        user=session.name,
        provider=session.provider,
        db=db.name,
        reason="session deleted (admin)",
    )
    return web.json_response({"ok": True})


def routes() -> list[web.RouteDef]:
    return [
        web.put("/{db}/_user/{name}", put_user),
        web.get("/{db}/_user/{name}", get_user),
        web.delete("/{db}/_user/{name}", delete_user),
        web.delete("/{db}/_user/{name}/_session", delete_user_sessions),
        web.post("/{db}/_session", post_session),
        web.get("/{db}/_session/{session_id}", get_session),
        web.delete("/{db}/_session/{session_id}", delete_session),
    ]
