"""Who may call the admin listener: HTTP Basic (RFC 7617) and/or a bearer secret (RFC 6750),
compared in constant time. The credential is never logged nor echoed in a reason.

And no web page may: a page open in a developer's browser can reach a loopback admin API by
a cross-site request or through DNS rebinding (its own name resolving to 127.0.0.1).
`AdminGuard` refuses (403) every admin request that carries `Origin` (browsers send it on
cross-site and script requests; probes, Prometheus, curl and SDKs never do), and, when the
admin API listens on loopback without `admin_auth`, every request whose Host is not a
loopback name or address or the admin interface's own host. The Host rule is off otherwise:
in Kubernetes, probes and Prometheus address the pod by IP."""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import unicodedata
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from sidecar.config import AdminAuthConfig, Settings
from sidecar.errors import Forbidden, Unauthorized

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
    return is_loopback_host(listen.rpartition(":")[0].strip("[]"))


def exposure_warning(settings: Settings) -> str | None:
    """The warning `check-config` and `run` give for an admin API anyone on the network can use."""
    if settings.admin_auth is not None or is_loopback(settings.admin_interface):
        return None
    return (
        f"admin_interface {settings.admin_interface} is not loopback and admin_auth is not set: "
        "anyone who reaches that port can create sessions for any user"
    )


def _host_name(value: str) -> str | None:
    """The host part of a Host header value, lowercase (`[::1]:4985` -> `::1`)."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        return host if bracket and (not rest or rest[1:].isdigit() and rest[0] == ":") else None
    host, colon, port = value.rpartition(":")
    if not colon:
        host = value
    elif not port.isdigit():
        return None
    return host.lower() or None


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminGuard:
    """The admin listener's single guard: the browser rules (see the module docstring), then
    `admin_auth`'s credentials when configured (its open paths excepted)."""

    def __init__(self, settings: Settings) -> None:
        self.auth = AdminAuth(settings.admin_auth) if settings.admin_auth is not None else None
        self.check_host = settings.admin_auth is None and is_loopback(settings.admin_interface)
        own = _host_name(settings.admin_interface)
        self._own_host = own.strip("[]") if own else None

    def check_browser(self, request: web.Request) -> None:
        """Raises Forbidden for a request a web page could have made (Origin, foreign Host)."""
        if hdrs.ORIGIN in request.headers:
            raise Forbidden(
                "admin API: requests from web pages (with an Origin header) are refused"
            )
        if not self.check_host:
            return
        hosts = request.headers.getall(hdrs.HOST, [])
        host = _host_name(hosts[0]) if len(hosts) == 1 else None
        if host is None or not (is_loopback_host(host) or host == self._own_host):
            raise Forbidden("admin API: Host must name this machine (localhost or 127.0.0.1)")

    def guard_routes(self, defs: list[web.RouteDef]) -> list[web.RouteDef]:
        if self.auth is not None:
            defs = self.auth.guard_routes(defs)
        return [web.route(d.method, d.path, self._guard(d.handler), **d.kwargs) for d in defs]

    def _guard(self, handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            self.check_browser(request)
            return await handler(request)

        return guarded
