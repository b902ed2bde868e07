"""Proves the oidc-provider peer (tests/peers/op) issues genuine tokens the way other tests expect."""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet
from support.op import (
    OPClient,
    OpenIDProvider,
    authorize_url,
    browser_login,
    get_tokens,
    pkce_pair,
    refresh_tokens,
    token_request,
)

CALLBACK = "http://127.0.0.1:9/db/_oidc_callback"
BASIC = OPClient("basic-client", "basic-secret", (CALLBACK,))
POST = OPClient(
    "post-client", "post-secret", (CALLBACK,), token_endpoint_auth_method="client_secret_post"
)
ALG_CLIENTS = {
    alg: OPClient(
        f"{alg.lower()}-client", "alg-secret", (CALLBACK,), id_token_signed_response_alg=alg
    )
    for alg in ("ES256", "PS256", "EdDSA", "Ed25519")
}
USERS = {"carol": {"roles": ["admin"], "groups": ["ops"], "email": None}}


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def op() -> Iterator[OpenIDProvider]:
    with OpenIDProvider(clients=[BASIC, POST, *ALG_CLIENTS.values()], users=USERS) as provider:
        yield provider


@pytest.fixture(scope="module")
def jwks(op: OpenIDProvider) -> KeySet:
    return KeySet.import_key_set(fetch_json(op.jwks_uri))


def decode(id_token: str, jwks: KeySet, alg: str = "RS256") -> jwt.Token:
    return jwt.decode(id_token, jwks, algorithms=[alg])


def test_discovery_document(op: OpenIDProvider) -> None:
    doc = fetch_json(op.discovery_url)
    assert doc["issuer"] == op.issuer == f"http://127.0.0.1:{op.port}"
    assert doc["authorization_endpoint"] == op.authorization_endpoint
    assert doc["token_endpoint"] == op.token_endpoint
    assert doc["jwks_uri"] == op.jwks_uri
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert {"RS256", "PS256", "ES256", "EdDSA", "Ed25519"} <= set(
        doc["id_token_signing_alg_values_supported"]
    )
    assert {"client_secret_basic", "client_secret_post"} <= set(
        doc["token_endpoint_auth_methods_supported"]
    )


def test_jwks_has_public_rsa_ec_and_okp_keys(op: OpenIDProvider) -> None:
    keys = fetch_json(op.jwks_uri)["keys"]
    assert sorted(key["kty"] for key in keys) == ["EC", "OKP", "RSA"]
    assert all(key["kid"] and key["use"] == "sig" for key in keys)
    assert not any("d" in key or "p" in key for key in keys)  # no private parts published


async def test_code_flow_yields_id_token_with_claims_and_refresh_token(
    op: OpenIDProvider, jwks: KeySet
) -> None:
    nonce = secrets.token_urlsafe(8)
    tokens = await get_tokens(op, BASIC, "alice", scope="openid email", nonce=nonce)
    assert tokens["token_type"] == "Bearer"
    assert tokens["access_token"] and tokens["refresh_token"]
    token = decode(tokens["id_token"], jwks)
    assert token.header["alg"] == "RS256"
    claims = token.claims
    assert claims["iss"] == op.issuer
    assert claims["aud"] == BASIC.client_id
    assert claims["sub"] == "alice"
    assert claims["nonce"] == nonce
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["roles"] == ["editor"]
    assert claims["channels"] == ["news", "sports"]
    assert claims["employee_number"] == 80249751
    assert claims["exp"] - claims["iat"] == 3600


async def test_scopes_gate_standard_claims(op: OpenIDProvider, jwks: KeySet) -> None:
    tokens = await get_tokens(op, BASIC, "dave", scope="openid profile")
    claims = decode(tokens["id_token"], jwks).claims
    assert "email" not in claims
    assert claims["preferred_username"] == "dave"
    assert claims["roles"] == [] and claims["channels"] == []
    assert isinstance(claims["employee_number"], int)


async def test_per_user_claim_overrides(op: OpenIDProvider, jwks: KeySet) -> None:
    tokens = await get_tokens(op, BASIC, "carol", scope="openid email")
    claims = decode(tokens["id_token"], jwks).claims
    assert claims["sub"] == "carol"
    assert claims["roles"] == ["admin"]
    assert claims["groups"] == ["ops"]
    assert "email" not in claims  # null override removes the claim


async def test_refresh_grant_rotates_the_refresh_token(op: OpenIDProvider, jwks: KeySet) -> None:
    first = await get_tokens(op, BASIC, "alice", scope="openid email")
    second = await refresh_tokens(op, BASIC, first["refresh_token"])
    claims = decode(second["id_token"], jwks).claims
    assert (claims["sub"], claims["aud"], claims["email"]) == (
        "alice",
        BASIC.client_id,
        "alice@example.com",
    )
    assert second["refresh_token"] != first["refresh_token"]
    status, body = await token_request(
        op, BASIC, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_client_secret_post_client(op: OpenIDProvider, jwks: KeySet) -> None:
    tokens = await get_tokens(op, POST, "alice")
    assert decode(tokens["id_token"], jwks).claims["aud"] == POST.client_id
    # oidc-provider treats client_secret_basic and _post as one method, so only the secret counts.
    wrong_secret = OPClient(
        POST.client_id, "wrong", POST.redirect_uris, token_endpoint_auth_method="client_secret_post"
    )
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    status, body = await token_request(op, wrong_secret, form)
    assert (status, body["error"]) == (401, "invalid_client")


@pytest.mark.parametrize("alg", sorted(ALG_CLIENTS))
async def test_client_gets_id_token_signed_with_its_alg(
    op: OpenIDProvider, jwks: KeySet, alg: str
) -> None:
    tokens = await get_tokens(op, ALG_CLIENTS[alg], "alice")
    if alg == "EdDSA":  # RFC 9864 deprecates the polymorphic name; joserfc still verifies it
        with pytest.warns(SecurityWarning, match="EdDSA is deprecated"):
            token = decode(tokens["id_token"], jwks, alg)
    else:
        token = decode(tokens["id_token"], jwks, alg)
    assert token.header["alg"] == alg
    assert token.claims["aud"] == ALG_CLIENTS[alg].client_id


async def test_denied_consent_redirects_with_access_denied(op: OpenIDProvider) -> None:
    _, challenge = pkce_pair()
    url = authorize_url(op, BASIC, scope="openid", state="s1", code_challenge=challenge)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        callback = await browser_login(session, url, username="alice", consent=False)
    assert str(callback.with_query(None)) == CALLBACK
    assert callback.query["error"] == "access_denied"
    assert callback.query["state"] == "s1"


async def test_second_login_in_same_browser_skips_the_forms(op: OpenIDProvider) -> None:
    _, challenge = pkce_pair()
    url = authorize_url(op, BASIC, scope="openid", state="s2", code_challenge=challenge)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        first = await browser_login(session, url, username="alice")
        again = await browser_login(session, url, username="ignored")
    assert "code" in first.query and "code" in again.query
    assert first.query["code"] != again.query["code"]


async def test_wrong_pkce_verifier_is_rejected(op: OpenIDProvider) -> None:
    _, challenge = pkce_pair()
    url = authorize_url(op, BASIC, scope="openid", state="s3", code_challenge=challenge)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        callback = await browser_login(session, url, username="alice")
    other_verifier, _ = pkce_pair()
    form = {
        "grant_type": "authorization_code",
        "code": callback.query["code"],
        "redirect_uri": CALLBACK,
        "code_verifier": other_verifier,
    }
    status, body = await token_request(op, BASIC, form)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_client_registered_at_run_time(op: OpenIDProvider, jwks: KeySet) -> None:
    late = OPClient("late-client", "late-secret", ("http://127.0.0.1:10/cb",))
    op.register_client(late)
    tokens = await get_tokens(op, late, "alice")
    assert decode(tokens["id_token"], jwks).claims["aud"] == "late-client"


def test_peer_exits_when_stdin_closes() -> None:
    provider = OpenIDProvider().start()
    process, discovery = provider._process, provider.discovery_url
    assert process is not None and process.stdin is not None
    process.stdin.close()
    assert process.wait(timeout=10) == 0
    provider.stop()
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(discovery, timeout=2)


async def test_non_rotating_refresh_and_short_id_token_ttl() -> None:
    async with OpenIDProvider(clients=[BASIC], rotate_refresh_tokens=False, id_token_ttl=120) as op:
        jwks = KeySet.import_key_set(fetch_json(op.jwks_uri))
        first = await get_tokens(op, BASIC, "alice")
        claims = decode(first["id_token"], jwks).claims
        assert claims["exp"] - claims["iat"] == 120
        second = await refresh_tokens(op, BASIC, first["refresh_token"])
        third = await refresh_tokens(op, BASIC, first["refresh_token"])
        assert first["refresh_token"] == second["refresh_token"] == third["refresh_token"]
