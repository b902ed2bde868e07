"""Sync Gateway's login endpoints: `/{db}/_oidc`, `_oidc_challenge`, `_oidc_callback`, `_refresh`.

Safer than the original without breaking its clients: state is single-use and bound to the
browser by a cookie, every request carries a nonce and a PKCE S256 challenge, the callback
checks the response's issuer (RFC 9207), and no answer leaks its URL through a Referer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web
from yarl import URL

from sidecar import keys
from sidecar.auth import login_user
from sidecar.browser import (
    is_cross_site,
    is_page_load,
    login_path,
    safe_return_target,
    serialized_origin,
)
from sidecar.databases import Database
from sidecar.errors import (
    BadRequest,
    NotFound,
    ProviderError,
    SidecarError,
    TooManyRequests,
    Unauthorized,
    outside_text,
)
from sidecar.observability import audit
from sidecar.oidc import logout
from sidecar.oidc.browser_answers import LANDED, browser_answer, landing, replayed_callback
from sidecar.oidc.client import LoginRequest, authorization_url, new_login, token_request
from sidecar.oidc.login_limit import client_address
from sidecar.oidc.provider import Provider, ProviderRegistry
from sidecar.oidc.single_flight import single_flight
from sidecar.oidc.tokens import TokenError
from sidecar.sessions.cookies import (
    STATE_COOKIE,
    STATE_COOKIE_TTL,
    holds_state,
    release_state_cookie,
    set_session_cookie,
    set_state_cookie,
)
from sidecar.sessions.models import User
from sidecar.sessions.origin import public_base

log = logging.getLogger("sidecar.oidc")

STATE_TTL = STATE_COOKIE_TTL  # seconds a login may take, as Sync Gateway's state cookie
REFRESH_BINDING_TTL = 90 * 86400
# What a refresh shares with concurrent callers of the same token (sealed, seconds-long).
REFRESH_SHARED = ("id_token", "refresh_token", "access_token", "token_type", "expires_in")
MAX_PARAM = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StateRejected(BadRequest):
    """The callback's state is missing, foreign or used up (a reload or Back in a browser)."""


def _registry(request: web.Request) -> tuple[Database, ProviderRegistry]:
    db = request.app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    if db.providers is None:
        raise NotFound(f"OpenID Connect is not configured for database {db.name!r}")
    return db, db.providers


def _param(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    if values and len(values[0]) > MAX_PARAM:
        raise BadRequest(f"{name} too long")
    return values[0] if values else None


def _provider(registry: ProviderRegistry, name: str | None) -> Provider:
    return registry.get(name or None)


def callback_url(
    request: web.Request, db: Database, provider: Provider, default: str | None
) -> str:
    """The configured callback_url, else `{public_base}/{db}/_oidc_callback` (`public_url`,
    else the origin the client addressed, through a trusted proxy as it reports it).

    `?provider=` is added for a non-default provider so the callback knows whose code it is.
    """
    if provider.config.callback_url:
        return provider.config.callback_url
    url = URL(f"{public_base(request)}/{db.name}/_oidc_callback")
    if provider.name != default:
        url = url.with_query(provider=provider.name)
    return str(url)


def _check_login_rate(request: web.Request) -> None:
    """Raises TooManyRequests (429, Retry-After) when this login start is over the limit of
    its client or of the process (`login_rate_limit`, oidc.login_limit)."""
    client = client_address(request.remote, request.headers, request.app[keys.TRUSTED_NETWORKS])
    wait = request.app[keys.LOGIN_LIMITER].admit(client)
    if wait > 0:
        log.info("login start refused: rate limit", extra={"db": request.get(keys.DB_NAME)})
        raise TooManyRequests(
            "too many logins started: try again later",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def _start_login(request: web.Request) -> tuple[str, Database]:
    db, registry = _registry(request)
    _check_login_rate(request)  # before anything is stored
    provider = _provider(registry, _param(request, "provider"))
    if provider.config.validation_key is None:
        raise BadRequest(
            f"provider {provider.name!r} has no validation_key: the auth code flow is unavailable"
        )
    meta = await provider.ensure_metadata()
    login = new_login(
        provider.name,
        callback_url(request, db, provider, registry.default.name if registry.default else None),
        offline=_param(request, "offline") == "true",
    )
    url = authorization_url(meta, provider.config, login)  # may raise: nothing stored yet
    store = request.app[keys.STORE]
    # The return target stays here with the single-use login state (never in a cookie or in
    # the URL sent to the provider).
    record = asdict(login) | {"db": db.name, "rd": _return_target(request, db)}
    await store.put_record("login", _digest(login.state), record, STATE_TTL)
    return url, db


def _return_target(request: web.Request, db: Database) -> str | None:
    """The `rd` parameter when it is a safe place to land after the login, else None (the
    callback then shows the signed-in page)."""
    values = request.query.getall("rd", [])
    if len(values) > 1:
        raise BadRequest("rd given more than once")
    raw = values[0] if values else None  # too long: refused below, like any unsafe target
    if raw is None:
        return None
    target = safe_return_target(raw, db.config.allowed_redirect_origins)
    if target is None:
        log.info("return target refused", extra={"db": db.name, "length": len(raw)})
    return target


def _state_of(url: str) -> str:
    return URL(url).query["state"]


async def oidc(request: web.Request) -> web.StreamResponse:
    url, db = await _start_login(request)
    response = web.Response(status=302, headers={"Location": url})
    set_state_cookie(request, response, db, _state_of(url))
    return response


def go_quote(value: str) -> str:
    """Go's %q for the ASCII a URL holds: double quotes, with `"` and `\\` escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def oidc_challenge(request: web.Request) -> web.StreamResponse:
    url, db = await _start_login(request)
    response = web.json_response(
        {"error": "Unauthorized", "reason": "Login required"},
        status=401,
        headers={"WWW-Authenticate": f"OIDC login={go_quote(url)}"},
    )
    set_state_cookie(request, response, db, _state_of(url))
    return response


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


NO_STATE_COOKIE_HINT = (
    "This browser did not send back the login cookie set a moment ago: allow cookies for "
    "this site (over plain http, session.cookie_secure must not be 'always')"
)
ISS_MISSING = "OIDC Auth Failure: the provider's response has no iss (RFC 9207)"
ISS_MISMATCH = "OIDC Auth Failure: iss does not match the provider's issuer"


async def _check_issuer(request: web.Request, provider: Provider) -> None:
    """RFC 9207 2.4: an authorization response that names its issuer must name this provider
    (exact string comparison), else it is a mix-up; a provider that advertises
    `authorization_response_iss_parameter_supported` must name it. Checked before the state is
    taken and the code redeemed, so a refused response costs the login nothing."""
    iss = _param(request, "iss")
    meta = await provider.ensure_metadata()
    if iss is None and not meta.authorization_response_iss_parameter_supported:
        return
    # The configured issuer, or the metadata's own when discovery_url or
    # disable_cfg_validation let the two differ: both name this provider and no other.
    if iss is None or iss not in (provider.config.issuer, meta.issuer):
        request.app[keys.METRICS].logins.labels(provider.name, "login", "issuer_mismatch").inc()
        raise BadRequest(ISS_MISSING if iss is None else ISS_MISMATCH)  # never echoes iss


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    db, registry = _registry(request)
    # Sync Gateway's order of checks: error, code, provider, state; RFC 9207's iss before state.
    error = _param(request, "error")
    if error is not None:
        given = _param(request, "error_description") or ""
        description = outside_text(given) or outside_text(error, limit=64) or "-"
        name = _param(request, "provider")
        # A configured name only: a metric label never takes a caller's text.
        label = name if name in {p.name for p in registry} else "-"
        request.app[keys.METRICS].logins.labels(label, "login", "provider_error").inc()
        raise Unauthorized(f"oidc callback received an error: {description}")
    code = _param(request, "code")
    if not code:
        raise BadRequest("Code must be present on oidc callback")
    try:
        provider = _provider(registry, _param(request, "provider"))
    except BadRequest:
        raise BadRequest("Unable to identify provider for callback request") from None
    await _check_issuer(request, provider)
    state = _param(request, "state")
    if not provider.config.disable_callback_state:
        cookie = request.cookies.get(STATE_COOKIE)
        if cookie is None:
            raise StateRejected("OIDC Auth Failure: No state cookie found for callback")
        # Security: the state must come back to the browser that started the login (one
        # of the logins pending in it: tabs may sign in at once).
        if state is None or not holds_state(cookie, state):
            raise StateRejected("OIDC Auth Failure: State mismatch")
    if not state:
        raise BadRequest("OIDC Auth Failure: State mismatch")
    store = request.app[keys.STORE]
    record = await store.take_record("login", _digest(state))  # single use, on every replica
    if record is None or record.get("db") != db.name or record.get("provider") != provider.name:
        raise StateRejected("OIDC Auth Failure: State expired or already used")
    request[keys.RETURN_TARGET] = record.get("rd")
    login = LoginRequest(**{k: v for k, v in record.items() if k not in ("db", "rd")})

    tokens = await _grant(
        request,
        provider,
        "login",
        "authorization_code",
        code=code,
        redirect_uri=login.redirect_uri,
        code_verifier=login.code_verifier,
    )
    claims = await _validate(request, provider, tokens["id_token"], nonce=login.nonce)
    user = await login_user(store, db, provider.name, provider.config, claims)
    audit("login", user=user.name, provider=provider.name, db=db.name, reason="code flow")
    refresh_token = tokens.get("refresh_token")
    if isinstance(refresh_token, str) and refresh_token:
        await store.put_record(
            "refresh",
            _digest(refresh_token),
            {"db": db.name, "provider": provider.name, "iss": claims["iss"], "sub": claims["sub"]},
            REFRESH_BINDING_TTL,
        )
    body: dict[str, Any] = {"id_token": tokens["id_token"]}
    if isinstance(refresh_token, str):
        body["refresh_token"] = refresh_token
    response = await _session_answer(request, db, provider, user, tokens, body)
    if is_page_load(request.method, request.headers):  # a person: a page, never the tokens
        response = await browser_answer(request, db, provider, _digest(state), body, response)
    release_state_cookie(request, response, db, state)
    return response


async def oidc_refresh(request: web.Request) -> web.StreamResponse:
    db, registry = _registry(request)
    refresh_token = _param(request, "refresh_token")
    if not refresh_token:
        raise BadRequest("Refresh token must be present for oidc refresh")
    provider = _provider(registry, _param(request, "provider"))
    store = request.app[keys.STORE]
    binding = await store.get_record("refresh", _digest(refresh_token))
    if binding is None or binding.get("db") != db.name or binding.get("provider") != provider.name:
        request.app[keys.METRICS].logins.labels(provider.name, "refresh", "unknown_token").inc()
        raise Unauthorized("Unable to refresh token: unknown refresh token")

    async def refresh_grant() -> dict[str, Any]:
        tokens = await _grant(
            request, provider, "refresh", "refresh_token", refresh_token=refresh_token
        )
        claims = await _validate(request, provider, tokens["id_token"], nonce=None)
        # OIDC Core 12.2: a refreshed ID token keeps the original iss and sub.
        if claims["iss"] != binding["iss"] or claims["sub"] != binding["sub"]:
            request.app[keys.METRICS].logins.labels(
                provider.name, "refresh", "subject_changed"
            ).inc()
            raise Unauthorized("Unable to refresh token: the provider changed the token's subject")
        new_refresh = tokens.get("refresh_token")
        if isinstance(new_refresh, str) and new_refresh and new_refresh != refresh_token:
            await store.put_record("refresh", _digest(new_refresh), binding, REFRESH_BINDING_TTL)
        return {k: tokens[k] for k in REFRESH_SHARED if k in tokens}

    # One provider call per refresh token, whichever replicas its concurrent callers reach;
    # each caller still gets a session of its own.
    provider_timeout = request.app[keys.SETTINGS].timeouts.provider
    tokens = await single_flight(
        store, "refresh", refresh_token, refresh_grant, lock_seconds=2 * provider_timeout + 5
    )
    claims = await _validate(request, provider, tokens["id_token"], nonce=None)  # cached
    user = await login_user(store, db, provider.name, provider.config, claims)
    body: dict[str, Any] = {"id_token": tokens["id_token"]}
    new_refresh = tokens.get("refresh_token")
    # The provider rotated the token: the client must get the new one. Couchbase Lite keeps
    # its old token when the field is absent (Sync Gateway never sends it), so this adds to it.
    if isinstance(new_refresh, str) and new_refresh and new_refresh != refresh_token:
        body["refresh_token"] = new_refresh
    audit("refresh", user=user.name, provider=provider.name, db=db.name, reason="refresh token")
    cookie = _may_set_cookie(request, db)
    return await _session_answer(request, db, provider, user, tokens, body, cookie=cookie)


def _may_set_cookie(request: web.Request, db: Database) -> bool:
    """Security (login CSRF): a page of another site can send a browser to the refresh with
    the attacker's refresh token; the session cookie would sign the visitor in as the
    attacker. A cross-site request (`Sec-Fetch-Site`) gets its JSON answer without the cookie
    — unless it is a CORS request from an origin the database's CORS policy lets log in
    (`cors.origin` / `login_origin`), whose page reads the answer anyway."""
    if not is_cross_site(request.headers):
        return True
    values = request.headers.getall("Origin", ())
    origin = serialized_origin(values[0]) if len(values) == 1 else None
    return origin is not None and request.app[keys.CORS][db.name].allows(origin, login=True)


async def _grant(
    request: web.Request, provider: Provider, kind: str, grant_type: str, **params: str
) -> dict[str, Any]:
    metrics = request.app[keys.METRICS]
    meta = await provider.ensure_metadata()
    started = time.perf_counter()
    try:
        tokens = await token_request(
            request.app[keys.PROVIDER_HTTP], meta, provider.config, grant_type, **params
        )
    except ProviderError as exc:
        metrics.logins.labels(provider.name, kind, "failed").inc()
        log.info(
            "token request failed",
            extra={"provider": provider.name, "kind": kind, "why": exc.reason},
        )
        if kind == "refresh" and exc.status == 401:
            raise Unauthorized(f"Unable to refresh token: {exc.reason}") from None
        raise
    finally:
        metrics.provider_seconds.labels(provider.name, "token").observe(
            time.perf_counter() - started
        )
    metrics.logins.labels(provider.name, kind, "ok").inc()
    return tokens


async def _validate(
    request: web.Request, provider: Provider, id_token: str, *, nonce: str | None
) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = await provider.validate(
            id_token, nonce=nonce, leeway=request.app[keys.SETTINGS].clock_skew_seconds
        )
    except TokenError as exc:
        request.app[keys.METRICS].token_failure(exc.code)
        log.warning(
            "provider sent an ID token that failed validation",
            extra={"provider": provider.name, "reason": exc.code},
        )
        # Security: a reason may quote the token's own header (alg, typ, kid).
        reason = outside_text(exc.reason)
        raise Unauthorized(f"Invalid ID token from provider: {reason}") from None
    return claims


async def _session_answer(
    request: web.Request,
    db: Database,
    provider: Provider,
    user: User,
    tokens: dict[str, Any],
    body: dict[str, Any],
    *,
    cookie: bool = True,
) -> web.Response:
    """Sync Gateway's success body; a session and (when `cookie`) its cookie unless
    disable_session."""
    settings = request.app[keys.SETTINGS]
    session_id = None
    if not provider.config.disable_session:
        session_id, session = await request.app[keys.STORE].create_session(
            user, ttl=settings.session.ttl, provider=provider.name, now=time.time()
        )
        request.app[keys.METRICS].sessions_created.labels("oidc").inc()
        await logout.remember_login(request, db, provider, session_id, session, tokens["id_token"])
        body["session_id"] = session_id
    body["name"] = user.name
    if provider.config.include_access:
        for key in ("access_token", "token_type", "expires_in"):
            if key in tokens:
                body[key] = tokens[key]
    response = web.json_response(body, headers={"Cache-Control": "no-store"})
    if session_id is not None and cookie:
        set_session_cookie(request, response, db, session_id, session.expires)
    return response


NO_REFERRER = {"Referrer-Policy": "no-referrer"}


def no_referrer(handler: Handler) -> Handler:
    """`handler` whose every answer, refusals included, carries `Referrer-Policy: no-referrer`.

    Security: the callback's URL holds the code and state, the refresh URL a refresh token;
    a page or redirect reached from there must not send that URL on as a Referer."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except (SidecarError, web.HTTPException) as exc:  # answered by `observe` / aiohttp
            exc.headers.update(NO_REFERRER)
            raise
        response.headers.update(NO_REFERRER)
        return response

    return wrapped


def browser_callback(handler: Handler) -> Handler:
    """The callback as a person's browser meets it (API clients pass straight through): a
    reload or Back on a used callback while signed in goes where the first one went; an error
    page offers "Try again" — a new login, back to the same return target when known."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if not is_page_load(request.method, request.headers):
            return await handler(request)
        try:
            landed = request.query.get(LANDED)
            if landed is not None and "code" not in request.query:
                db, _ = _registry(request)
                return await landing(request, db, landed)  # did the session cookie stick?
            return await handler(request)
        except SidecarError as exc:
            name = request.get(keys.DB_NAME)
            if name is None:  # no such database: nowhere to try again
                raise
            db = request.app[keys.DATABASES].get(name)
            state = request.query.get("state")  # only a lookup key here; checked by handler
            if isinstance(exc, StateRejected) and state:
                again = await replayed_callback(request, db, _digest(state))
                if again is not None:
                    return again
            if isinstance(exc, StateRejected) and STATE_COOKIE not in request.cookies:
                exc.reason += f". {NO_STATE_COOKIE_HINT}"  # for a person; API clients: as is
            exc.retry = login_path(
                request.app[keys.SETTINGS].public_url,
                db.name,
                provider=request.query.get("provider"),
                rd=await _abandoned_target(request, db, state),
            )
            raise

    return wrapped


def without_referrer(defs: list[web.RouteDef]) -> list[web.RouteDef]:
    """Route definitions wrapped in `no_referrer` (the `_oidc*` and `_oidc_testing` routes)."""
    return [web.route(d.method, d.path, no_referrer(d.handler), **d.kwargs) for d in defs]


async def _abandoned_target(request: web.Request, db: Database, state: str | None) -> str | None:
    """The return target of the login this failed callback ends: known once the state was
    taken; after a provider error (Cancel) taken here, for the browser that started it."""
    target = request.get(keys.RETURN_TARGET)
    if target is not None or not state or "error" not in request.query:
        return target
    if not holds_state(request.cookies.get(STATE_COOKIE), state):
        return None  # security: a return target only for the browser that started the login
    record = await request.app[keys.STORE].take_record("login", _digest(state))
    if record is None or record.get("db") != db.name or not isinstance(record.get("rd"), str):
        return None
    rd: str = record["rd"]
    return rd


def routes() -> list[web.RouteDef]:
    return without_referrer(
        [
            web.get("/{db}/_oidc", oidc),
            web.get("/{db}/_oidc_challenge", oidc_challenge),
            web.get("/{db}/_oidc_callback", browser_callback(oidc_callback)),
            web.get("/{db}/_oidc_refresh", oidc_refresh),
            *logout.routes(),  # /{db}/_oidc_logout, _oidc_backchannel_logout
        ]
    )
