"""Header hygiene: which headers reach the upstream (identity added; spoofs, foreign identity
and URL-override headers removed) and which come back to the client. Pure functions; the
proxy calls them around its I/O.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TypeVar

from multidict import CIMultiDict, MultiMapping

from sidecar.config import CouchDBProxyAuth, IdentityHeaders, Secret
from sidecar.cors import RESPONSE_HEADERS as CORS_RESPONSE_HEADERS
from sidecar.errors import BadRequest, Forbidden
from sidecar.identity import Identity
from sidecar.request_head import valid_host

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded. Keep-Alive and
# Proxy-Connection are pre-standard but still sent by real clients.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "http2-settings",  # RFC 9113 3.2.1 (h2c upgrade): connection-specific
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# RFC 6455 4.1: the proxy runs its own WebSocket handshake with the upstream.
WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "sec-websocket-key",
        "sec-websocket-protocol",
        "sec-websocket-version",
    }
)
# Host: the upstream gets its own host (the client's travels as X-Forwarded-Host).
# Expect: the sidecar's server already answered "100 Continue" to the client.
_REPLACED = frozenset({"host", "expect"})
# Claims about the client's connection, believable only from a trusted proxy (`trusted_proxies`),
# and from it only under their exact names.
_FORWARDING = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-scheme",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "x-real-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-forwarded-for",
        "x-scheme",
        "x-url-scheme",
        "front-end-https",
    }
)

# Security: identity headers that common servers, frameworks and auth proxies trust. None of
# them may come from a client: every copy is removed from every proxied request (HTTP and
# websocket), whatever its case or separators. A trailing "*" matches a prefix. The README's
# "Headers removed from every request" lists them too; `strip_request_headers` adds more.
FOREIGN_IDENTITY_HEADERS = (
    # Apache (REMOTE_USER), Authelia (Remote-User/-Groups/-Email/-Name)
    "Remote-*",
    # Kubernetes front proxy and Apache conventions (X-Remote-User/-Group/-Extra-*)
    "X-Remote-*",
    # oauth2-proxy (upstream headers and the auth_request family)
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token",
    "X-Auth-Request-*",
    "GAP-Auth",
    # nginx auth_request setups, Louketo/keycloak-gatekeeper, generic conventions
    "X-User",
    "X-Email",
    "X-Groups",
    "X-Auth-User",
    "X-Auth-Username",
    "X-Auth-Userid",
    "X-Auth-Email",
    "X-Auth-Groups",
    "X-Auth-Roles",
    "X-Auth-Subject",
    # Blue Coat / Websense, Kong (X-Authenticated-Userid/-Scope), Kong consumers and OIDC
    "X-Authenticated-*",
    "X-Consumer-*",
    "X-Credential-Identifier",
    "X-Anonymous-Consumer",
    "X-Userinfo",
    "X-Id-Token",
    # Grafana auth proxy (X-WEBAUTH-USER and its companions)
    "X-WEBAUTH-*",
    # CouchDB proxy authentication
    "X-Auth-CouchDB-*",
    # Apache mod_auth_openidc (OIDC_CLAIM_*, OIDC_access_token, OIDC_id_token_payload, ...)
    "OIDC-*",
    # Pomerium (X-Pomerium-Jwt-Assertion, X-Pomerium-Claim-*), authentik
    "X-Pomerium-*",
    "X-Authentik-*",
    # Cloud front doors: Azure App Service, Google IAP, AWS ALB, Cloudflare Access
    "X-MS-Client-Principal*",
    "X-MS-Token-*",
    "X-Goog-Authenticated-User-*",
    "X-Goog-IAP-JWT-Assertion",
    "X-Amzn-Oidc-*",
    "Cf-Access-*",
    # Shibboleth, mod_auth_mellon
    "Shib-*",
    "Mellon-*",
)
# Security: headers through which frameworks and proxies (IIS URL Rewrite, Symfony, Laravel,
# Envoy, Traefik, nginx auth_request, Werkzeug ProxyFix...) take the request's URL or path from
# a header instead of the request line. The sidecar checks the request line only, so these are
# removed from every request, even one from a trusted proxy.
URL_OVERRIDE_HEADERS = (
    "X-Original-URL",
    "X-Original-URI",
    "X-Original-Path",
    "X-Rewrite-URL",
    "X-Override-URL",
    "X-Forwarded-Uri",
    "X-Forwarded-Url",
    "X-Forwarded-Path",
    "X-Forwarded-Prefix",
    "X-Script-Name",
    "X-Envoy-Original-Path",
    "X-Envoy-Original-Url",
    "X-Envoy-Original-Host",
)
# Message framing: only the exact names count; a look-alike (Content_Length, content.length)
# is removed, since an upstream folding separators could take it for the real one.
_FRAMING = frozenset({"content-length", "transfer-encoding"})

COUCHDB_USER = "X-Auth-CouchDB-UserName"
COUCHDB_ROLES = "X-Auth-CouchDB-Roles"
COUCHDB_TOKEN = "X-Auth-CouchDB-Token"
REQUEST_ID = "X-Request-ID"

# Bytes written as-is in email and list values: visible ASCII except "%" (the escape itself) and
# "," (the list separator), so the encoding is injective: two different values never produce
# the same header value, and one role can never turn into two.
_VERBATIM = frozenset(range(0x21, 0x7F)) - {ord("%"), ord(",")}
_PLAIN = re.compile(r"[\x21-\x24\x26-\x2B\x2D-\x7E]*")  # _VERBATIM as a pattern
_VISIBLE = re.compile(r"[\x21-\x7E]+")  # a user name sent as is


@dataclass(frozen=True, slots=True)
class CouchDBHeaders:
    """CouchDB proxy authentication: send X-Auth-CouchDB-UserName/-Roles (and -Token)."""

    enabled: bool = True
    secret: str | None = field(default=None, repr=False)  # chttpd_auth/secret; adds the token


# Every separator a header name may contain (RFC 9110 5.6.2 tchar minus letters and digits).
_SEPARATOR_TO_DASH = str.maketrans({c: "-" for c in "!#$%&'*+.^_`|~"})


@functools.lru_cache(maxsize=1024)  # the same few header names recur on every request
def _norm(name: str) -> str:
    # Security: CGI/WSGI-style upstreams map "_" to "-" (X_Forwarded_User arrives as
    # HTTP_X_FORWARDED_USER), others fold more separators; so look-alikes are compared with
    # every separator folded into "-".
    return name.lower().translate(_SEPARATOR_TO_DASH)


@dataclass(frozen=True, slots=True)
class HeaderSet:
    """Header names compared folded (`_norm`): exact names and "prefix*" prefixes."""

    names: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, patterns: Iterable[str]) -> HeaderSet:
        patterns = tuple(patterns)
        return cls(
            frozenset(_norm(p) for p in patterns if not p.endswith("*")),
            tuple(_norm(p[:-1]) for p in patterns if p.endswith("*")),
        )

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self.names or key.startswith(self.prefixes))


_URL_OVERRIDE = HeaderSet.of(URL_OVERRIDE_HEADERS)


@functools.lru_cache(maxsize=16)  # one per configured list: built once, not per request
def removed_headers(extra: tuple[str, ...] = ()) -> HeaderSet:
    """The foreign identity headers plus `extra` (`strip_request_headers`) as one set."""
    return HeaderSet.of(FOREIGN_IDENTITY_HEADERS + extra)


def header_username(name: str) -> str:
    """The user name as X-Forwarded-User and X-Auth-CouchDB-UserName carry it: exactly.

    Names from a login are Sync Gateway's query-escaped form (`bob%40example.com`), visible
    ASCII, and go as they are, never escaped twice. A name with anything else in it (a space,
    a control byte, non-ASCII: only the admin API can create one) has no exact header form
    that another name could not also produce, so the request is refused instead (fail closed).
    """
    if _VISIBLE.fullmatch(name):
        return name
    raise Forbidden("the user name cannot be passed upstream exactly (not visible ASCII)")


def encode_value(text: str) -> str:
    """Percent-encode the UTF-8 bytes of `text` outside visible ASCII, plus "%" and ",".

    Security: identity values come from token claims. CR, LF and NUL (and every other control
    byte) are encoded, never stripped: stripping would let "adm\\nin" pass as "admin".
    """
    if _PLAIN.fullmatch(text):
        return text  # the common case, nothing to encode (and no cache entry for unique ids)
    return _encoded(text)


@functools.lru_cache(maxsize=4096)  # the same few emails and grants recur on every request
def _encoded(text: str) -> str:
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates are legal in JSON strings
    return "".join(chr(b) if b in _VERBATIM else f"%{b:02X}" for b in raw)


def _encode_list(values: Iterable[str]) -> str:
    return ",".join(encode_value(v) for v in sorted(values))


_CONNECTION_OPTIONS = frozenset({"keep-alive", "close"})  # options, not header names


def _connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """Header names the sender declared hop-by-hop in its Connection header(s) (RFC 9110 7.6.1)."""
    values = headers.getall("Connection", ())
    if not values or (len(values) == 1 and values[0].lower() in _CONNECTION_OPTIONS):
        return frozenset()  # the common cases: none, or a lone keep-alive / close
    tokens = frozenset(
        _norm(token.strip()) for value in values for token in value.split(",") if token.strip()
    )
    return tokens - _CONNECTION_OPTIONS


def strip_cookie(value: str, name: str) -> str:
    """Remove cookie `name` from a Cookie header value; other cookies keep order and text."""
    pairs = [pair.strip() for pair in value.split(";")]
    kept = [pair for pair in pairs if pair and pair.split("=", 1)[0].strip() != name]
    if len(kept) == len([pair for pair in pairs if pair]):
        return value  # nothing removed: forward the exact original text
    return "; ".join(kept)


def couchdb_token(secret: str, username: str) -> str:
    """X-Auth-CouchDB-Token: hex HMAC of the username sent, keyed with chttpd_auth/secret.

    CouchDB >= 3.3 checks it with every algorithm in chttpd_auth/hash_algorithms, default
    "sha256, sha" (docs.couchdb.org/en/stable/config/auth.html#chttpd_auth/hash_algorithms);
    older releases accept HMAC-SHA1 only.
    """
    return hmac.new(secret.encode(), username.encode(), hashlib.sha256).hexdigest()


# What becomes of a request header, by its name alone (see `_HeaderPolicy`).
_PASS = "pass"
_DROP = "drop"
_LENGTH = "content-length"  # dropped when the request is chunked
_FORWARDING_CLAIM = "forwarding"  # kept from a trusted proxy only
_REQUEST_ID = "request-id"  # kept when the sidecar has no request id of its own
_COOKIE = "cookie"  # the session cookie is cut out unless pass_authorization
_AUTHORIZATION = "authorization"  # dropped unless pass_authorization


class _HeaderPolicy:
    """The fate of each request header name under one configuration, decided once per name.

    Header names recur on every request, so the rules (folded look-alikes, identity, URL
    override and hop-by-hop lists, `strip_request_headers`) run once per distinct name, not
    per request. At most `LIMIT` names are remembered, so a client inventing names cannot
    grow it; past that, names are decided each time.
    """

    LIMIT = 4096

    def __init__(self, ours: frozenset[str], removed: HeaderSet) -> None:
        self._ours = ours
        self._removed = removed
        self._kinds: dict[str, str] = {}

    def kind(self, name: str) -> str:
        kind = self._kinds.get(name)
        if kind is None:
            kind = self._decide(name)
            if len(self._kinds) < self.LIMIT:
                self._kinds[name] = kind
        return kind

    def _decide(self, name: str) -> str:
        key = _norm(name)
        exact = name.lower() == key
        if key in HOP_BY_HOP or key in WEBSOCKET_HANDSHAKE or key in _REPLACED:
            return _DROP
        if key in _FRAMING:  # security: only the exact names frame a message
            return _LENGTH if exact else _DROP
        if key in self._ours or key in self._removed:  # security: identity spoofing
            return _DROP
        if key in _URL_OVERRIDE:  # security: the path checked is the request line's only
            return _DROP
        if key in _FORWARDING:
            return _FORWARDING_CLAIM if exact else _DROP
        if key == "x-request-id":
            return _REQUEST_ID if exact else _DROP
        if key == "authorization":
            return _AUTHORIZATION
        if key == "cookie":
            return _COOKIE
        return _PASS


_policies: dict[tuple[int, int], tuple[IdentityHeaders, tuple[str, ...], _HeaderPolicy]] = {}


def _policy(names: IdentityHeaders, strip: tuple[str, ...]) -> _HeaderPolicy:
    """One policy per configuration, found by the identity of its (immutable) config objects:
    hashing a pydantic model on every request would cost more than the lookup saves."""
    entry = _policies.get((id(names), id(strip)))
    if entry is not None and entry[0] is names and entry[1] is strip:
        return entry[2]
    ours = frozenset(_norm(n) for n in (names.user, names.email, names.roles, names.channels))
    policy = _HeaderPolicy(ours, removed_headers(strip))
    if len(_policies) >= 64:  # tests build many configurations; production has one
        _policies.clear()
    _policies[(id(names), id(strip))] = (names, strip, policy)
    return policy


def upstream_request_headers(
    incoming: MultiMapping[str],
    *,
    identity: Identity,
    names: IdentityHeaders,
    peer: str | None,
    scheme: str,
    host: str | None,
    trusted: bool,
    pass_authorization: bool,
    session_cookie_name: str,
    request_id: str | None,
    couchdb: CouchDBHeaders | CouchDBProxyAuth | None = None,
    strip: tuple[str, ...] = (),
) -> CIMultiDict[str]:
    """The headers to send upstream for a request from `peer` made on behalf of `identity`.

    `incoming` should be the request's CIMultiDictProxy so repeated headers stay repeated.
    `trusted`: `peer` is a configured trusted proxy (see `client_ip_trusted`), so its
    X-Forwarded-* / Forwarded claims are kept and extended rather than replaced.
    `host`: the request's Host, already checked by `request_head.check_request_head`.
    `strip`: more header names (or "prefix*") to remove, from `strip_request_headers`.
    Raises Forbidden when the user name has no exact header form (`header_username`), and
    BadRequest when a trusted proxy's X-Forwarded-Host is not a valid host (`valid_host`).
    """
    connection_named = _connection_tokens(incoming)
    # Security (request smuggling): with Transfer-Encoding the length is the chunks', never a
    # Content-Length sent alongside (RFC 9112 6.3); the forwarder re-frames the body it sends.
    chunked = "Transfer-Encoding" in incoming
    kind_of = _policy(names, strip).kind
    out: CIMultiDict[str] = CIMultiDict()
    forwarded_for: list[str] = []
    for name, value in incoming.items():
        kind = kind_of(name)
        if connection_named and _norm(name) in connection_named:
            continue  # RFC 9110 7.6.1: the sender said it is for this hop only
        if kind is _PASS:
            out.add(name, value)
        elif kind is _DROP or (kind is _LENGTH and chunked):
            continue
        elif kind is _LENGTH:
            out.add(name, value)
        elif kind is _FORWARDING_CLAIM:
            # Security: believe forwarding claims only from a trusted proxy, and only under
            # their exact names (a trusted proxy does not send X_Forwarded_For).
            if not trusted:
                continue
            key = name.lower()
            if key == "x-forwarded-for":
                forwarded_for.append(value.strip())
            elif key == "x-forwarded-host" and not all(
                valid_host(h.strip()) for h in value.split(",")
            ):
                # Security: a trusted proxy may pass a client's value on untouched; it
                # must meet the rule the sidecar applies to Host itself.
                raise BadRequest("invalid X-Forwarded-Host")
            else:
                out.add(name, value)
        elif kind is _REQUEST_ID:
            if request_id is None:
                out.add(name, value)
        elif pass_authorization:  # _CREDENTIAL
            out.add(name, value)
        elif kind is _COOKIE:
            # Security: the upstream must not see the credential the sidecar consumed.
            value = strip_cookie(value, session_cookie_name)
            if value:
                out.add(name, value)
        # else Authorization: the sidecar consumed it

    if peer:
        forwarded_for.append(peer)
    if forwarded_for:
        out["X-Forwarded-For"] = ", ".join(v for v in forwarded_for if v)
    if "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = scheme
    if host and "X-Forwarded-Host" not in out:
        out["X-Forwarded-Host"] = host

    user = header_username(identity.name)
    out[names.user] = user
    if identity.email:
        out[names.email] = encode_value(identity.email)
    if identity.roles:
        out[names.roles] = _encode_list(identity.roles)
    if identity.channels:
        out[names.channels] = _encode_list(identity.channels)
    if request_id is not None:
        out[REQUEST_ID] = encode_value(request_id)

    if couchdb is not None and couchdb.enabled:
        # CouchDB proxy authentication:
        # docs.couchdb.org/en/stable/api/server/authn.html#proxy-authentication
        out[COUCHDB_USER] = user
        # Security: CouchDB reserves roles starting with "_" (`_admin` is a server admin);
        # a provider's claim must never grant them.
        roles = [r for r in identity.roles if not r.startswith("_")]
        if roles:
            out[COUCHDB_ROLES] = _encode_list(roles)
        secret = couchdb.secret
        if secret is not None:
            key = secret.get() if isinstance(secret, Secret) else secret
            out[COUCHDB_TOKEN] = couchdb_token(key, user)
    return out


# Back to the client: never hop-by-hop headers, nor the upstream's CORS grants (the sidecar
# alone answers CORS, from `databases.<db>.cors`: sidecar/cors.py).
_NOT_RELAYED = HOP_BY_HOP | CORS_RESPONSE_HEADERS


_RELAY, _NOT_RELAY, _LENGTH_OF_BODY = 0, 1, 2
_response_kinds: dict[str, int] = {}  # by header name as sent; bounded like _HeaderPolicy


def _response_kind(name: str) -> int:
    kind = _response_kinds.get(name)
    if kind is None:
        key = name.lower()
        kind = (
            _NOT_RELAY
            if key in _NOT_RELAYED
            else _LENGTH_OF_BODY
            if key == "content-length"
            else _RELAY
        )
        if len(_response_kinds) < _HeaderPolicy.LIMIT:
            _response_kinds[name] = kind
    return kind


def downstream_response_headers(upstream: MultiMapping[str]) -> CIMultiDict[str]:
    """The upstream response's headers minus hop-by-hop ones and CORS grants, ready for a
    StreamResponse.

    Content-Length is kept, so aiohttp writes exactly that many bytes without chunking (and a
    HEAD answer keeps its length). Transfer-Encoding is dropped: with no length, aiohttp
    re-chunks for HTTP/1.1 clients or closes the connection after an HTTP/1.0 body.
    """
    connection_named = _connection_tokens(upstream)
    chunked = "Transfer-Encoding" in upstream
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        kind = _response_kind(name)
        if kind == _NOT_RELAY or (kind == _LENGTH_OF_BODY and chunked):
            continue  # RFC 9112 6.3: with Transfer-Encoding, its chunks give the length
        if connection_named and _norm(name) in connection_named:
            continue  # RFC 9110 7.6.1: named hop-by-hop by the sender
        out.add(name, value)
    return out


def client_ip_trusted(
    peer: str | None, trusted_networks: Sequence[IPv4Network | IPv6Network]
) -> bool:
    """Is the direct peer inside one of the trusted proxy networks?"""
    if not peer or not trusted_networks:
        return False
    try:
        address: IPv4Address | IPv6Address = ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, IPv6Address):
        if address.scope_id:
            address = IPv6Address(peer.split("%", 1)[0])
        if address.ipv4_mapped is not None:  # a dual-stack socket reports ::ffff:10.0.0.1
            address = address.ipv4_mapped
    return any(address in network for network in trusted_networks)


# ---------------------------------------------------------------- how the client reached us

_TLS_PROTOS = frozenset({"https", "wss"})
_T = TypeVar("_T")
Trust = Callable[[str | None], bool]


@dataclass(frozen=True, slots=True)
class ClientView:
    """The request as the client made it: over TLS or not, and the Host it addressed."""

    https: bool
    host: str | None


def _header_list(headers: MultiMapping[str], name: str) -> list[str]:
    """Every comma-separated item of every `name` header, in order."""
    items = (item.strip() for value in headers.getall(name, ()) for item in value.split(","))
    return [item for item in items if item]


def _forwarded_for_ip(value: str | None) -> str | None:
    """The address in a Forwarded `for=` (RFC 7239 6): `192.0.2.1`, `192.0.2.1:80`,
    `[2001:db8::1]:80`; None for `unknown` and obfuscated identifiers."""
    if not value:
        return None
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.partition(":")[0] if value.count(":") == 1 else value


def _client_facing(values: Sequence[_T], fors: Sequence[str | None], trusted: Trust) -> _T:
    """Of items that proxies append (X-Forwarded-Proto, Forwarded elements), the one the proxy
    facing the client wrote. The last was written by our trusted peer about the hop it got
    the request from (`fors[-1]`); while that hop is a trusted proxy too, step one back.

    Security: never simply the first item, which the client itself may have sent.
    """
    k = 0
    while k < len(values) - 1 and k < len(fors) and trusted(fors[-1 - k]):
        k += 1
    return values[-1 - k]


def client_view(
    headers: MultiMapping[str],
    forwarded: Sequence[Mapping[str, str]],
    *,
    https: bool,
    host: str | None,
    peer: str | None,
    trusted_networks: Sequence[IPv4Network | IPv6Network],
) -> ClientView:
    """Whether the client used TLS and which Host it asked for: from our own connection, or,
    when `peer` is a trusted proxy, from what it says (`Forwarded: proto=;host=`, RFC 7239,
    else `X-Forwarded-Proto` / `X-Forwarded-Host`). `forwarded` is the parsed Forwarded
    elements (aiohttp's `request.forwarded`), `https`/`host` our own connection's.

    Security: an untrusted peer's claims are ignored. This is the one place that decides
    "was this request https?" (Secure cookies) and "which origin is ours?" (Origin checks).
    """
    if not client_ip_trusted(peer, trusted_networks):
        return ClientView(https, host)

    def trusted(address: str | None) -> bool:
        return client_ip_trusted(address, trusted_networks)

    proto = claimed_host = None
    if forwarded:
        fors = [_forwarded_for_ip(element.get("for")) for element in forwarded]
        element = _client_facing(forwarded, fors, trusted)
        proto, claimed_host = element.get("proto"), element.get("host")
    hops = _header_list(headers, "X-Forwarded-For")
    if proto is None:
        protos = _header_list(headers, "X-Forwarded-Proto")
        proto = _client_facing(protos, hops, trusted) if protos else None
    if claimed_host is None:
        hosts = _header_list(headers, "X-Forwarded-Host")
        claimed_host = _client_facing(hosts, hops, trusted) if hosts else None
    return ClientView(
        https if proto is None else proto.lower() in _TLS_PROTOS, claimed_host or host
    )
