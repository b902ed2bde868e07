"""OpenID Connect Back-Channel Logout 1.0 at `POST /{db}/_oidc_backchannel_logout`: the provider
posts a signed logout token; every session it names ends on every replica, with its streams."""

from __future__ import annotations

import hashlib
import json
import logging

from aiohttp import web

from sidecar import keys
from sidecar.errors import BadRequest, NotFound
from sidecar.observability import audit
from sidecar.oidc.logout import sid_group
from sidecar.oidc.tokens import LOGOUT_TOKEN_MAX_AGE, TokenError
from sidecar.users import UsernameError, username_from_claims

log = logging.getLogger("sidecar.oidc")

FORM = "application/x-www-form-urlencoded"


class _Invalid(Exception):
    """Back-Channel Logout 2.8: the RP answers 400, with an OAuth-style JSON error."""


def _error(description: str) -> web.Response:
    return web.json_response(
        {"error": "invalid_request", "error_description": description, "reason": description},
        status=400,
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


async def _logout_token(request: web.Request) -> str:
    """Exactly one `logout_token` in a form-encoded body (2.5)."""
    if request.content_type != FORM:
        raise _Invalid(f"the body must be {FORM}")
    try:
        form = await request.post()
    except ValueError:
        raise _Invalid("unreadable form body") from None
    values = form.getall("logout_token", [])
    if len(values) != 1 or not isinstance(values[0], str) or not values[0]:
        raise _Invalid("exactly one logout_token is required")
    return values[0]


async def backchannel_logout(request: web.Request) -> web.StreamResponse:
    db = request.app[keys.DATABASES].get(request.match_info["db"])
    request[keys.DB_NAME] = db.name
    if db.providers is None:
        raise NotFound(f"OpenID Connect is not configured for database {db.name!r}")
    names = request.query.getall("provider", [])
    store = request.app[keys.STORE]
    leeway = request.app[keys.SETTINGS].clock_skew_seconds
    try:
        if len(names) > 1:
            raise _Invalid("provider given more than once")
        try:
            provider = db.providers.get(names[0] if names else None)
        except BadRequest:
            raise _Invalid("unknown provider") from None
        token = await _logout_token(request)
        try:
            claims = await provider.validate_logout_token(token, leeway=leeway)
        except TokenError as exc:
            request.app[keys.METRICS].token_failure(f"logout_{exc.code}")
            log.info(
                "logout token rejected",
                extra={"provider": provider.name, "db": db.name, "reason": exc.code},
            )
            raise _Invalid(f"invalid logout token: {exc.reason}") from None
        # Security (2.6 step 8 / 2.4): a jti is accepted once, on every replica; a replay
        # could otherwise end sessions made after the logout it belonged to.
        jti_key = hashlib.sha256(json.dumps([claims["iss"], claims["jti"]]).encode()).hexdigest()
        if not await store.add_record_once(
            "logout_jti", jti_key, {}, LOGOUT_TOKEN_MAX_AGE + 2 * leeway + 60
        ):
            raise _Invalid("logout token already used (jti replayed)")
        sid, sub = claims.get("sid"), claims.get("sub")
        if isinstance(sid, str):
            # 2.7: with a sid, the sessions made under that provider session.
            sessions = await store.end_linked_sessions(
                db.name, "sid", sid_group(db.name, provider.name, sid)
            )
            ended, name = len(sessions), ",".join(sorted({s.name for s in sessions})) or None
        else:
            # 2.7: with only a sub, every session of that user (the login's username rules).
            try:
                name = username_from_claims(
                    {"iss": claims["iss"], "sub": sub},
                    issuer=provider.config.issuer,
                    user_prefix=provider.config.user_prefix,
                    username_claim=provider.config.username_claim,
                )
            except UsernameError:
                raise _Invalid(
                    "a logout token without sid cannot name a user when username_claim is set"
                ) from None
            ended = await store.delete_user_sessions(db.name, name)
    except _Invalid as exc:
        return _error(str(exc))
    audit(
        "backchannel_logout",
        user=name,
        provider=provider.name,
        db=db.name,
        reason="provider logout (sid)" if isinstance(sid, str) else "provider logout (sub)",
        sessions=ended,
    )
    return web.Response(status=200, headers={"Cache-Control": "no-store"})
