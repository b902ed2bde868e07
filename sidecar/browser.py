"""People in browsers: is this request a top-level page load, is a return target safe to
redirect to, and the sign-out form's CSRF token. Pure decisions, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

from yarl import URL

MAX_RETURN_TARGET = 1024  # bounds the login state anyone can make the store hold
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# RFC 7231 5.3.1: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)")
# A host name or IPv4 dotted quad as an allow-listed origin may name it: LDH labels only.
_HOST = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_DECODE_ROUNDS = 4  # a target is also checked as it reads after this many percent-decodings


# ---------------------------------------------------------------- is it a page load?


def accepts_html(accept: str) -> bool:
    """Whether an Accept header prefers HTML: text/html (or XHTML) is named with q > 0 and
    no other type is named with a higher q. `*/*` alone (curl, fetch, every HTTP library)
    is not a browser, nor is `text/*`: only an explicit HTML type counts."""
    best_html = 0.0
    best_other = 0.0
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                if not _QVALUE.fullmatch(value):
                    return False  # malformed: not a browser's header, no guessing
                q = float(value)
        media = media.lower()
        if media in _HTML_TYPES:
            best_html = max(best_html, q)
        elif media and media != "*/*":
            best_other = max(best_other, q)
    return best_html > 0 and best_html >= best_other


def is_page_load(method: str, headers: Mapping[str, str]) -> bool:
    """A person's browser loading a page (top-level navigation), not a script or an app.

    `Sec-Fetch-Mode` decides when present (every current browser sends it): only `navigate`.
    Without it (older browsers), a GET or HEAD whose Accept prefers HTML. `fetch()`/XHR send
    `cors`/`no-cors`/`same-origin`; Couchbase Lite, PouchDB in Node and curl send neither."""
    mode = headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode.strip().lower() == "navigate"
    if method not in ("GET", "HEAD"):
        return False
    if headers.get("X-Requested-With") is not None:  # jQuery and friends: a script
        return False
    return accepts_html(headers.get("Accept", ""))


def is_cross_site(headers: Mapping[str, str]) -> bool:
    """Whether the browser says a page of another site caused this request
    (`Sec-Fetch-Site: cross-site`; `same-site`, `same-origin`, `none` or no header: not)."""
    return headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site"


def may_redirect_to_login(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request that failed authentication may be answered with a redirect to the
    login instead of a 401: a page load by GET/HEAD (a form POST would lose its body) that
    carried no Authorization header (a bad bearer token is an API client's mistake)."""
    return (
        method in ("GET", "HEAD")
        and headers.get("Authorization") is None
        and is_page_load(method, headers)
    )


# ---------------------------------------------------------------- return targets


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _decodings(raw: str) -> Iterable[str]:
    """`raw` and what it reads as after each percent-decoding, until nothing changes: a
    target is judged by every reading a browser, proxy or later decoder might give it."""
    seen = raw
    yield seen
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote(seen, errors="surrogateescape")
        if decoded == seen:
            return
        seen = decoded
        yield seen


def _safe_path_reading(text: str) -> bool:
    """One reading of a same-origin target: `/` then a first segment that no browser or
    proxy could take for a host (not `/`, `\\`, no `@`, not starting with `.`, visible ASCII
    only), no control characters or backslashes anywhere, no dot segments."""
    if not text.startswith("/") or text.startswith(("//", "/\\")):
        return False
    if "\\" in text or _has_control(text):
        return False
    path = re.split(r"[?#]", text, maxsplit=1)[0]
    segments = path.split("/")[1:]
    first = segments[0]
    if "@" in first or first.startswith(".") or not all("\x21" <= c <= "\x7e" for c in first):
        return False
    return not any(segment in (".", "..") for segment in segments)


Origin = tuple[str, str, int | None]  # scheme, host (lowercase), port (default filled in)

# RFC 6454 6.2 (serialized origin): scheme "://" host [":" port]; an IPv6 literal in brackets.
_ORIGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
# A DNS name (LDH labels, `_` tolerated as in service names) or IPv4 dotted quad.
_ORIGIN_HOST = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
_DEFAULT_ORIGIN_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parse_origin(text: str) -> Origin | None:
    """`text` as an origin, normalised (scheme and host lowercased, default port filled in),
    or None when it is not exactly one serialized origin: `scheme://host[:port]`, a DNS name,
    IPv4 or bracketed IPv6 host, port 1-65535; no trailing `/`, user, path, query, fragment,
    spaces or `null`. The one parser of origins, for the Origin header and every configured
    origin list alike (`cors.origin`, `allowed_redirect_origins`)."""
    match = _ORIGIN.fullmatch(text)
    if match is None:
        return None
    scheme, host = match["scheme"].lower(), match["host"].lower()
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
    elif not _ORIGIN_HOST.fullmatch(host):
        return None
    port = int(match["port"]) if match["port"] else _DEFAULT_ORIGIN_PORTS.get(scheme)
    if port is not None and not 0 < port < 65536:
        return None
    return scheme, host, port


def serialize_origin(origin: Origin) -> str:
    """`origin` as browsers send it in `Origin` (RFC 6454 6.2: lowercase scheme and host, the
    port only when it is not the scheme's default)."""
    scheme, host, port = origin
    shown = port is not None and port != _DEFAULT_ORIGIN_PORTS.get(scheme)
    return f"{scheme}://{host}:{port}" if shown else f"{scheme}://{host}"


def serialized_origin(text: str) -> str | None:
    """`text` as browsers send it in `Origin`, or None when it is not an origin."""
    origin = parse_origin(text)
    return None if origin is None else serialize_origin(origin)


def _absolute_target_origin(raw: str) -> Origin | None:
    """The normalised origin of an absolute http(s) target, or None when it is anything
    else or anything ambiguous (user info, an encoded or odd host, a non-number port)."""
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in _DEFAULT_PORTS:
        return None
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if not authority or authority.endswith(":") or any(c in authority for c in "@%\\[]"):
        return None  # user info, encodings, IPv6 literals, an empty port: no ambiguity allowed
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    if parts.netloc != authority or not _HOST.fullmatch(host):
        return None
    if port is not None and not authority.endswith(f":{port}"):
        return None  # `:080`, `:+80`: a port only one parser reads that way
    for reading in _decodings(raw[len(scheme) + 3 + len(authority) :]):
        if "\\" in reading or _has_control(reading):
            return None
    scheme = scheme.lower()
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def safe_return_target(raw: str | None, allowed_origins: Iterable[str] = ()) -> str | None:
    """`raw` unchanged when a browser may be sent there after signing in, else None.

    Security (never an open redirector): a same-origin path `/...` whose every percent-
    decoded reading still is one (see `_safe_path_reading`), or an absolute http(s) URL
    whose exact origin (scheme, host, port) is in `allowed_origins`. Only visible ASCII,
    at most MAX_RETURN_TARGET characters. Anything else — `//host`, `\\`, `javascript:`,
    user info, whitespace, CR/LF, encoded or look-alike variants — is None.
    """
    if not raw or len(raw) > MAX_RETURN_TARGET:
        return None
    if not all("\x21" <= c <= "\x7e" for c in raw):  # whitespace, controls, non-ASCII
        return None
    if raw.startswith("/"):
        return raw if all(_safe_path_reading(r) for r in _decodings(raw)) else None
    origin = _absolute_target_origin(raw)
    if origin is None:
        return None
    allowed = {o for o in (parse_origin(a) for a in allowed_origins) if o is not None}
    return raw if origin in allowed else None


# ---------------------------------------------------------------- the sidecar's own pages


def site_path(public_url: str | None, path: str) -> str:
    """`path` (`/db/...`) as a browser must request it: under `public_url` when configured
    (it may add a path prefix), else relative to the origin the browser is on."""
    return (public_url.rstrip("/") if public_url else "") + path


def login_path(public_url: str | None, db: str, **query: str | None) -> str:
    """The `/{db}/_oidc` link that starts a login (empty parameters left out)."""
    url = URL(site_path(public_url, f"/{db}/_oidc"))
    return str(url.with_query({k: v for k, v in query.items() if v}))


# ---------------------------------------------------------------- sign-out CSRF


def logout_csrf_token(session_id: str) -> str:
    """The token the sign-out form carries, derived from the session it ends.

    Security: a cross-site page cannot know the session id (an HttpOnly cookie) nor read our
    pages, so it cannot forge the token; the token does not reveal the id (SHA-256)."""
    return hashlib.sha256(b"logout-csrf:" + session_id.encode()).hexdigest()


def logout_csrf_ok(session_id: str, token: str) -> bool:
    """Whether a posted sign-out token belongs to this session (constant-time comparison)."""
    return hmac.compare_digest(logout_csrf_token(session_id).encode(), token.encode())
