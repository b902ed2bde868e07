"""Who may call the admin listener: HTTP Basic (RFC 7617) and/or a bearer secret (RFC 6750),
compared in constant time. The credential is never logged nor echoed in a reason."""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import unicodedata
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from sidecar.config import AdminAuthConfig, Settings
from sidecar.errors import Unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REALM = "sidecar admin"


def _bytes(text: str) -> bytes:
    # NFC, as RFC 7613's profiles prepare a user-id and password; surrogateescape because
    # aiohttp hands undecodable header bytes over as lone surrogates.
    return unicodedata.normalize("NFC", text).encode("utf-8", "surrogateescape")


class AdminAuth:
    """The admin listener's credentials check, built once from `admin_auth`."""

    def __init__(self, config: AdminAuthConfig) -> None:
        self._basic = (
            (_bytes(config.username), _bytes(config.password.get()))
            if config.username is not None and config.password is not None
            else None
        )
        self._bearer = _bytes(config.bearer_token.get()) if config.bearer_token else None
        self.open_paths = frozenset(config.open_paths)
        schemes = (["Basic"] if self._basic else []) + (["Bearer"] if self._bearer else [])
        self._schemes = {s.lower(): s for s in schemes}
        self._challenge = {"WWW-Authenticate": ", ".join(f'{s} realm="{REALM}"' for s in schemes)}

    def _refuse(self, reason: str) -> Unauthorized:
        return Unauthorized(f"admin API: {reason}", headers=dict(self._challenge))

    def check(self, authorization: list[str]) -> None:
        """Returns when the Authorization header values hold valid credentials; else raises
        Unauthorized (401 with the challenge). Reasons name the problem, never the values."""
        if not authorization:
            raise self._refuse("credentials required")
        if len(authorization) > 1:
            raise self._refuse("more than one Authorization header")
        scheme, _, credentials = authorization[0].strip().partition(" ")
        credentials = credentials.strip()
        known = self._schemes.get(scheme.lower())
        if known is None:
            raise self._refuse(f"use {' or '.join(self._schemes.values())} credentials")
        if known == "Basic":
            ok = self._check_basic(credentials)
        else:
            assert self._bearer is not None
            ok = hmac.compare_digest(_bytes(credentials), self._bearer)
        if not ok:
            raise self._refuse("invalid credentials")

    def _check_basic(self, credentials: str) -> bool:
        assert self._basic is not None
        try:
            raw = base64.b64decode(credentials, validate=True)
            decoded = raw.decode("utf-8")
        except ValueError:  # not base64 (binascii.Error), non-ASCII, or not UTF-8 inside
            raise self._refuse("malformed Basic credentials") from None
        user, colon, password = decoded.partition(":")
        # Only the canonical encoding (RFC 4648 3.5): no excess padding, no stray bits.
        if not colon or base64.b64encode(raw).decode("ascii") != credentials:
            raise self._refuse("malformed Basic credentials")
        # Security: both comparisons run whatever the first gives (no early exit on the user).
        user_ok = hmac.compare_digest(_bytes(user), self._basic[0])
        password_ok = hmac.compare_digest(_bytes(password), self._basic[1])
        return user_ok & password_ok

    def guard(self, handler: Handler) -> Handler:
        """`handler` behind the check."""

        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            self.check(request.headers.getall(hdrs.AUTHORIZATION, []))
            return await handler(request)

        return guarded

    def guard_routes(self, defs: list[web.RouteDef]) -> list[web.RouteDef]:
        """Every route behind the check but the open paths (the catch-all 404 too, so an
        unauthenticated caller cannot tell which paths exist)."""
        return [
            d
            if d.path in self.open_paths
            else web.route(d.method, d.path, self.guard(d.handler), **d.kwargs)
            for d in defs
        ]


def is_loopback(listen: str) -> bool:
    """Whether `host:port` listens on loopback only (`:port` is every interface; a host name
    may resolve anywhere, so only `localhost` and loopback addresses count)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(settings: Settings) -> str | None:
    """The warning `check-config` and `run` give for an admin API anyone on the network can use."""
    if settings.admin_auth is not None or is_loopback(settings.admin_interface):
        return None
    return (
        f"admin_interface {settings.admin_interface} is not loopback and admin_auth is not set: "
        "anyone who reaches that port can create sessions for any user"
    )
