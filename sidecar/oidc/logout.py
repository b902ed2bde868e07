"""Browser sign-out at `/{db}/_oidc_logout`: a confirmation page, then a CSRF-checked POST that
ends the session on every replica and continues with OpenID Connect RP-Initiated Logout 1.0."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from yarl import URL

from sidecar import keys
from sidecar.auth import session_cookie
from sidecar.browser import logout_csrf_ok, logout_csrf_token, parse_origin, safe_return_target
from sidecar.databases import Database
from sidecar.errors import BadRequest, Forbidden, ProviderError
from sidecar.observability import audit
from sidecar.oidc.provider import Provider
from sidecar.oidc.tokens import peek_claims
from sidecar.pages import esc, page, redirect, sign_out_form
from sidecar.sessions.cookies import expire_session_cookie
from sidecar.sessions.models import Session, hash_session_id, is_well_formed_session_id
from sidecar.sessions.origin import own_origins, public_base

log = logging.getLogger("sidecar.oidc")

LOGOUT_STATE_TTL = 600  # seconds the provider's logout may take before /done forgets `rd`
SID_LINK_TTL = 30 * 86400  # sid -> sessions links outlive extended sessions (64 bytes each)


def sid_group(db: str, provider: str, sid: str) -> str:
    """The store key grouping a database's sessions made under one provider session (`sid`)."""
    return hashlib.sha256(json.dumps([db, provider, sid]).encode()).hexdigest()


def _hint_key(session_id: str) -> bytes:
    return hashlib.sha256(b"id-token-hint:" + session_id.encode()).digest()


def seal_hint(session_id: str, id_token: str) -> str:
    """The ID token encrypted (AES-256-GCM) under a key derived from the session id.

    Security: an ID token is a bearer credential here until it expires; the store never holds
    the session id, so a dump of the store yields neither (as sessions are stored by hash)."""
    nonce = secrets.token_bytes(12)
    sealed = nonce + AESGCM(_hint_key(session_id)).encrypt(nonce, id_token.encode(), None)
    return base64.urlsafe_b64encode(sealed).decode("ascii")


def open_hint(session_id: str, sealed: object) -> str | None:
    if not isinstance(sealed, str):
        return None
    try:
        raw = base64.urlsafe_b64decode(sealed)
        return AESGCM(_hint_key(session_id)).decrypt(raw[:12], raw[12:], None).decode()
    except (ValueError, InvalidTag):  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None


async def remember_login(
    request: web.Request,
    db: Database,
    provider: Provider,
    session_id: str,
    session: Session,
    id_token: str,
) -> None:
    """At login and refresh: what logout needs later. The provider's `sid` links the session
    for back-channel logout; the ID token (for `id_token_hint`) is sealed into a record of its
    own, so the session record read on every request stays small."""
    claims = peek_claims(id_token)  # validated by the caller a moment ago
    store = request.app[keys.STORE]
    sid = claims.get("sid")
    if isinstance(sid, str) and sid:
        await store.link_sessions(
            "sid", sid_group(db.name, provider.name, sid), session.key, SID_LINK_TTL
        )
    hint = seal_hint(session_id, id_token)
    await store.put_record("logout", session.key, {"id_token_hint": hint}, session.ttl)


# --- pages -------------------------------------------------------------------------------------


def signed_out_page(rd: str | None) -> web.Response:
    onward = f'<p><a href="{esc(rd)}">Continue</a></p>' if rd else ""
    return page("Signed out", f"<h1>Signed out</h1><p>You are signed out.</p>{onward}")


def confirm_page(
    db: Database, name: str, csrf: str, rd: str | None, end_session: str | None
) -> web.Response:
    """The confirmation. Its CSP's form-action (which browsers apply to the redirects after
    the POST too) also allows where the POST may send the browser on: the provider's
    end_session_endpoint, an allow-listed absolute `rd`."""
    body = (
        f"<h1>Sign out?</h1><p>Signed in to {esc(db.name)} as <strong>{esc(name)}</strong>.</p>"
        + sign_out_form("_oidc_logout", csrf, rd=rd)
    )
    onward = [u for u in (end_session, rd) if u and not u.startswith("/")]
    return page("Sign out?", body, form_targets=[str(URL(u).origin()) for u in onward])


# --- the endpoints -----------------------------------------------------------------------------


def _database(request: web.Request) -> Database:
    db = request.app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    return db


def _return_target(db: Database, raw: str | None) -> str | None:
    """`rd` under the sign-in rule (sidecar.browser.safe_return_target), else None."""
    return safe_return_target(raw, db.config.allowed_redirect_origins)


def _single(values: list[str], name: str) -> str | None:
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    return values[0] if values else None


async def _session_of(request: web.Request, db: Database, session_id: str | None) -> Session | None:
    if session_id is None or not is_well_formed_session_id(session_id):
        return None
    store = request.app[keys.STORE]
    return await store.get_session_by_key(db.name, hash_session_id(session_id), time.time())


def _provider_of(db: Database, session: Session | None) -> Provider | None:
    if session is None or session.provider is None or db.providers is None:
        return None
    try:
        return db.providers.get(session.provider)
    except BadRequest:  # the provider left the configuration since the login
        return None


async def _end_session_endpoint(provider: Provider | None) -> str | None:
    if provider is None:
        return None
    try:
        return (await provider.ensure_metadata()).end_session_endpoint
    except ProviderError as exc:
        # The local sign-out has happened; only the provider's part is skipped.
        log.warning(
            "provider unavailable for RP-initiated logout",
            extra={"provider": provider.name, "why": exc.reason},
        )
        return None


async def logout_page(request: web.Request) -> web.StreamResponse:
    """GET: the confirmation page (never signs out by itself: a GET can be forged by any page)."""
    db = _database(request)
    rd = _return_target(db, _single(request.query.getall("rd", []), "rd"))
    session_id = session_cookie(request, db.cookie_name)
    session = await _session_of(request, db, session_id)
    if session is None or session_id is None:
        response = signed_out_page(rd)
        if session_id is not None:
            expire_session_cookie(request, response, db)
        return response
    endpoint = await _end_session_endpoint(_provider_of(db, session))
    return confirm_page(db, session.name, logout_csrf_token(session_id), rd, endpoint)


def _cross_origin(request: web.Request) -> bool:
    """Security: a POST another site's page made. Fetch Metadata decides first: a browser's
    `Sec-Fetch-Site` other than `same-origin`/`none` is refused. Then an `Origin` must be
    exactly one of the sidecar's own (`sessions.origin.own_origins`: `public_url`'s, or the
    one the client addressed, through a trusted proxy as it reports it) — except `null` when
    the browser vouched `same-origin`: our pages are `Referrer-Policy: no-referrer`, under
    which browsers send `Origin: null` with their own forms' POSTs (Fetch, "serializing a
    request origin"). Without Fetch Metadata, `null` is refused (sandboxed frames send it)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site not in (None, "same-origin", "none"):
        return True
    values = request.headers.getall("Origin", ())
    if not values:
        return False
    if len(values) == 1 and values[0] == "null" and fetch_site == "same-origin":
        return False
    origin = parse_origin(values[0]) if len(values) == 1 else None
    return origin is None or origin not in own_origins(request)


async def logout(request: web.Request) -> web.StreamResponse:
    """POST: end the session everywhere, expire the cookie, then the provider's logout."""
    db = _database(request)
    if _cross_origin(request):  # a page for browsers (is_page_load), JSON else: see observe
        raise Forbidden("cross-origin sign-out refused")
    try:
        form = await request.post()
    except ValueError:
        raise BadRequest("unreadable form body") from None
    csrf = _single([v for v in form.getall("csrf", []) if isinstance(v, str)], "csrf")
    rd_values = [v for v in form.getall("rd", []) if isinstance(v, str)]
    rd = _return_target(db, _single(rd_values, "rd"))
    session_id = session_cookie(request, db.cookie_name)
    if session_id is None:  # nothing to protect: already signed out (idempotent)
        return redirect(rd) if rd is not None else signed_out_page(None)
    # Security: the token is bound to this browser's session cookie; constant-time compare.
    if csrf is None or not logout_csrf_ok(session_id, csrf):
        raise Forbidden("missing or wrong CSRF token")

    store = request.app[keys.STORE]
    session = await _session_of(request, db, session_id)
    if session is not None:
        await store.delete_session_by_key(db.name, session.key)  # every replica, with streams
        audit("logout", user=session.name, provider=session.provider, db=db.name, reason="user")
    remembered = await store.take_record("logout", session.key) if session else None
    hint = open_hint(session_id, remembered.get("id_token_hint")) if remembered else None
    provider = _provider_of(db, session)
    endpoint = await _end_session_endpoint(provider)
    if provider is not None and endpoint is not None:
        response: web.StreamResponse = await _rp_initiated(
            request, db, provider, endpoint, hint, rd
        )
    elif rd is not None:
        response = redirect(rd)
    else:
        response = signed_out_page(None)
    expire_session_cookie(request, response, db)
    return response


async def _rp_initiated(
    request: web.Request,
    db: Database,
    provider: Provider,
    endpoint: str,
    id_token_hint: str | None,
    rd: str | None,
) -> web.StreamResponse:
    """RP-Initiated Logout 1.0 section 2: redirect to end_session_endpoint with id_token_hint,
    client_id, post_logout_redirect_uri and state (its own query, if any, is kept)."""
    state = secrets.token_urlsafe(24)
    store = request.app[keys.STORE]
    await store.put_record(
        "logout_state", _digest(state), {"db": db.name, "rd": rd}, LOGOUT_STATE_TTL
    )
    params = {
        "client_id": provider.config.client_id,
        "post_logout_redirect_uri": provider.config.post_logout_redirect_uri
        or f"{public_base(request)}/{db.name}/_oidc_logout/done",  # config-checked: see config
        "state": state,
    }
    if id_token_hint:
        params["id_token_hint"] = id_token_hint
    return redirect(str(URL(endpoint).update_query(params)))


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def logout_done(request: web.Request) -> web.StreamResponse:
    """Where the provider sends the browser back: on to the `rd` kept with the state, or the
    signed-out page. The state is single-use; an unknown one simply shows the page."""
    db = _database(request)
    state = _single(request.query.getall("state", []), "state")
    record = None
    if state and len(state) <= 256:
        record = await request.app[keys.STORE].take_record("logout_state", _digest(state))
    rd = record.get("rd") if record and record.get("db") == db.name else None
    target = _return_target(db, rd if isinstance(rd, str) else None)
    return redirect(target) if target is not None else signed_out_page(None)


def routes() -> list[web.RouteDef]:
    from sidecar.oidc.backchannel import backchannel_logout

    return [
        web.get("/{db}/_oidc_logout", logout_page),
        web.post("/{db}/_oidc_logout", logout),
        web.get("/{db}/_oidc_logout/done", logout_done),
        web.post("/{db}/_oidc_backchannel_logout", backchannel_logout),
    ]
