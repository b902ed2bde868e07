"""Who is calling: a bearer ID token or a session cookie becomes an Identity, anything else a 401.

Fail closed: every path that cannot prove the caller raises, so the upstream never sees the request.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from http.cookies import CookieError, SimpleCookie
from typing import Any

from aiohttp import web
from yarl import URL

from sidecar import keys
from sidecar.browser import login_path, may_redirect_to_login
from sidecar.config import ProviderConfig
from sidecar.databases import Database
from sidecar.errors import BadRequest, ProviderError, ServiceUnavailable, Unauthorized
from sidecar.identity import Identity
from sidecar.oidc.tokens import TokenError
from sidecar.pages import redirect
from sidecar.sessions.models import Session, User
from sidecar.sessions.store import SessionStore
from sidecar.users import LoginRefused, UsernameError, apply_login, username_from_claims

log = logging.getLogger("sidecar.auth")

# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6265 4.1.1 cookie-octet: what a plain (unquoted) cookie value may hold.
_COOKIE_OCTETS = re.compile(r"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*")
MAX_AUTHORIZATION = 16 * 1024
# A session whose expiry moved less than this long ago gets its cookie sent again.
COOKIE_REFRESH_WINDOW = 2.0


def bearer_token(request: web.Request) -> str | None:
    """The bearer token of the request, None when there is no Authorization header.

    Raises for anything that is not exactly one well-formed `Bearer <token>`: a caller who
    sent credentials we cannot read must get a 401/400, never fall through to anonymous.
    """
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("multiple Authorization headers")
    value = values[0]
    if len(value) > MAX_AUTHORIZATION:
        raise Unauthorized("Invalid login")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("Invalid login: only Bearer ID tokens are accepted")
    token = token.strip()
    if not _B64TOKEN.fullmatch(token):
        raise Unauthorized("Invalid login")
    return token


def session_cookie(request: web.Request, name: str) -> str | None:
    """The value of the named cookie, parsed tolerantly: a broken Cookie header is no cookie."""
    raw = request.headers.getall("Cookie", [])
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    for header in raw:
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                if _COOKIE_OCTETS.fullmatch(value):
                    return value  # the common, plain case: no cookie parser needed
                try:
                    jar.load(f"{key}={value}")
                except CookieError:
                    continue
                morsel = jar.get(name)
                if morsel is not None:
                    return morsel.value
    return None


async def authenticate(request: web.Request, db: Database) -> Identity:
    """Prove who the caller is, or raise (401 unproven, 503 when a dependency is down)."""
    token = bearer_token(request)
    if token is not None:
        return await identity_from_bearer(request.app, db, token)
    session_id = session_cookie(request, db.cookie_name)
    if session_id is not None:
        return await identity_from_session(request.app, db, session_id)
    raise Unauthorized("Login required")


def login_redirect(request: web.Request, db: Database) -> web.Response | None:
    """What a person's browser gets instead of a 401 on a proxied page: a 302 to the login,
    `/{db}/_oidc?rd=<the page>`, which brings it back here once signed in. None (the 401
    stands) for API clients (sidecar.browser.may_redirect_to_login), when the database turned
    it off (`browser_login: false`), or has no default provider able to run a login."""
    if not db.config.browser_login or db.providers is None:
        return None
    provider = db.providers.default
    if provider is None or provider.config.validation_key is None:
        return None
    if not may_redirect_to_login(request.method, request.headers):
        return None
    public_url = request.app[keys.SETTINGS].public_url
    prefix = URL(public_url).path.rstrip("/") if public_url else ""
    page = prefix + request.raw_path  # the page as the browser named it
    login = login_path(public_url, db.name, rd=page)
    return redirect(login)


class _SessionIdentities:
    """The Identity last built for each session record, reused while the store hands back the
    very same (immutable) record: building one (frozensets, a 10-field frozen dataclass) cost
    more than the rest of a cached session lookup. Bounded; emptied when full."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._built: dict[str, tuple[Session, Identity]] = {}

    def of(self, session: Session, session_id: str) -> Identity:
        entry = self._built.get(session_id)
        if entry is not None and entry[0] is session:  # security: only for that exact record
            return entry[1]
        identity = session.to_identity(session_id)
        if len(self._built) >= self.LIMIT:
            self._built.clear()
        self._built[session_id] = (session, identity)
        return identity


_identities = _SessionIdentities()


async def identity_from_session(app: web.Application, db: Database, session_id: str) -> Identity:
    store = app[keys.STORE]
    now = time.time()
    session = await store.get_session(db.name, session_id, now)  # refuses malformed ids
    if session is None:
        raise Unauthorized("Session Invalid")
    identity = _identities.of(session, session_id)
    if now - session.last_renewed < COOKIE_REFRESH_WINDOW:
        identity = replace(identity, session_expires=session.expires)
    return identity


async def identity_from_bearer(app: web.Application, db: Database, token: str) -> Identity:
    """Sync Gateway's implicit flow: an ID token on every request; no session is created.

    Hot path: a token this replica already verified and resolved is answered from
    BEARER_IDENTITIES (one SHA-256, one dict lookup) for as long as it may be: until its exp,
    a change to its user (any replica), a gap in the event feed, or a retired provider key.
    """
    registry = db.providers
    if registry is None:
        raise Unauthorized("Invalid login")
    store = app[keys.STORE]
    cache = app[keys.BEARER_IDENTITIES]
    digest = hashlib.sha256(token.encode()).digest()
    if store.caching:
        identity = cache.get(db.name, digest, time.time(), store.generation)
        if identity is not None:
            return identity
    metrics = app[keys.METRICS]
    try:
        provider = registry.for_token(token)
        leeway = app[keys.SETTINGS].clock_skew_seconds
        claims = await provider.validate(token, leeway=leeway)
    except TokenError as exc:
        metrics.token_failure(exc.code)
        log.info("bearer token rejected", extra={"reason": exc.code, "db": db.name})
        raise Unauthorized("Invalid login") from None
    except ProviderError as exc:
        raise ServiceUnavailable(f"identity provider unavailable: {exc.reason}") from None
    user = await login_user(store, db, provider.name, provider.config, claims)
    identity = Identity(
        name=user.name,
        email=user.email,
        roles=frozenset(user.roles),
        channels=frozenset(user.channels),
        via="bearer",
        provider=provider.name,
        valid_until=float(claims["exp"]) + leeway,  # as long as validate() would accept it
    )
    if store.caching:
        cache.put(db.name, digest, identity, float(claims["exp"]), store.generation, provider)
    return identity


async def login_user(
    store: SessionStore,
    db: Database,
    provider_name: str,
    config: ProviderConfig,
    claims: Mapping[str, Any],
) -> User:
    """Find or register the user a validated ID token names, refreshing their token-granted grants.

    Shared by the bearer path and the auth code flow. Writes only when something changed, so a
    bearer request for a known user costs no store write.
    """
    try:
        name = username_from_claims(
            claims,
            issuer=config.issuer,
            user_prefix=config.user_prefix,
            username_claim=config.username_claim,
        )
        existing = await store.get_user(db.name, name)
        now = time.time()
        user = apply_login(
            existing,
            claims,
            db=db.name,
            name=name,
            issuer=config.issuer,
            roles_claim=config.roles_claim,
            channels_claim=config.channels_claim,
            register=config.register_user,
            now=now,
        )
    except (UsernameError, LoginRefused) as exc:
        log.info("login refused", extra={"db": db.name, "provider": provider_name, "why": str(exc)})
        raise Unauthorized("Invalid login") from None
    if existing is None or replace(existing, jwt_last_updated=None) != replace(
        user, jwt_last_updated=None
    ):
        await store.put_user(user)
    return user
