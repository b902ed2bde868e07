"""The built-in test OpenID Provider mounted at `/{db}/_oidc_testing`: signs in anyone under
any name, to try the auth code flow without a real provider. Never for production.

Unlike Sync Gateway's (fixed key, reusable codes), the key is generated at start and codes
are single use and short-lived. Every bad input gets a 4xx JSON answer: Sync Gateway's
`{"error", "reason"}` on the browser endpoints, RFC 6749 5.2 errors on the token endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote_plus

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey
from yarl import URL

from sidecar import keys
from sidecar.admin_auth import is_loopback_host
from sidecar.errors import (
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    SidecarError,
    outside_text,
)
from sidecar.oidc import self_fetch
from sidecar.sessions.origin import public_base

DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = 7 * 24 * 3600
MAX_USERNAME = 256
MAX_VALUE = 2048  # any single parameter
MAX_PARAMS = 64
# RFC 7636 4.1: code_verifier = 43*128 unreserved characters; an S256 challenge is 43 of them.
_PKCE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What the login form posts itself; never echoed back as hidden fields.
_FORM_FIELDS = frozenset({"username", "tokenttl", "authenticated", "notauthenticated"})
_FORM = "application/x-www-form-urlencoded"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Every refusal: never cached, never sniffed as HTML (reasons may quote the request).
_REFUSAL = {**_NO_STORE, "X-Content-Type-Options": "nosniff"}

V = TypeVar("V")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    """Ends a request with a JSON error: status, body and headers."""

    def __init__(
        self, status: int, body: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(body)
        self.status = status
        self.body = dict(body)
        self.headers = dict(headers or {})


def _sg_error(error: SidecarError) -> _Refused:
    return _Refused(error.status, error.body(), error.headers)


def _oauth_error(code: str, description: str, *, status: int = 400) -> _Refused:
    headers = dict(_NO_STORE)
    if status == 401:  # RFC 6749 5.2: invalid_client answered with 401 carries a challenge
        headers["WWW-Authenticate"] = 'Basic realm="_oidc_testing"'
    return _Refused(status, {"error": code, "error_description": description}, headers)


class _Bounded(Generic[V]):
    """A dict that forgets its oldest entries beyond `limit`: memory stays bounded whatever
    a caller sends."""

    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[str, V] = OrderedDict()
        self._limit = limit

    def put(self, key: str, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def get(self, key: str) -> V | None:
        return self._items.get(key)

    def pop(self, key: str) -> V | None:
        return self._items.pop(key, None)

    def prune(self, stale: Callable[[V], bool]) -> None:
        """Drop entries from the oldest on while they are stale."""
        while self._items and stale(next(iter(self._items.values()))):
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """A validated authorization request (what `authorize` and `authenticate` both check)."""

    client_id: str
    redirect_uri: str
    scope: tuple[str, ...]
    state: str | None
    nonce: str | None
    code_challenge: str | None


@dataclass(frozen=True, slots=True)
class _Code:
    request: AuthRequest
    username: str
    token_ttl: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Refresh:
    client_id: str
    username: str
    scope: tuple[str, ...]
    token_ttl: int


def single_valued(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Request parameters as a dict. RFC 6749 3.1/3.2: a parameter sent twice is an error;
    sizes are bounded; non-text values (multipart files) are refused."""
    params: dict[str, str] = {}
    for count, (key, value) in enumerate(pairs, start=1):
        named = outside_text(key, limit=64)  # security: the caller's text, quoted plainly
        if count > MAX_PARAMS:
            raise _sg_error(BadRequest("too many parameters"))
        if not isinstance(value, str):
            raise _sg_error(BadRequest(f"parameter {named!r} is not text"))
        if len(key) > 64 or len(value) > MAX_VALUE:
            raise _sg_error(BadRequest(f"parameter {named!r} is too long"))
        if key in params:
            raise _sg_error(BadRequest(f"parameter {named!r} repeated"))
        params[key] = value
    return params


def _valid_redirect_uri(value: str) -> bool:
    """An absolute http(s) URL with a host and no fragment (RFC 6749 3.1.2)."""
    if "#" in value or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        return False
    try:
        url = URL(value)
        return url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except ValueError:
        return False


def _endpoint(url: URL) -> tuple[str, str, int | None, str]:
    """What a redirect_uri is compared by: scheme, host, port (default filled in), path. The
    loopback names are one host (`make run`: the issuer says 127.0.0.1, the browser may be on
    localhost; both are this machine)."""
    host = (url.host or "").lower()
    return (url.scheme.lower(), "loopback" if is_loopback_host(host) else host, url.port, url.path)


def parse_auth_request(params: Mapping[str, str]) -> AuthRequest:
    """Check an authorization request (OIDC Core 3.1.2.1, RFC 7636 4.3); raises BadRequest."""
    scope = tuple(params.get("scope", "").split())
    if "openid" not in scope:
        raise BadRequest("scope must include openid")
    if params.get("response_type") != "code":
        raise BadRequest("response_type must be code")
    client_id = params.get("client_id", "")
    if not client_id:
        raise BadRequest("client_id is required")
    redirect_uri = params.get("redirect_uri", "")
    if not _valid_redirect_uri(redirect_uri):
        raise BadRequest("redirect_uri must be an absolute http(s) URL without fragment")
    challenge = params.get("code_challenge")
    method = params.get("code_challenge_method")
    if challenge is None:
        if method is not None:
            raise BadRequest("code_challenge_method without code_challenge")
    elif method != "S256":  # plain (the default when absent) is refused: S256 only
        raise BadRequest("code_challenge_method must be S256")
    elif len(challenge) != 43 or not set(challenge) <= _PKCE_CHARS:
        raise BadRequest("code_challenge is not an S256 challenge")
    return AuthRequest(
        client_id=client_id,
        redirect_uri=redirect_uri,
        scope=scope,
        state=params.get("state"),
        nonce=params.get("nonce"),
        code_challenge=challenge,
    )


def parse_token_ttl(value: str | None) -> int:
    """The `tokenttl` form field: seconds, default 3600, 1..MAX_TOKEN_TTL; raises BadRequest."""
    if value is None or value == "":
        return DEFAULT_TOKEN_TTL
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise BadRequest("tokenttl must be a whole number of seconds")
    ttl = int(value)
    if not 1 <= ttl <= MAX_TOKEN_TTL:
        raise BadRequest(f"tokenttl must be between 1 and {MAX_TOKEN_TTL}")
    return ttl


def pkce_matches(verifier: str | None, challenge: str) -> bool:
    """RFC 7636 4.6: BASE64URL(SHA256(verifier)) == challenge, for a well-formed verifier."""
    if verifier is None or not 43 <= len(verifier) <= 128 or not set(verifier) <= _PKCE_CHARS:
        return False
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return hmac.compare_digest(computed, challenge)


def client_id_of(authorization: list[str], form: Mapping[str, str]) -> str:
    """The calling client: client_secret_basic or client_secret_post (RFC 6749 2.3.1).

    Any secret is accepted (this provider authenticates anyone) but the client must say who
    it is, once: two authentication methods, or two different ids, are refused.
    """
    if len(authorization) > 1:
        raise _oauth_error("invalid_request", "multiple Authorization headers")
    form_id = form.get("client_id")
    if not authorization:
        if not form_id:
            raise _oauth_error("invalid_client", "client authentication required", status=401)
        return form_id
    scheme, _, credentials = authorization[0].strip().partition(" ")
    if scheme.lower() != "basic":
        raise _oauth_error("invalid_client", "unsupported authentication scheme", status=401)
    if "client_secret" in form:
        raise _oauth_error("invalid_request", "more than one client authentication method")
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII input
        raise _oauth_error("invalid_client", "malformed Basic credentials", status=401) from None
    user, colon, _secret = decoded.partition(":")
    client_id = unquote_plus(user)  # RFC 6749 2.3.1: form-urlencoded before base64
    if not colon or not client_id:
        raise _oauth_error("invalid_client", "malformed Basic credentials", status=401)
    if form_id is not None and form_id != client_id:
        raise _oauth_error("invalid_client", "client_id does not match credentials", status=401)
    return client_id


def _email_for(username: str) -> str:
    """The test user's email: the name itself when it looks like one, else name@example.com."""
    return username if "@" in username else f"{username}@example.com"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Test OpenID Provider</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f3f4f6;margin:0;color:#1f2937}}
main{{max-width:26rem;margin:3rem auto;background:#fff;padding:2rem;border-radius:.5rem;
box-shadow:0 1px 4px rgba(0,0,0,.15)}}
h1{{font-size:1.4rem;margin-top:0}}
.warn{{background:#fff7e6;border:1px solid #f59e0b;border-radius:.3rem;padding:.75rem}}
code{{word-break:break-all}}
label{{display:block;margin-top:1rem;font-weight:600}}
input{{width:100%;box-sizing:border-box;padding:.5rem;margin-top:.3rem;font-size:1rem}}
.buttons{{display:flex;gap:.5rem;margin-top:1.5rem}}
button{{flex:1;padding:.6rem;font-size:1rem;border-radius:.3rem;border:1px solid #9ca3af;
background:#fff;cursor:pointer}}
button.primary{{background:#2563eb;border-color:#2563eb;color:#fff}}
</style></head><body><main>
<h1>Sign in</h1>
<p class="warn"><strong>Test provider.</strong> It signs in anyone under any name. Use it
to try the login flow only; never enable it in production.</p>
<p>Client <code>{client_id}</code> asks for <code>{scope}</code>.</p>
<form method="post" action="authenticate">
{hidden}
<label for="username">Username</label>
<input id="username" name="username" maxlength="{max_username}" required autofocus
 autocomplete="username">
<label for="tokenttl">Token lifetime (seconds)</label>
<input id="tokenttl" name="tokenttl" type="number" min="1" max="{max_ttl}" value="{ttl}">
<div class="buttons">
<button class="primary" type="submit" name="authenticated" value="1">Sign in</button>
<button type="submit" name="notauthenticated" value="1" formnovalidate>Cancel</button>
</div></form></main></body></html>
"""


def login_page(params: Mapping[str, str], request: AuthRequest) -> str:
    """The login form; every echoed value is HTML-escaped (security: the query is hostile)."""
    hidden = "\n".join(
        f'<input type="hidden" name="{html.escape(key)}" value="{html.escape(value)}">'
        for key, value in params.items()
        if key not in _FORM_FIELDS
    )
    return _PAGE.format(
        client_id=html.escape(request.client_id),
        scope=html.escape(" ".join(request.scope)),
        hidden=hidden,
        max_username=MAX_USERNAME,
        max_ttl=MAX_TOKEN_TTL,
        ttl=DEFAULT_TOKEN_TTL,
    )


def _quiet_if_self_fetch(request: web.Request) -> None:
    """The sidecar's own periodic discovery/JWKS fetch is no user request: no access-log line."""
    if self_fetch.is_self_fetch(request):
        request[keys.QUIET] = True


class TestProvider:
    """The test OP's state (signing key, codes, refresh tokens) and its aiohttp handlers."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        code_ttl: int = 60,
        public_url: str | None = None,
        max_entries: int = 10_000,
        callback_urls: Iterable[str] = (),
    ) -> None:
        """`callback_urls`: where besides the sidecar's own `/{db}/_oidc_callback` a code may
        be sent (the providers' configured `callback_url`s)."""
        self._clock = clock
        self._callbacks = frozenset(_endpoint(URL(u)) for u in callback_urls)
        self._code_ttl = code_ttl
        self._public_url = public_url.rstrip("/") if public_url else None
        self._key = RSAKey.generate_key(
            2048, parameters={"kid": secrets.token_urlsafe(12), "use": "sig", "alg": "RS256"}
        )
        self._codes: _Bounded[_Code] = _Bounded(max_entries)
        self._used_codes: _Bounded[str] = _Bounded(max_entries)  # code -> its refresh token
        self._refresh: _Bounded[_Refresh] = _Bounded(max_entries)

    def jwks(self) -> dict[str, Any]:
        """The public JWKS (security: as_dict(private=False) drops d, p, q, dp, dq, qi)."""
        return {"keys": [self._key.as_dict(private=False)]}

    def routes(self, prefix: str = "/{db}/_oidc_testing") -> list[web.RouteDef]:
        """The provider's routes under `prefix` (plain `{name}` placeholders only). Every
        method is routed so a wrong one gets a JSON 405 rather than aiohttp's text one."""
        endpoints: list[tuple[str, tuple[str, ...], Callable[..., Awaitable[web.Response]]]] = [
            ("/.well-known/openid-configuration", ("GET", "HEAD"), self._discovery),
            ("/authorize", ("GET", "POST"), self._authorize),
            ("/authenticate", ("GET", "POST"), self._authenticate),
            ("/token", ("POST",), self._token),
            ("/certs", ("GET", "HEAD"), self._certs),
        ]
        return [
            web.route("*", prefix + path, self._handler(prefix, methods, handler))
            for path, methods, handler in endpoints
        ]

    def _handler(
        self,
        prefix: str,
        methods: tuple[str, ...],
        handler: Callable[[web.Request, str], Awaitable[web.Response]],
    ) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.method not in methods:
                error = MethodNotAllowed(f"use {' or '.join(methods)}")
                return web.json_response(
                    error.body(),
                    status=error.status,
                    headers={**_REFUSAL, "Allow": ", ".join(methods)},
                )
            try:
                return await handler(request, self._issuer(request, prefix))
            except _Refused as refused:
                return web.json_response(
                    refused.body, status=refused.status, headers={**_REFUSAL, **refused.headers}
                )

        return handle

    def _issuer(self, request: web.Request, prefix: str) -> str:
        """`scheme://host/{db}/_oidc_testing` as the client addressed it (through a trusted
        proxy as it reports it; `sessions.origin.public_base`), or under `public_url`."""
        # Escape only what a path segment cannot hold (RFC 3986 pchar), so a db named `a$b`
        # gives the issuer a client would write by hand.
        values = {k: quote(v, safe="!$&'()*+,;=:@") for k, v in request.match_info.items()}
        path = prefix.format_map(values)
        return (self._public_url or public_base(request)) + path

    async def _params(self, request: web.Request) -> dict[str, str]:
        """Query and (for POST) urlencoded form parameters together."""
        pairs: list[tuple[str, Any]] = list(request.query.items())
        if request.method == "POST":
            pairs += list((await self._form(request, oauth=False)).items())
        return single_valued(pairs)

    async def _form(self, request: web.Request, *, oauth: bool) -> Mapping[str, Any]:
        if request.content_type != _FORM:
            if not request.can_read_body and not oauth:
                return {}
            if oauth:  # RFC 6749 4.1.3: the token request is form-urlencoded
                raise _oauth_error("invalid_request", f"body must be {_FORM}")
            raise _sg_error(BadRequest(f"body must be {_FORM}"))
        try:
            return await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise _sg_error(PayloadTooLarge("request body too large")) from None
        except ValueError:  # includes UnicodeDecodeError from a body that is not UTF-8
            if oauth:
                raise _oauth_error("invalid_request", "unreadable form body") from None
            raise _sg_error(BadRequest("unreadable form body")) from None

    async def _discovery(self, request: web.Request, issuer: str) -> web.Response:
        _quiet_if_self_fetch(request)
        return web.json_response(
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": f"{issuer}/token",
                "jwks_uri": f"{issuer}/certs",
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "email"],
                "claims_supported": ["iss", "sub", "aud", "iat", "exp", "nonce", "email"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                ],
                "code_challenge_methods_supported": ["S256"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "authorization_response_iss_parameter_supported": True,  # RFC 9207
            },
            headers={"Cache-Control": "max-age=60"},
        )

    async def _certs(self, request: web.Request, issuer: str) -> web.Response:
        _quiet_if_self_fetch(request)
        return web.json_response(self.jwks(), headers={"Cache-Control": "max-age=60"})

    def _check_redirect(self, auth: AuthRequest, issuer: str) -> None:
        """Security: a code goes only to the sidecar's own callback for this database (the
        issuer's sibling `/_oidc_callback`, any query) or a configured `callback_url`;
        anything else would make the provider an open redirector carrying codes."""
        own = {_endpoint(URL(issuer.removesuffix("/_oidc_testing") + "/_oidc_callback"))}
        url = URL(auth.redirect_uri)
        if url.user is not None or _endpoint(url) not in own | self._callbacks:
            raise BadRequest("redirect_uri is not this sidecar's callback URL")

    async def _authorize(self, request: web.Request, issuer: str) -> web.Response:
        params = await self._params(request)
        try:
            auth = parse_auth_request(params)
            self._check_redirect(auth, issuer)
        except BadRequest as error:
            raise _sg_error(error) from None
        return web.Response(
            text=login_page(params, auth),
            content_type="text/html",
            headers={
                **_NO_STORE,
                # No scripts at all; inline style only; never framed (clickjacking).
                "Content-Security-Policy": (
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
                ),
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def _authenticate(self, request: web.Request, issuer: str) -> web.Response:
        params = await self._params(request)
        try:
            # Security: re-checked here, since a script can post straight to authenticate;
            # an unchecked redirect_uri would make this an open redirector.
            auth = parse_auth_request(params)
            self._check_redirect(auth, issuer)
            if "notauthenticated" in params:
                answer = {
                    "error": "invalid_request",
                    "error_description": "the user did not authenticate",
                }
            else:
                username = params.get("username", "")
                if not username or len(username) > MAX_USERNAME:
                    raise BadRequest(f"username must be 1 to {MAX_USERNAME} characters")
                ttl = parse_token_ttl(params.get("tokenttl"))
                answer = {"code": self._new_code(auth, username, ttl)}
        except BadRequest as error:
            raise _sg_error(error) from None
        if auth.state is not None:
            answer["state"] = auth.state
        answer["iss"] = issuer  # RFC 9207 2: on success and error answers alike
        location = URL(auth.redirect_uri).update_query(answer)
        return web.Response(status=302, headers={**_NO_STORE, "Location": str(location)})

    def _new_code(self, auth: AuthRequest, username: str, ttl: int) -> str:
        now = self._clock()
        self._codes.prune(lambda code: code.expires_at <= now)
        code = secrets.token_urlsafe(32)
        self._codes.put(code, _Code(auth, username, ttl, now + self._code_ttl))
        return code

    async def _token(self, request: web.Request, issuer: str) -> web.Response:
        form = await self._form(request, oauth=True)
        try:
            params = single_valued(form.items())
        except _Refused as refused:
            raise _oauth_error("invalid_request", refused.body["reason"]) from None
        client_id = client_id_of(request.headers.getall("Authorization", []), params)
        grant_type = params.get("grant_type")
        if grant_type == "authorization_code":
            body = self._code_grant(params, client_id, issuer)
        elif grant_type == "refresh_token":
            body = self._refresh_grant(params, client_id, issuer)
        elif not grant_type:
            raise _oauth_error("invalid_request", "grant_type is required")
        else:
            raise _oauth_error("unsupported_grant_type", "use authorization_code or refresh_token")
        return web.json_response(body, headers=_NO_STORE)

    def _code_grant(self, params: Mapping[str, str], client_id: str, issuer: str) -> dict[str, Any]:
        code = params.get("code")
        if not code:
            raise _oauth_error("invalid_request", "code is required")
        grant = self._codes.pop(code)  # security: single use, gone from its first presentation
        if grant is None:
            # RFC 6749 4.1.2: a reused code revokes what it was exchanged for.
            issued = self._used_codes.pop(code)
            if issued is not None:
                self._refresh.pop(issued)
            raise _oauth_error("invalid_grant", "unknown, expired or already used code")
        auth = grant.request
        if self._clock() >= grant.expires_at:
            raise _oauth_error("invalid_grant", "code expired")
        if client_id != auth.client_id:
            raise _oauth_error("invalid_grant", "code was issued to another client")
        if params.get("redirect_uri") != auth.redirect_uri:
            raise _oauth_error("invalid_grant", "redirect_uri does not match the authorization")
        verifier = params.get("code_verifier")
        if auth.code_challenge is None:
            if verifier is not None:  # downgrade protection (OAuth 2.1 4.1.3)
                raise _oauth_error("invalid_grant", "code_verifier without code_challenge")
        elif not pkce_matches(verifier, auth.code_challenge):
            raise _oauth_error("invalid_grant", "code_verifier does not match")
        refresh_token = secrets.token_urlsafe(32)
        self._refresh.put(
            refresh_token, _Refresh(client_id, grant.username, auth.scope, grant.token_ttl)
        )
        self._used_codes.put(code, refresh_token)
        body = self._tokens(
            issuer, client_id, grant.username, auth.scope, auth.nonce, grant.token_ttl
        )
        return {**body, "refresh_token": refresh_token}

    def _refresh_grant(
        self, params: Mapping[str, str], client_id: str, issuer: str
    ) -> dict[str, Any]:
        token = params.get("refresh_token")
        if not token:
            raise _oauth_error("invalid_request", "refresh_token is required")
        grant = self._refresh.get(token)
        if grant is None or grant.client_id != client_id:
            raise _oauth_error("invalid_grant", "unknown refresh token")
        scope = grant.scope
        if "scope" in params:  # RFC 6749 6: may narrow, never widen
            scope = tuple(params["scope"].split())
            if not set(scope) <= set(grant.scope):
                raise _oauth_error("invalid_scope", "scope exceeds the original grant")
        return self._tokens(issuer, client_id, grant.username, scope, None, grant.token_ttl)

    def _tokens(
        self,
        issuer: str,
        client_id: str,
        username: str,
        scope: tuple[str, ...],
        nonce: str | None,
        ttl: int,
    ) -> dict[str, Any]:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": username,
            "aud": client_id,
            "iat": now,
            "exp": now + ttl,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if "email" in scope:
            claims["email"] = _email_for(username)
        id_token = jwt.encode({"alg": "RS256", "kid": self._key.kid}, claims, self._key)
        return {
            "access_token": secrets.token_urlsafe(32),
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": " ".join(scope),
            "id_token": id_token,
        }
