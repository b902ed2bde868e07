"""The sidecar's own fetches of the built-in test provider's discovery and JWKS documents, told
apart from user requests so the access log does not show them every minute as if users made them.

The mark is a header holding a random per-process secret, sent only to `_oidc_testing` URLs and
honoured only by those two documents' routes: a client cannot forge it, and even a holder of it
could hide nothing but fetches of two public documents.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from aiohttp import web

HEADER = "X-Sidecar-Self-Fetch"
_TOKEN = secrets.token_urlsafe(24)


def headers_for(url: str) -> dict[str, str]:
    """The mark for a fetch of the built-in test provider; nothing for any other provider."""
    return {HEADER: _TOKEN} if "/_oidc_testing/" in urlsplit(url).path else {}


def is_self_fetch(request: web.Request) -> bool:
    given = request.headers.get(HEADER)
    return given is not None and hmac.compare_digest(given.encode(), _TOKEN.encode())
