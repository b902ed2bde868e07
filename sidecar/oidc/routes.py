"""Sync Gateway's login endpoints: `/{db}/_oidc`, `_oidc_challenge`, `_oidc_callback`, `_refresh`.

Safer than the original without breaking its clients: state is single-use and bound to the
browser by a cookie, every request carries a nonce and a PKCE S256 challenge.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web
from yarl import URL

from sidecar import keys
from sidecar.auth import login_user
from sidecar.databases import Database
from sidecar.errors import BadRequest, NotFound, ProviderError, Unauthorized
from sidecar.observability import audit
from sidecar.oidc import logout
from sidecar.oidc.client import LoginRequest, authorization_url, new_login, token_request
from sidecar.oidc.provider import Provider, ProviderRegistry
from sidecar.oidc.tokens import TokenError
from sidecar.sessions.cookies import secure_cookies, set_session_cookie
from sidecar.sessions.models import User

log = logging.getLogger("sidecar.oidc")

STATE_COOKIE = "sg-oidc-state"
STATE_TTL = 300  # seconds a login may take, as Sync Gateway's state cookie
REFRESH_BINDING_TTL = 90 * 86400
MAX_PARAM = 4096


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
    """The configured callback_url, else `{public_url or scheme://host}/{db}/_oidc_callback`.

    `?provider=` is added for a non-default provider so the callback knows whose code it is.
    """
    if provider.config.callback_url:
        return provider.config.callback_url
    public_url = request.app[keys.SETTINGS].public_url
    base = public_url.rstrip("/") if public_url else f"{request.scheme}://{request.host}"
    url = URL(f"{base}/{db.name}/_oidc_callback")
    if provider.name != default:
        url = url.with_query(provider=provider.name)
    return str(url)


async def _start_login(request: web.Request) -> tuple[str, Database]:
    db, registry = _registry(request)
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
    await store.put_record(
        "login", _digest(login.state), asdict(login) | {"db": db.name}, STATE_TTL
    )
    return url, db


def _set_state_cookie(
    request: web.Request, response: web.StreamResponse, db: Database, state: str
) -> None:
    response.set_cookie(
        STATE_COOKIE,
        state,
        max_age=STATE_TTL,
        path=f"/{db.name}",
        httponly=True,
        secure=secure_cookies(request),
        samesite="Lax",  # the provider's redirect back is a top-level GET navigation
    )


def _state_of(url: str) -> str:
    return URL(url).query["state"]


async def oidc(request: web.Request) -> web.StreamResponse:
    url, db = await _start_login(request)
    response = web.Response(status=302, headers={"Location": url})
    _set_state_cookie(request, response, db, _state_of(url))
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
    _set_state_cookie(request, response, db, _state_of(url))
    return response


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _clean(text: str, limit: int = 200) -> str:
    """Provider-sent text echoed in a reason: printable characters only, bounded."""
    return "".join(c for c in text[:limit] if c.isprintable())


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    db, registry = _registry(request)
    # Sync Gateway's order of checks: error, code, provider, state.
    error = _param(request, "error")
    if error is not None:
        description = _param(request, "error_description") or error
        request.app[keys.METRICS].logins.labels(
            _param(request, "provider") or "-", "login", "provider_error"
        ).inc()
        raise Unauthorized(f"oidc callback received an error: {_clean(description)}")
    code = _param(request, "code")
    if not code:
        raise BadRequest("Code must be present on oidc callback")
    try:
        provider = _provider(registry, _param(request, "provider"))
    except BadRequest:
        raise BadRequest("Unable to identify provider for callback request") from None
    state = _param(request, "state")
    if not provider.config.disable_callback_state:
        cookie = request.cookies.get(STATE_COOKIE)
        if cookie is None:
            raise BadRequest("OIDC Auth Failure: No state cookie found for callback")
        # Security: the state must come back to the browser that started the login.
        if state is None or not hmac.compare_digest(cookie.encode(), state.encode()):
            raise BadRequest("OIDC Auth Failure: State mismatch")
    if not state:
        raise BadRequest("OIDC Auth Failure: State mismatch")
    store = request.app[keys.STORE]
    record = await store.take_record("login", _digest(state))  # single use, on every replica
    if record is None or record.get("db") != db.name or record.get("provider") != provider.name:
        raise BadRequest("OIDC Auth Failure: State expired or already used")
    login = LoginRequest(**{k: v for k, v in record.items() if k != "db"})

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
    response.del_cookie(STATE_COOKIE, path=f"/{db.name}")
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
    tokens = await _grant(
        request, provider, "refresh", "refresh_token", refresh_token=refresh_token
    )
    claims = await _validate(request, provider, tokens["id_token"], nonce=None)
    # OIDC Core 12.2: a refreshed ID token keeps the original iss and sub.
    if claims["iss"] != binding["iss"] or claims["sub"] != binding["sub"]:
        request.app[keys.METRICS].logins.labels(provider.name, "refresh", "subject_changed").inc()
        raise Unauthorized("Unable to refresh token: the provider changed the token's subject")
    new_refresh = tokens.get("refresh_token")
    if isinstance(new_refresh, str) and new_refresh and new_refresh != refresh_token:
        await store.put_record("refresh", _digest(new_refresh), binding, REFRESH_BINDING_TTL)
    user = await login_user(store, db, provider.name, provider.config, claims)
    audit("refresh", user=user.name, provider=provider.name, db=db.name, reason="refresh token")
    return await _session_answer(
        request, db, provider, user, tokens, {"id_token": tokens["id_token"]}
    )


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
        raise Unauthorized(f"Invalid ID token from provider: {exc.reason}") from None
    return claims


async def _session_answer(
    request: web.Request,
    db: Database,
    provider: Provider,
    user: User,
    tokens: dict[str, Any],
    body: dict[str, Any],
) -> web.Response:
    """Sync Gateway's success body; a session and its cookie unless disable_session."""
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
    if session_id is not None:
        set_session_cookie(request, response, db, session_id, session.expires)
    return response


def routes() -> list[web.RouteDef]:
    return [
        web.get("/{db}/_oidc", oidc),
        web.get("/{db}/_oidc_challenge", oidc_challenge),
        web.get("/{db}/_oidc_callback", oidc_callback),
        web.get("/{db}/_oidc_refresh", oidc_refresh),
        *logout.routes(),  # /{db}/_oidc_logout, _oidc_backchannel_logout
    ]
