"""The built-in test OpenID Provider, driven over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.test_utils import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient
from support.builtin_provider import builtin_sidecar
from yarl import URL

from sidecar.oidc.test_provider import TestProvider

BASE = "/db/_oidc_testing"
CLIENT = "sync_gateway"
REDIRECT = "http://127.0.0.1:9/db/_oidc_callback?provider=test"
AUTH = {
    "client_id": CLIENT,
    "redirect_uri": REDIRECT,
    "response_type": "code",
    "scope": "openid email",
    "state": "st-123",
    "nonce": "n-456",
}

Client = TestClient[web.Request, web.Application]


@dataclass
class Clock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def provider(clock: Clock) -> TestProvider:
    return TestProvider(clock=clock, callback_urls=[REDIRECT])


async def _serve(aiohttp_client: AiohttpClient, provider: TestProvider) -> Client:
    app = web.Application(client_max_size=64 * 1024)
    app.add_routes(provider.routes())
    return await aiohttp_client(app)


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, provider: TestProvider) -> Client:
    return await _serve(aiohttp_client, provider)


def basic(client_id: str = CLIENT, secret: str = "anything") -> dict[str, str]:
    raw = f"{client_id}:{secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def login(client: Client, auth: dict[str, str] = AUTH, **fields: str) -> str:
    """Post the login form as a browser would; returns the code."""
    data = {**auth, "username": "alice", "tokenttl": "3600", "authenticated": "Sign in", **fields}
    response = await client.post(f"{BASE}/authenticate", data=data, allow_redirects=False)
    assert response.status == 302, await response.text()
    return URL(response.headers["Location"]).query["code"]


async def exchange(
    client: Client, code: str, *, headers: dict[str, str] | None = None, **form: str
) -> ClientResponse:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, **form}
    return await client.post(
        f"{BASE}/token", data=data, headers=basic() if headers is None else headers
    )


async def verify(client: Client, id_token: str) -> jwt.Token:
    """Check the id_token's signature against the provider's own JWKS."""
    certs = await (await client.get(f"{BASE}/certs")).json()
    return jwt.decode(id_token, KeySet.import_key_set(certs), algorithms=["RS256"])


def issuer_of(client: Client) -> str:
    return str(client.make_url(BASE))


# --- discovery and keys ---------------------------------------------------------------


async def test_discovery(client: Client) -> None:
    response = await client.get(f"{BASE}/.well-known/openid-configuration")
    assert response.status == 200
    doc = await response.json()
    issuer = issuer_of(client)
    assert doc["issuer"] == issuer
    assert doc["authorization_endpoint"] == f"{issuer}/authorize"
    assert doc["token_endpoint"] == f"{issuer}/token"
    assert doc["jwks_uri"] == f"{issuer}/certs"
    assert doc["response_types_supported"] == ["code"]
    assert doc["subject_types_supported"] == ["public"]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert set(doc["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "client_secret_post",
    }
    assert set(doc["grant_types_supported"]) == {"authorization_code", "refresh_token"}
    assert {"openid", "email"} <= set(doc["scopes_supported"])
    assert {"sub", "email", "nonce"} <= set(doc["claims_supported"])


async def test_discovery_under_public_url(aiohttp_client: AiohttpClient) -> None:
    client = await _serve(
        aiohttp_client,
        TestProvider(public_url="https://sync.example.com/", callback_urls=[REDIRECT]),
    )
    doc = await (await client.get(f"{BASE}/.well-known/openid-configuration")).json()
    assert doc["issuer"] == "https://sync.example.com/db/_oidc_testing"
    assert doc["token_endpoint"] == "https://sync.example.com/db/_oidc_testing/token"


@pytest.mark.parametrize(
    ("db", "issuer_path"),
    [("other-db", "/other-db"), ("a$b(c)+d", "/a$b(c)+d"), ("a%20b", "/a%20b")],
)
async def test_issuer_follows_the_database(client: Client, db: str, issuer_path: str) -> None:
    response = await client.get(f"/{db}/_oidc_testing/.well-known/openid-configuration")
    doc = await response.json()
    assert doc["issuer"] == f"http://{client.host}:{client.port}{issuer_path}/_oidc_testing"


async def test_certs_hold_only_the_public_key(client: Client) -> None:
    response = await client.get(f"{BASE}/certs")
    assert response.status == 200
    (key,) = (await response.json())["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    assert key["kid"] and key["n"] and key["e"]
    assert not {"d", "p", "q", "dp", "dq", "qi", "oth", "k"} & set(key)
    assert len(base64.urlsafe_b64decode(key["n"] + "==")) * 8 == 2048


async def test_each_provider_has_its_own_key() -> None:
    first, second = TestProvider().jwks()["keys"][0], TestProvider().jwks()["keys"][0]
    assert first["kid"] != second["kid"] and first["n"] != second["n"]


# --- authorize: the login form --------------------------------------------------------


async def test_authorize_answers_the_login_form(client: Client) -> None:
    response = await client.get(f"{BASE}/authorize", params=AUTH)
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    page = await response.text()
    assert '<form method="post" action="authenticate">' in page
    for key, value in AUTH.items():
        assert f'<input type="hidden" name="{key}" value="{value}">' in page
    assert 'name="username"' in page
    assert 'name="tokenttl" type="number" min="1" max="604800" value="3600"' in page
    assert 'name="authenticated"' in page and 'name="notauthenticated"' in page
    assert "Test provider" in page and "never enable it in production" in page


async def test_authorize_by_post(client: Client) -> None:
    response = await client.post(f"{BASE}/authorize", data=AUTH)
    assert response.status == 200
    assert 'name="state" value="st-123"' in await response.text()


async def test_authorize_escapes_every_echoed_value(client: Client) -> None:
    hostile = "\"><script>alert(1)</script><a x='y"
    params = {
        **AUTH,
        "client_id": f"<b>{hostile}",
        "state": hostile,
        "redirect_uri": 'http://127.0.0.1:9/db/_oidc_callback?x="><script>alert(1)</script>',
        f'extra"{hostile}': hostile,
    }
    response = await client.get(f"{BASE}/authorize", params=params)
    assert response.status == 200
    page = await response.text()
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;a x=&#x27;y"' in page


async def test_form_fields_are_not_echoed_as_hidden_inputs(client: Client) -> None:
    params = {**AUTH, "username": "mallory", "tokenttl": "1", "authenticated": "1"}
    page = await (await client.get(f"{BASE}/authorize", params=params)).text()
    assert "mallory" not in page and 'type="hidden" name="tokenttl"' not in page


# --- authenticate ----------------------------------------------------------------------


async def test_authenticated_redirects_with_code_and_state(client: Client) -> None:
    data = {**AUTH, "username": "alice", "authenticated": "1"}
    response = await client.post(f"{BASE}/authenticate", data=data, allow_redirects=False)
    assert response.status == 302
    assert response.headers["Cache-Control"] == "no-store"
    location = URL(response.headers["Location"])
    assert (location.scheme, location.host, location.port, location.path) == (
        "http",
        "127.0.0.1",
        9,
        "/db/_oidc_callback",
    )
    assert location.query["provider"] == "test"  # the redirect_uri's own query is kept
    assert location.query["state"] == "st-123"
    assert len(location.query["code"]) >= 43


async def test_authenticate_by_get_as_scripts_do(client: Client) -> None:
    params = {**AUTH, "username": "alice", "authenticated": "1"}
    response = await client.get(f"{BASE}/authenticate", params=params, allow_redirects=False)
    assert response.status == 302 and "code" in URL(response.headers["Location"]).query


async def test_notauthenticated_redirects_with_an_error(client: Client) -> None:
    data = {**AUTH, "username": "", "notauthenticated": "Cancel"}
    response = await client.post(f"{BASE}/authenticate", data=data, allow_redirects=False)
    assert response.status == 302
    query = URL(response.headers["Location"]).query
    assert query["error"] == "invalid_request"
    assert query["error_description"]
    assert query["state"] == "st-123"
    assert "code" not in query


async def test_no_state_no_state_echoed(client: Client) -> None:
    auth = {k: v for k, v in AUTH.items() if k != "state"}
    data = {**auth, "username": "alice"}
    response = await client.post(f"{BASE}/authenticate", data=data, allow_redirects=False)
    assert "state" not in URL(response.headers["Location"]).query


# --- token: authorization_code ---------------------------------------------------------


async def test_code_exchange_with_client_secret_basic(client: Client, clock: Clock) -> None:
    code = await login(client)
    response = await exchange(client, code)
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["access_token"] and body["refresh_token"]
    token = await verify(client, body["id_token"])
    assert token.header["alg"] == "RS256"
    certs = await (await client.get(f"{BASE}/certs")).json()
    assert token.header["kid"] == certs["keys"][0]["kid"]
    assert token.claims == {
        "iss": issuer_of(client),
        "sub": "alice",
        "aud": CLIENT,
        "iat": int(clock.now),
        "exp": int(clock.now) + 3600,
        "nonce": "n-456",
        "email": "alice@example.com",
    }


async def test_code_exchange_with_client_secret_post(client: Client) -> None:
    code = await login(client)
    response = await exchange(client, code, headers={}, client_id=CLIENT, client_secret="x")
    assert response.status == 200
    assert (await verify(client, (await response.json())["id_token"])).claims["aud"] == CLIENT


async def test_basic_credentials_are_form_urlencoded(client: Client) -> None:
    auth = {**AUTH, "client_id": "my client:1"}
    code = await login(client, auth)
    response = await exchange(client, code, headers=basic("my+client%3A1"))
    assert response.status == 200


@pytest.mark.parametrize(
    ("fields", "scope", "claims"),
    [
        ({"tokenttl": "120"}, "openid email", {"ttl": 120, "email": "alice@example.com"}),
        ({"tokenttl": ""}, "openid email", {"ttl": 3600, "email": "alice@example.com"}),
        ({"username": "bob@corp.example"}, "openid email", {"email": "bob@corp.example"}),
        ({}, "openid", {"email": None}),
        ({"username": "{bernard} o'neil"}, "openid", {"sub": "{bernard} o'neil"}),
    ],
)
async def test_id_token_claims(
    client: Client, fields: dict[str, str], scope: str, claims: dict[str, Any]
) -> None:
    code = await login(client, {**AUTH, "scope": scope}, **fields)
    body = await (await exchange(client, code)).json()
    token = (await verify(client, body["id_token"])).claims
    if "ttl" in claims:
        assert token["exp"] - token["iat"] == claims["ttl"] == body["expires_in"]
    if "email" in claims:
        assert token.get("email") == claims["email"]
    if "sub" in claims:
        assert token["sub"] == claims["sub"]


async def test_no_nonce_no_nonce_claim(client: Client) -> None:
    code = await login(client, {k: v for k, v in AUTH.items() if k != "nonce"})
    body = await (await exchange(client, code)).json()
    assert "nonce" not in (await verify(client, body["id_token"])).claims


async def test_pkce_right_verifier(client: Client) -> None:
    verifier, challenge = pkce_pair()
    auth = {**AUTH, "code_challenge": challenge, "code_challenge_method": "S256"}
    response = await exchange(client, await login(client, auth), code_verifier=verifier)
    assert response.status == 200


@pytest.mark.parametrize(
    "verifier",
    [None, "", "x" * 43, pkce_pair()[0], "a" * 42, "a" * 129, "é" * 43],
    ids=["missing", "empty", "wrong", "other", "short", "long", "non-ascii"],
)
async def test_pkce_wrong_verifier(client: Client, verifier: str | None) -> None:
    _, challenge = pkce_pair()
    auth = {**AUTH, "code_challenge": challenge, "code_challenge_method": "S256"}
    code = await login(client, auth)
    if verifier is None:
        response = await exchange(client, code)
    else:
        response = await exchange(client, code, code_verifier=verifier)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"


async def test_verifier_without_challenge_is_refused(client: Client) -> None:
    response = await exchange(client, await login(client), code_verifier=pkce_pair()[0])
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"


async def test_code_is_single_use_and_reuse_revokes_its_refresh_token(client: Client) -> None:
    code = await login(client)
    first = await exchange(client, code)
    refresh_token = (await first.json())["refresh_token"]
    again = await exchange(client, code)
    assert again.status == 400
    assert await again.json() == {
        "error": "invalid_grant",
        "error_description": "unknown, expired or already used code",
    }
    refreshed = await client.post(
        f"{BASE}/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers=basic(),
    )
    assert refreshed.status == 400
    assert (await refreshed.json())["error"] == "invalid_grant"


async def test_failed_exchange_still_consumes_the_code(client: Client) -> None:
    code = await login(client)
    assert (await exchange(client, code, redirect_uri="http://127.0.0.1:9/other")).status == 400
    assert (await exchange(client, code)).status == 400


async def test_expired_code(client: Client, clock: Clock) -> None:
    code = await login(client)
    clock.now += 60
    response = await exchange(client, code)
    assert response.status == 400
    assert await response.json() == {"error": "invalid_grant", "error_description": "code expired"}


async def test_code_just_before_expiry(client: Client, clock: Clock) -> None:
    code = await login(client)
    clock.now += 59.9
    assert (await exchange(client, code)).status == 200


@pytest.mark.parametrize(
    ("headers", "form"),
    [
        (basic("other-client"), {}),
        ({}, {"client_id": "other-client", "client_secret": "s"}),
        (basic(), {"redirect_uri": "http://127.0.0.1:9/db/_oidc_callback"}),
        (basic(), {"redirect_uri": ""}),
    ],
    ids=["basic-other-client", "post-other-client", "redirect-mismatch", "redirect-missing"],
)
async def test_code_bound_to_client_and_redirect(
    client: Client, headers: dict[str, str], form: dict[str, str]
) -> None:
    code = await login(client)
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, **form}
    data = {k: v for k, v in data.items() if v != ""}
    response = await client.post(f"{BASE}/token", data=data, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"


async def test_old_codes_are_evicted(aiohttp_client: AiohttpClient) -> None:
    client = await _serve(aiohttp_client, TestProvider(max_entries=2, callback_urls=[REDIRECT]))
    codes = [await login(client) for _ in range(3)]
    assert (await exchange(client, codes[0])).status == 400
    assert (await exchange(client, codes[1])).status == 200
    assert (await exchange(client, codes[2])).status == 200


# --- token: refresh_token --------------------------------------------------------------


async def _refresh(
    client: Client, token: str, *, headers: dict[str, str] | None = None, **form: str
) -> ClientResponse:
    data = {"grant_type": "refresh_token", "refresh_token": token, **form}
    return await client.post(
        f"{BASE}/token", data=data, headers=basic() if headers is None else headers
    )


async def test_refresh_grant(client: Client, clock: Clock) -> None:
    body = await (await exchange(client, await login(client, tokenttl="600"))).json()
    clock.now += 1000
    response = await _refresh(client, body["refresh_token"])
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    refreshed = await response.json()
    assert "refresh_token" not in refreshed
    assert refreshed["token_type"] == "Bearer" and refreshed["expires_in"] == 600
    claims = (await verify(client, refreshed["id_token"])).claims
    assert claims["sub"] == "alice" and claims["aud"] == CLIENT
    assert claims["iat"] == int(clock.now) and claims["exp"] == int(clock.now) + 600
    assert claims["email"] == "alice@example.com"
    assert "nonce" not in claims
    # refresh tokens are reusable: Sync Gateway's _oidc_refresh never hands out a new one
    assert (await _refresh(client, body["refresh_token"])).status == 200


async def test_refresh_may_narrow_but_not_widen_scope(client: Client) -> None:
    body = await (await exchange(client, await login(client))).json()
    narrow = await (await _refresh(client, body["refresh_token"], scope="openid")).json()
    assert "email" not in (await verify(client, narrow["id_token"])).claims
    wide = await _refresh(client, body["refresh_token"], scope="openid email profile")
    assert wide.status == 400
    assert (await wide.json())["error"] == "invalid_scope"


async def test_refresh_token_bound_to_its_client(client: Client) -> None:
    body = await (await exchange(client, await login(client))).json()
    response = await _refresh(client, body["refresh_token"], headers=basic("other"))
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"


# --- hostile input: every bad request gets a 4xx JSON answer ----------------------------


def _query(**overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {**AUTH, **overrides}
    return {k: v for k, v in params.items() if v is not None}


_, CHALLENGE = pkce_pair()

# (id, path, query, expected status)
BROWSER_GET_CASES: list[tuple[str, str, dict[str, str], int]] = [
    ("no-params", "authorize", {}, 400),
    ("scope-missing", "authorize", _query(scope=None), 400),
    ("scope-without-openid", "authorize", _query(scope="email profile"), 400),
    ("scope-openid-lookalike", "authorize", _query(scope="openidx"), 400),
    ("response-type-token", "authorize", _query(response_type="token"), 400),
    ("response-type-hybrid", "authorize", _query(response_type="code id_token"), 400),
    ("response-type-missing", "authorize", _query(response_type=None), 400),
    ("client-id-missing", "authorize", _query(client_id=None), 400),
    ("client-id-empty", "authorize", _query(client_id=""), 400),
    ("redirect-missing", "authorize", _query(redirect_uri=None), 400),
    ("redirect-javascript", "authorize", _query(redirect_uri="javascript:alert(1)"), 400),
    ("redirect-data", "authorize", _query(redirect_uri="data:text/html,<script>"), 400),
    ("redirect-relative", "authorize", _query(redirect_uri="/db/_oidc_callback"), 400),
    ("redirect-scheme-relative", "authorize", _query(redirect_uri="//evil.example/cb"), 400),
    ("redirect-ftp", "authorize", _query(redirect_uri="ftp://127.0.0.1/cb"), 400),
    ("redirect-no-host", "authorize", _query(redirect_uri="http:///cb"), 400),
    ("redirect-fragment", "authorize", _query(redirect_uri="http://127.0.0.1/cb#x"), 400),
    ("redirect-empty-fragment", "authorize", _query(redirect_uri="http://127.0.0.1/cb#"), 400),
    ("redirect-bad-port", "authorize", _query(redirect_uri="http://127.0.0.1:99999/"), 400),
    ("redirect-bad-ipv6", "authorize", _query(redirect_uri="http://[::1/cb"), 400),
    ("redirect-space", "authorize", _query(redirect_uri="http://127.0.0.1/a b"), 400),
    ("redirect-crlf", "authorize", _query(redirect_uri="http://127.0.0.1/\r\nX: y"), 400),
    (
        "pkce-plain",
        "authorize",
        _query(code_challenge=CHALLENGE, code_challenge_method="plain"),
        400,
    ),
    ("pkce-implicit-plain", "authorize", _query(code_challenge=CHALLENGE), 400),
    ("pkce-method-alone", "authorize", _query(code_challenge_method="S256"), 400),
    ("pkce-short", "authorize", _query(code_challenge="abc", code_challenge_method="S256"), 400),
    (
        "pkce-bad-chars",
        "authorize",
        _query(code_challenge="+" * 43, code_challenge_method="S256"),
        400,
    ),
    ("state-too-long", "authorize", _query(state="s" * 2049), 400),
    ("name-too-long", "authorize", {**AUTH, "k" * 65: "v"}, 400),
    ("too-many-params", "authorize", {**AUTH, **{f"p{i}": "v" for i in range(60)}}, 400),
    ("ok-weird-state", "authorize", _query(state="\x00%ff\ud7ff<>&"), 200),
    ("authn-username-missing", "authenticate", _query(), 400),
    ("authn-username-empty", "authenticate", _query(username=""), 400),
    ("authn-username-long", "authenticate", _query(username="u" * 257), 400),
    ("authn-username-max", "authenticate", _query(username="u" * 256), 302),
    ("authn-ttl-text", "authenticate", _query(username="a", tokenttl="abc"), 400),
    ("authn-ttl-zero", "authenticate", _query(username="a", tokenttl="0"), 400),
    ("authn-ttl-negative", "authenticate", _query(username="a", tokenttl="-1"), 400),
    ("authn-ttl-float", "authenticate", _query(username="a", tokenttl="1.5"), 400),
    ("authn-ttl-huge", "authenticate", _query(username="a", tokenttl="604801"), 400),
    ("authn-ttl-very-huge", "authenticate", _query(username="a", tokenttl="9" * 40), 400),
    ("authn-ttl-unicode-digit", "authenticate", _query(username="a", tokenttl="\u0663"), 400),
    ("authn-ttl-max", "authenticate", _query(username="a", tokenttl="604800"), 302),
    (
        "authn-bad-redirect",
        "authenticate",
        _query(username="a", redirect_uri="https://evil.example/#"),
        400,
    ),
    (
        "cancel-bad-redirect",
        "authenticate",
        _query(notauthenticated="1", redirect_uri="javascript:alert(1)"),
        400,
    ),
    ("cancel-no-openid", "authenticate", _query(notauthenticated="1", scope="email"), 400),
    # Never an open redirector: only the sidecar's own callback (or a configured one).
    ("redirect-foreign-host", "authorize", _query(redirect_uri="http://evil.example/cb"), 400),
    (
        "authn-foreign-host",
        "authenticate",
        _query(username="a", redirect_uri="http://evil.example/db/_oidc_callback"),
        400,
    ),
    (
        "cancel-foreign-host",
        "authenticate",
        _query(notauthenticated="1", redirect_uri="http://evil.example/db/_oidc_callback"),
        400,
    ),
    (
        "authn-other-port",
        "authenticate",
        _query(username="a", redirect_uri="http://127.0.0.1:10/db/_oidc_callback"),
        400,
    ),
    (
        "authn-other-path",
        "authenticate",
        _query(username="a", redirect_uri="http://127.0.0.1:9/db/_oidc_callback/x"),
        400,
    ),
    (
        "authn-other-db",
        "authenticate",
        _query(username="a", redirect_uri="http://127.0.0.1:9/other/_oidc_callback"),
        400,
    ),
    (
        "authn-https-instead",
        "authenticate",
        _query(username="a", redirect_uri="https://127.0.0.1:9/db/_oidc_callback"),
        400,
    ),
    (
        "authn-userinfo",
        "authenticate",
        _query(username="a", redirect_uri="http://evil.example@127.0.0.1:9/db/_oidc_callback"),
        400,  # user info: never the sidecar's own URL
    ),
    (
        "authn-loopback-alias",  # 127.0.0.1 and localhost are one machine
        "authenticate",
        _query(username="a", redirect_uri="http://localhost:9/db/_oidc_callback"),
        302,
    ),
    (
        "authn-configured-with-query",
        "authenticate",
        _query(username="a", redirect_uri="http://127.0.0.1:9/db/_oidc_callback?provider=x"),
        302,
    ),
]


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [case[1:] for case in BROWSER_GET_CASES],
    ids=[case[0] for case in BROWSER_GET_CASES],
)
async def test_hostile_browser_requests(
    client: Client, path: str, query: dict[str, str], status: int
) -> None:
    response = await client.get(f"{BASE}/{path}", params=query, allow_redirects=False)
    assert response.status == status, await response.text()
    if status == 400:
        body = await response.json()
        assert body["error"] == "Bad Request" and body["reason"]
        assert "Location" not in response.headers  # security: never redirect unvalidated
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


# (id, method, path, raw query, body, content type, expected status)
RAW_CASES: list[tuple[str, str, str, str, bytes | None, str | None, int]] = [
    ("repeated-scope", "GET", "authorize", "scope=openid&scope=openid", None, None, 400),
    (
        "repeated-across-query-and-form",
        "POST",
        "authorize",
        "state=a",
        b"state=b",
        "application/x-www-form-urlencoded",
        400,
    ),
    ("json-body", "POST", "authorize", "", b'{"scope":"openid"}', "application/json", 400),
    (
        "multipart-body",
        "POST",
        "authorize",
        "",
        b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nb\r\n--x--\r\n",
        "multipart/form-data; boundary=x",
        400,
    ),
    (
        "not-utf8-form",
        "POST",
        "authorize",
        "",
        b"scope=\xff\xfe",
        "application/x-www-form-urlencoded; charset=utf-8",
        400,
    ),
    ("too-large-form", "POST", "authorize", "", b"a=" + b"b" * 100_000, None, 413),
    ("put-authorize", "PUT", "authorize", "", None, None, 405),
    ("delete-certs", "DELETE", "certs", "", None, None, 405),
    ("post-discovery", "POST", ".well-known/openid-configuration", "", None, None, 405),
    ("get-token", "GET", "token", "", None, None, 405),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "content_type", "status"),
    [case[1:] for case in RAW_CASES],
    ids=[case[0] for case in RAW_CASES],
)
async def test_hostile_raw_requests(
    client: Client,
    method: str,
    path: str,
    query: str,
    body: bytes | None,
    content_type: str | None,
    status: int,
) -> None:
    url = f"{BASE}/{path}" + (f"?{query}" if query else "")
    headers = {"Content-Type": content_type or "application/x-www-form-urlencoded"}
    response = await client.request(
        method, url, data=body, headers=headers if body is not None else None
    )
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert "reason" in await response.json()


def _token_form(**overrides: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": "authorization_code",
        "code": "no-such-code",
        "redirect_uri": REDIRECT,
        **overrides,
    }
    return {k: v for k, v in form.items() if v is not None}


# (id, headers, body (dict: form-encoded; bytes: raw urlencoded), status, OAuth error code)
TOKEN_CASES: list[tuple[str, Any, Any, int, str]] = [
    ("no-client", {}, _token_form(), 401, "invalid_client"),
    ("post-empty-client-id", {}, _token_form(client_id=""), 401, "invalid_client"),
    ("bearer-scheme", {"Authorization": "Bearer x"}, _token_form(), 401, "invalid_client"),
    ("basic-garbage", {"Authorization": "Basic !!!"}, _token_form(), 401, "invalid_client"),
    ("basic-non-ascii", {"Authorization": "Basic é"}, _token_form(), 401, "invalid_client"),
    (
        "basic-no-colon",
        {"Authorization": "Basic " + base64.b64encode(b"sync_gateway").decode()},
        _token_form(),
        401,
        "invalid_client",
    ),
    (
        "basic-empty-id",
        {"Authorization": "Basic " + base64.b64encode(b":secret").decode()},
        _token_form(),
        401,
        "invalid_client",
    ),
    (
        "basic-not-utf8",
        {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()},
        _token_form(),
        401,
        "invalid_client",
    ),
    ("basic-and-post", basic(), _token_form(client_secret="s"), 400, "invalid_request"),
    ("basic-other-form-id", basic(), _token_form(client_id="other"), 401, "invalid_client"),
    (
        "two-authorization-headers",
        CIMultiDict([("Authorization", basic()["Authorization"])] * 2),
        _token_form(),
        400,
        "invalid_request",
    ),
    ("grant-type-missing", basic(), _token_form(grant_type=None), 400, "invalid_request"),
    (
        "grant-type-password",
        basic(),
        _token_form(grant_type="password"),
        400,
        "unsupported_grant_type",
    ),
    (
        "grant-type-implicit",
        basic(),
        _token_form(grant_type="implicit"),
        400,
        "unsupported_grant_type",
    ),
    ("code-missing", basic(), _token_form(code=None), 400, "invalid_request"),
    ("code-unknown", basic(), _token_form(), 400, "invalid_grant"),
    ("code-long", basic(), _token_form(code="c" * 2048), 400, "invalid_grant"),
    ("code-too-long", basic(), _token_form(code="c" * 2049), 400, "invalid_request"),
    (
        "refresh-missing",
        basic(),
        _token_form(grant_type="refresh_token", code=None),
        400,
        "invalid_request",
    ),
    (
        "refresh-unknown",
        basic(),
        {"grant_type": "refresh_token", "refresh_token": "nope"},
        400,
        "invalid_grant",
    ),
    ("repeated-grant-type", basic(), b"grant_type=a&grant_type=b", 400, "invalid_request"),
    ("not-utf8", basic(), b"grant_type=\xff", 400, "invalid_request"),
]


@pytest.mark.parametrize(
    ("headers", "body", "status", "error"),
    [case[1:] for case in TOKEN_CASES],
    ids=[case[0] for case in TOKEN_CASES],
)
async def test_hostile_token_requests(
    client: Client, headers: Any, body: Any, status: int, error: str
) -> None:
    if isinstance(body, bytes):
        headers = CIMultiDict(headers)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    response = await client.post(f"{BASE}/token", data=body, headers=headers)
    assert response.status == status, await response.text()
    answer = await response.json()
    assert answer["error"] == error and answer["error_description"]
    assert response.headers["Cache-Control"] == "no-store"
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Basic ")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"grant_type":"authorization_code"}', "application/json"),
        (b"", None),
        (b"grant_type=authorization_code", "text/plain"),
    ],
    ids=["json", "no-body", "text-plain"],
)
async def test_token_requires_a_form_body(
    client: Client, body: bytes, content_type: str | None
) -> None:
    headers = {**basic(), **({"Content-Type": content_type} if content_type else {})}
    response = await client.post(f"{BASE}/token", data=body or None, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_token_body_too_large(client: Client) -> None:
    response = await client.post(
        f"{BASE}/token", data={"grant_type": "x" * 100_000}, headers=basic()
    )
    assert response.status == 413
    assert response.content_type == "application/json"


# --- mounted in the sidecar: codes only for the sidecar's own callback -------------------------


@pytest.mark.parametrize(
    ("redirect_uri", "status"),
    [
        ("{base}/db/_oidc_callback", 302),
        ("{base}/db/_oidc_callback?provider=test", 302),
        ("https://sync.example.com/cb", 302),  # a provider's configured callback_url
        ("http://evil.example/cb", 400),
        ("http://evil.example/db/_oidc_callback", 400),
        ("{base}/other/_oidc_callback", 400),
        ("{base}/db/_oidc_callback/../../evil", 400),
        ("https://sync.example.com/cb/x", 400),
    ],
)
async def test_mounted_provider_redirects_only_to_the_sidecars_callbacks(
    redirect_uri: str, status: int
) -> None:
    async with builtin_sidecar(callback_url="https://sync.example.com/cb") as sidecar:
        params = {**AUTH, "redirect_uri": redirect_uri.format(base=sidecar.url)}
        async with ClientSession() as http:
            async with http.post(
                f"{sidecar.url}/db/_oidc_testing/authenticate",
                params=params,
                data={"username": "alice", "authenticated": "1"},
                allow_redirects=False,
            ) as response:
                assert response.status == status, await response.text()
                if status == 400:
                    assert "Location" not in response.headers
                    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_self_hosted_discovery_waits_for_the_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`make run`'s first screen: the sidecar discovers the built-in provider from itself. Its
    first attempt waits until the listener is up (the lifecycle says so), instead of being
    refused and logging WARNINGs: here the listener opens only after a pause, and no
    attempt, hence no warning, happens before."""
    import asyncio

    from support.redis_server import free_port

    from sidecar import keys
    from sidecar.app import create_app, make_runner
    from sidecar.config import parse_settings

    port = free_port()
    issuer = f"http://127.0.0.1:{port}/db/_oidc_testing"
    settings = parse_settings(
        {
            "interface": f"127.0.0.1:{port}",
            "demo_upstream": True,
            "unsupported": {"oidc_test_provider": {"enabled": True}},
            "databases": {
                "db": {"oidc": {"providers": {"test": {"issuer": issuer, "client_id": "c"}}}}
            },
        }
    )
    app = create_app(settings)
    runner = make_runner(app, shutdown_timeout=1)
    await runner.setup()  # the refreshers start here
    try:
        await asyncio.sleep(0.5)  # before: refused twice, backoff 0.25 s, a WARNING each time
        (provider,) = next(app[keys.DATABASES].registries()).providers
        assert provider.discovery_fetches == 0
        await web.TCPSite(runner, "127.0.0.1", port).start()
        app[keys.LIFECYCLE].listening.set()
        for _ in range(200):
            if provider.ready:
                break
            await asyncio.sleep(0.025)
        assert provider.ready and provider.discovery_fetches == 1
    finally:
        await runner.cleanup()
    failures = [r for r in caplog.records if "refresh failed" in r.getMessage()]
    assert failures == []
