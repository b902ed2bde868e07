"""The sidecar's error hierarchy; one middleware turns each into `{"error", "reason"}` JSON
(or, for a person's browser, a small HTML page with the same status and reason).

SidecarError (500)
├── BadRequest (400)              malformed input, failed callback checks
├── Unauthorized (401)            no or invalid credentials; upstream never contacted
├── Forbidden (403)
├── NotFound (404)                unknown database, no session
├── MethodNotAllowed (405)
├── PayloadTooLarge (413)
├── TooManyRequests (429)         login starts over the rate limit (Retry-After)
├── HeaderFieldsTooLarge (431)    the request's header section as a whole is too large
├── Unimplemented (501)           a transfer coding the sidecar does not implement
├── UpstreamError (502)           upstream refused / broke the connection
│   └── ProviderError (502)       OpenID Provider unreachable or answered nonsense
│       └── OAuthError (502/401)  the provider answered an OAuth error (wire code kept)
├── ServiceUnavailable (503)      session store or provider not ready
└── GatewayTimeout (504)          upstream did not answer in time
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar


class SidecarError(Exception):
    """Base: knows its HTTP status and a reason safe to show the caller."""

    status: ClassVar[int] = 500

    def __init__(
        self, reason: str, *, headers: dict[str, str] | None = None, retry: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = headers or {}
        self.retry = retry  # where a person may try again (a link on the HTML error page)

    @property
    def error(self) -> str:
        return HTTPStatus(self.status).phrase

    def body(self) -> dict[str, str]:
        return {"error": self.error, "reason": self.reason}


class BadRequest(SidecarError):
    status = 400


class Unauthorized(SidecarError):
    status = 401


class Forbidden(SidecarError):
    status = 403


class NotFound(SidecarError):
    status = 404


class MethodNotAllowed(SidecarError):
    status = 405


class PayloadTooLarge(SidecarError):
    status = 413


class TooManyRequests(SidecarError):
    status = 429


class HeaderFieldsTooLarge(SidecarError):
    status = 431


class Unimplemented(SidecarError):
    """RFC 9112 6.1: a request with a transfer coding the sidecar does not understand."""

    status = 501


class UpstreamError(SidecarError):
    status = 502


class ProviderError(UpstreamError):
    """The OpenID Provider could not be reached or answered something unusable."""


class OAuthError(ProviderError):
    """The provider answered an OAuth error; `code` keeps the wire value (`invalid_grant`, ...).

    `invalid_grant` means the code or refresh token is no good: the caller's fault (401);
    anything else is the provider's or our configuration's problem (502).
    """

    FATAL_FOR_CALLER: ClassVar[frozenset[str]] = frozenset({"invalid_grant", "access_denied"})

    def __init__(self, code: str, description: str = "") -> None:
        self.code = code
        self.description = description
        super().__init__(f"provider answered {code}" + (f": {description}" if description else ""))

    @property
    def status(self) -> int:  # type: ignore[override]
        return 401 if self.code in self.FATAL_FOR_CALLER else 502

    @property
    def error(self) -> str:
        return HTTPStatus(self.status).phrase


class ServiceUnavailable(SidecarError):
    status = 503


class GatewayTimeout(SidecarError):
    status = 504


# Security: what a provider or a client wrote (an error_description, a user name, a token's
# alg) is quoted in a reason only as plain text: printable ASCII (RFC 6749 5.2 already limits
# error_description to it) without the characters HTML or a quoted string read as syntax.
_MARKUP = frozenset("<>&\"'\\`")
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - _MARKUP


def outside_text(value: str, limit: int = 200) -> str:
    """`value` fit to quote in a reason: characters outside `_PLAIN` (markup, quotes, control
    characters such as CR LF, non-ASCII) dropped, at most `limit` characters kept."""
    kept = "".join(c for c in value if c in _PLAIN).strip()
    return kept if len(kept) <= limit else kept[:limit] + "..."
