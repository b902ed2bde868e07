"""The authenticating proxy end to end: genuine ID tokens from the real OP, forged and hostile
tokens, session cookies, and revocation closing websockets — real sockets, upstream and stores.

Every rejected request is also checked at the upstream: it must have received nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import WSMsgType
from conftest import KeyServer, RawAnswer, admin_session, raw_http
from joserfc.jwk import RSAKey
from support import jwt_factory
from support.jwt_factory import SigningKey, b64, b64json, make_key, mint, mint_hs256, mint_unsigned
from support.op import OPClient, OpenIDProvider, get_tokens
from support.redis_server import RedisServer, free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar
from yarl import URL

from sidecar import keys

CLIENT = OPClient(f"auth-{secrets.token_hex(4)}", "auth-secret", ("http://127.0.0.1:9/cb",))
OTHER = OPClient(f"auth-other-{secrets.token_hex(4)}", "other-secret", ("http://127.0.0.1:9/cb",))
FORGED = "forged-client"  # the client id the key-server provider is configured with
COOKIE = "SyncGatewaySession"


# --------------------------------------------------------------------------- environment


@pytest.fixture(scope="module")
def registered(op: OpenIDProvider) -> OpenIDProvider:
    op.register_client(CLIENT)
    op.register_client(OTHER)
    return op


def databases(op: OpenIDProvider, ks: KeyServer) -> dict[str, Any]:
    """One database per username rule, all trusting the same OP client, plus the key server."""
    real = {"issuer": op.issuer, "client_id": CLIENT.client_id}
    forged = {"issuer": ks.issuer, "client_id": FORGED, "register": True, "user_prefix": "ks"}
    grants = {"roles_claim": "roles", "channels_claim": "channels"}

    def one(**provider: Any) -> dict[str, Any]:
        return {"oidc": {"providers": {"op": provider}}}

    return {
        "db": one(**real, register=True, **grants),
        "prefixed": one(**real, register=True, user_prefix="op"),
        "byemail": one(**real, register=True, username_claim="email"),
        "bynumber": one(**real, register=True, username_claim="employee_number", user_prefix="emp"),
        "closed": one(**real, register=False, user_prefix="op", **grants),
        "forged": {"oidc": {"providers": {"ks": {**forged, **grants}}}},
        "multi": {
            "oidc": {
                "default_provider": "op",
                "providers": {"op": {**real, "register": True, "user_prefix": "op"}, "ks": forged},
            }
        },
    }


@dataclass
class Env:
    sidecar: Sidecar
    upstream: Upstream
    op: OpenIDProvider
    ks: KeyServer

    @property
    def url(self) -> str:
        return self.sidecar.url

    @property
    def admin_url(self) -> str:
        return self.sidecar.admin_url

    async def raw(
        self, target: str, headers: Sequence[tuple[str | bytes, str | bytes]]
    ) -> RawAnswer:
        return await raw_http(self.sidecar.port, target, headers=headers)

    async def get(self, path: str, **headers: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + path, headers=headers) as r:
            body = await r.read()
            assert "Set-Cookie" not in r.headers  # a bearer token alone never creates a session
            return r.status, json.loads(body) if body else None

    async def admin_user(self, db: str, name: str) -> tuple[int, Any]:
        url = URL(f"{self.admin_url}/{db}/_user/{quote(name, safe='')}", encoded=True)
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            return r.status, await r.json()

    async def admin(self, method: str, path: str, body: Any = None) -> int:
        async with aiohttp.ClientSession() as http:
            url = URL(self.admin_url + path, encoded=True)
            async with http.request(method, url, json=body) as r:
                return r.status

    async def token(self, username: str = "alice", client: OPClient = CLIENT) -> str:
        tokens = await get_tokens(self.op, client, username)
        return str(tokens["id_token"])


@contextlib.asynccontextmanager
async def start_env(
    op: OpenIDProvider, ks: KeyServer, upstream: Upstream, **settings: Any
) -> AsyncIterator[Env]:
    config = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        databases=databases(op, ks),
        **settings,
    )
    async with running_sidecar(config) as sidecar:
        yield Env(sidecar, upstream, op, ks)


@pytest.fixture
async def env(
    registered: OpenIDProvider, key_server: KeyServer, upstream: Upstream
) -> AsyncIterator[Env]:
    async with start_env(registered, key_server, upstream) as value:
        yield value


def only(upstream: Upstream, name: str, index: int = 0) -> str:
    """The single value of a header at the upstream (identity headers must never repeat)."""
    values = upstream.header(index, name)
    assert len(values) == 1, values
    return values[0]


def token_failures(env: Env) -> dict[str, float]:
    """sidecar_token_validation_failures_total by reason, as /_metrics would show it."""
    metric = env.sidecar.app[keys.METRICS].token_failures
    return {
        sample.labels["reason"]: sample.value
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def assert_rejected(answer: RawAnswer, status: int, upstream: Upstream) -> None:
    assert answer.status == status, answer.body[:300]
    assert upstream.requests == []  # security: nothing of a rejected request reaches upstream
    if answer.header("Content-Type") == ["application/json; charset=utf-8"]:
        assert set(answer.json()) == {"error", "reason"}
    else:  # only aiohttp's own parser answers in plain text, and only with a 400
        assert status == 400


# --------------------------------------------------------------------------- bearer: genuine tokens


@pytest.mark.parametrize(
    ("db", "name", "roles", "channels"),
    [
        # no prefix, no claim: the issuer's host+path, query-escaped, is the prefix
        ("db", "127.0.0.1%3A{port}_alice", "editor", "news,sports"),
        ("prefixed", "op_alice", None, None),
        ("byemail", "alice%40example.com", None, None),
        ("bynumber", "emp_80249751", None, None),  # numeric claim printed plainly
    ],
)
async def test_genuine_token_is_forwarded_with_identity(
    env: Env, db: str, name: str, roles: str | None, channels: str | None
) -> None:
    name = name.format(port=env.op.port)
    token = await env.token("alice")
    status, body = await env.get(f"/{db}/doc?x=1", Authorization=f"Bearer {token}")
    assert status == 200, body
    assert body["path"] == f"/{db}/doc?x=1"
    up = env.upstream
    user = only(up, "X-Forwarded-User")
    assert user == name  # exactly the name /_session reports, never escaped twice
    assert only(up, "X-Forwarded-Email") == "alice@example.com"
    assert up.header(0, "X-Forwarded-Roles") == ([roles] if roles else [])
    assert up.header(0, "X-Forwarded-Channels") == ([channels] if channels else [])
    assert up.header(0, "Authorization") == []
    # register: true created the user, visible on the admin API with its token grants
    status, user_doc = await env.admin_user(db, name)
    assert status == 200
    assert user_doc["name"] == name
    assert user_doc["email"] == "alice@example.com"
    assert user_doc["jwt_issuer"] == env.op.issuer
    assert user_doc["jwt_roles"] == (["editor"] if roles else [])
    assert user_doc["jwt_channels"] == (channels.split(",") if channels else [])


async def test_identity_header_encoding_is_pinned(env: Env) -> None:
    status, _ = await env.get("/db/x", Authorization=f"Bearer {await env.token()}")
    assert status == 200
    # Sync Gateway's query-escaped name as is: not "127.0.0.1%253A..." (escaped twice)
    assert only(env.upstream, "X-Forwarded-User") == f"127.0.0.1%3A{env.op.port}_alice"


@pytest.mark.parametrize(
    "value", ["Bearer {t}", "bearer {t}", "BEARER {t}", "Bearer   {t}", "  Bearer {t}  "]
)
async def test_bearer_scheme_is_case_insensitive(env: Env, value: str) -> None:
    token = await env.token()
    answer = await env.raw("/prefixed/x", [("Authorization", value.format(t=token))])
    assert answer.status == 200
    assert only(env.upstream, "X-Forwarded-User") == "op_alice"


async def test_register_false_unknown_user_is_401(env: Env) -> None:
    status, body = await env.get("/closed/x", Authorization=f"Bearer {await env.token('dave')}")
    assert (status, body) == (401, {"error": "Unauthorized", "reason": "Invalid login"})
    assert env.upstream.requests == []
    assert (await env.admin_user("closed", "op_dave"))[0] == 404  # not created


async def test_register_false_known_user_gets_admin_and_token_grants(env: Env) -> None:
    body = {"admin_roles": ["staff"], "admin_channels": ["hq"]}
    assert await env.admin("PUT", "/closed/_user/op_alice", body) == 201
    status, _ = await env.get("/closed/x", Authorization=f"Bearer {await env.token('alice')}")
    assert status == 200
    assert only(env.upstream, "X-Forwarded-User") == "op_alice"
    assert only(env.upstream, "X-Forwarded-Roles") == "editor,staff"
    assert only(env.upstream, "X-Forwarded-Channels") == "hq,news,sports"


async def test_disabled_user_is_refused_even_with_a_fresh_token(env: Env) -> None:
    assert await env.admin("PUT", "/prefixed/_user/op_erin", {"disabled": True}) == 201
    status, body = await env.get("/prefixed/x", Authorization=f"Bearer {await env.token('erin')}")
    assert (status, body["reason"]) == (401, "Invalid login")
    assert env.upstream.requests == []


async def test_multi_provider_database_picks_by_issuer_and_audience(env: Env) -> None:
    status, _ = await env.get("/multi/a", Authorization=f"Bearer {await env.token('alice')}")
    assert status == 200
    status, _ = await env.get("/multi/b", Authorization=f"Bearer {env.ks.token(FORGED)}")
    assert status == 200
    assert [only(env.upstream, "X-Forwarded-User", i) for i in (0, 1)] == [
        "op_alice",
        "ks_user-123",
    ]
    # matching neither provider (issuer of one, audience of the other) → 401, nothing sent
    env.upstream.requests.clear()
    crossed = env.ks.token(CLIENT.client_id)
    status, _ = await env.get("/multi/c", Authorization=f"Bearer {crossed}")
    assert status == 401
    assert env.upstream.requests == []


# --------------------------------------------------------------------------- bearer: hostile tokens


@dataclass
class Ctx:
    """What hostile rows are built from: genuine tokens and the OP's published keys."""

    token: str  # a genuine ID token for CLIENT (alice)
    other: str  # a genuine ID token for another client of the same OP
    jwks: dict[str, Any]
    ks: KeyServer

    @property
    def parts(self) -> list[str]:
        return self.token.split(".")

    @property
    def claims(self) -> dict[str, Any]:
        payload = self.parts[1]
        claims: dict[str, Any] = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
        return claims

    @property
    def rsa(self) -> dict[str, Any]:
        return next(k for k in self.jwks["keys"] if k["kty"] == "RSA")

    @property
    def rsa_pem(self) -> bytes:
        return RSAKey.import_key(self.rsa).as_pem(private=False)

    def look_alike_key(self) -> SigningKey:
        """A key of our own under the OP's RSA kid: a second OP reusing a kid."""
        return make_key("RS256", self.rsa["kid"])

    def with_payload(self, **changes: Any) -> str:
        header, _, signature = self.parts
        return f"{header}.{b64json({**self.claims, **changes})}.{signature}"

    def flip_signature(self) -> str:
        header, payload, signature = self.parts
        middle = len(signature) // 2
        flipped = "B" if signature[middle] != "B" else "C"
        return f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


Build = Callable[[Ctx], list[tuple[str, str]]]


def bearer(make: Callable[[Ctx], str]) -> Build:
    return lambda c: [("Authorization", "Bearer " + make(c))]


def auth(make: Callable[[Ctx], str]) -> Build:
    return lambda c: [("Authorization", make(c))]


def ks_signed(c: Ctx, **header: Any) -> str:
    """The real OP's claims, signed by a key the OP never published (the key server's)."""
    key = c.ks.key
    return mint(key, c.claims, header=jwt_factory.header_for(key, **header))


# (id, Authorization headers, status, the token-validation failure it must be rejected for:
# None when the request is refused before any token is validated)
HOSTILE_OP_TOKENS: list[tuple[str, Build, int, str | None]] = [
    ("alg-none", bearer(lambda c: mint_unsigned(c.claims)), 401, "alg"),
    (
        "alg-none-with-kid",
        bearer(lambda c: mint_unsigned(c.claims, {"alg": "none", "kid": c.rsa["kid"]})),
        401,
        "alg",
    ),
    (
        "alg-None-capitalised",
        bearer(lambda c: mint_unsigned(c.claims, {"alg": "None"})),
        401,
        "alg",
    ),
    (
        "hs256-with-public-pem",
        bearer(lambda c: mint_hs256(c.rsa_pem, c.claims, {"alg": "HS256", "kid": c.rsa["kid"]})),
        401,
        "alg",
    ),
    (
        "hs256-with-public-jwk",
        bearer(
            lambda c: mint_hs256(
                json.dumps(c.rsa).encode(), c.claims, {"alg": "HS256", "kid": c.rsa["kid"]}
            )
        ),
        401,
        "alg",
    ),
    ("tampered-signature", bearer(lambda c: c.flip_signature()), 401, "signature"),
    ("tampered-payload-sub", bearer(lambda c: c.with_payload(sub="bob")), 401, "signature"),
    (
        "tampered-payload-exp",
        bearer(lambda c: c.with_payload(exp=c.claims["exp"] + 1)),
        401,
        "signature",
    ),
    ("signature-stripped", bearer(lambda c: ".".join(c.parts[:2]) + "."), 401, "signature"),
    ("two-parts-only", bearer(lambda c: ".".join(c.parts[:2])), 401, "malformed"),
    ("token-of-another-client", bearer(lambda c: c.other), 401, "audience"),
    ("second-op-same-kid", bearer(lambda c: mint(c.look_alike_key(), c.claims)), 401, "signature"),
    ("unknown-kid", bearer(lambda c: ks_signed(c, kid="no-such-kid")), 401, "unknown_kid"),
    ("jku-header", bearer(lambda c: ks_signed(c, jku=c.ks.issuer + "/jwks")), 401, "header"),
    ("jwk-header", bearer(lambda c: ks_signed(c, jwk=c.ks.key.public_jwk())), 401, "header"),
    ("x5u-header", bearer(lambda c: ks_signed(c, x5u=c.ks.issuer + "/cert.pem")), 401, "header"),
    ("jwe-shaped", bearer(lambda c: "a.b.c.d.e"), 401, "malformed"),
    ("garbage", bearer(lambda c: "not-a-token"), 401, "malformed"),
    (
        "header-only-garbage",  # no kid, one RSA key: verified against it, and fails
        bearer(lambda c: b64json({"alg": "RS256"}) + ".e30.c2ln"),
        401,
        "signature",
    ),
    ("long-but-parsable", bearer(lambda c: "A" * 8000), 401, "malformed"),
    # refused by the Authorization parser (RFC 6750 2.1 b64token), before any validation
    ("illegal-characters", bearer(lambda c: c.token + "$"), 401, None),
    ("two-tokens-one-header", bearer(lambda c: f"{c.token} {c.token}"), 401, None),
    ("comma-joined", bearer(lambda c: f"{c.token}, Bearer {c.token}"), 401, None),
    ("empty-authorization", auth(lambda c: ""), 401, None),
    ("bearer-without-token", auth(lambda c: "Bearer"), 401, None),
    ("bearer-only-spaces", auth(lambda c: "Bearer     "), 401, None),
    ("scheme-missing", auth(lambda c: c.token), 401, None),
    ("basic", auth(lambda c: "Basic " + b64("alice:secret")), 401, None),
    ("basic-with-token", auth(lambda c: "Basic " + c.token), 401, None),
    ("tab-separated", auth(lambda c: "Bearer\t" + c.token), 401, None),
    (
        "two-authorization-headers",
        lambda c: [("Authorization", f"Bearer {c.token}")] * 2,
        400,
        None,
    ),
    (
        "second-authorization-garbage",
        lambda c: [("Authorization", f"Bearer {c.token}"), ("Authorization", "Bearer x")],
        400,
        None,
    ),
    # ID tokens up to 16 KiB are read (big group claims); past the parser's 24 KiB line
    # limit the header is refused before any handler runs.
    ("huge-token", bearer(lambda c: "A" * 10_000), 401, "malformed"),
    ("oversized-header", bearer(lambda c: "A" * 30_000), 400, None),
    ("forwarded-user-only", lambda c: [("X-Forwarded-User", "op_alice")], 401, None),
]


@pytest.fixture
async def ctx(env: Env) -> Ctx:
    async with aiohttp.ClientSession() as http, http.get(env.op.jwks_uri) as r:
        jwks = await r.json()
    return Ctx(await env.token("alice"), await env.token("alice", OTHER), jwks, env.ks)


@pytest.mark.parametrize(
    ("build", "status", "code"),
    [pytest.param(build, status, code, id=name) for name, build, status, code in HOSTILE_OP_TOKENS],
)
async def test_hostile_bearer_against_the_real_op(
    ctx: Ctx, env: Env, build: Build, status: int, code: str | None
) -> None:
    answer = await env.raw("/prefixed/doc", build(ctx))
    assert_rejected(answer, status, env.upstream)
    assert token_failures(env) == ({code: 1.0} if code else {})


async def test_token_in_query_string_is_not_a_credential(ctx: Ctx, env: Env) -> None:
    answer = await env.raw(f"/prefixed/doc?access_token={ctx.token}", [])
    assert_rejected(answer, 401, env.upstream)


def forged_header(ks: KeyServer, **changes: Any) -> dict[str, Any]:
    return jwt_factory.header_for(ks.key, **changes)


# Tokens signed by a key the sidecar trusts (the key server's): each row breaks one rule only.
ForgedBuild = Callable[[KeyServer], str]
NOW = time.time


def hs256_with_ks_public_key(ks: KeyServer) -> str:
    pem = RSAKey.import_key(ks.key.public_jwk()).as_pem(private=False)
    return mint_hs256(pem, ks.claims(FORGED), {"alg": "HS256", "kid": ks.key.kid})


def raw_payload(ks: KeyServer, payload: bytes) -> str:
    return mint(ks.key, raw_payload=payload)


FORGED_TOKENS: list[tuple[str, ForgedBuild, str]] = [
    (
        "expired",
        lambda ks: ks.token(FORGED, exp=int(NOW()) - 3600, iat=int(NOW()) - 7200),
        "expired",
    ),
    ("expired-beyond-leeway", lambda ks: ks.token(FORGED, exp=int(NOW()) - 90), "expired"),
    ("exp-missing", lambda ks: ks.token(FORGED, exp=None), "expired"),
    ("exp-string", lambda ks: ks.token(FORGED, exp="9999999999"), "expired"),
    ("exp-boolean", lambda ks: ks.token(FORGED, exp=True), "expired"),
    ("nbf-future", lambda ks: ks.token(FORGED, nbf=int(NOW()) + 3600), "not_yet_valid"),
    ("iat-future", lambda ks: ks.token(FORGED, iat=int(NOW()) + 3600), "iat"),
    ("iat-missing", lambda ks: ks.token(FORGED, iat=None), "iat"),
    ("wrong-iss", lambda ks: ks.token(FORGED, iss="http://127.0.0.1:1"), "issuer"),
    ("iss-trailing-slash", lambda ks: ks.token(FORGED, iss=ks.issuer + "/"), "issuer"),
    ("iss-missing", lambda ks: ks.token(FORGED, iss=None), "issuer"),
    ("wrong-aud", lambda ks: ks.token("someone-else"), "audience"),
    ("aud-with-untrusted-extra", lambda ks: ks.token(FORGED, aud=[FORGED, "evil"]), "audience"),
    ("aud-missing", lambda ks: ks.token(FORGED, aud=None), "audience"),
    ("aud-number", lambda ks: ks.token(FORGED, aud=7), "audience"),
    ("foreign-azp", lambda ks: ks.token(FORGED, azp="evil"), "azp"),
    ("sub-missing", lambda ks: ks.token(FORGED, sub=None), "sub"),
    ("sub-empty", lambda ks: ks.token(FORGED, sub=""), "sub"),
    ("sub-number", lambda ks: ks.token(FORGED, sub=123), "sub"),
    ("sub-too-long", lambda ks: ks.token(FORGED, sub="x" * 256), "sub"),
    ("alg-none", lambda ks: mint_unsigned(ks.claims(FORGED)), "alg"),
    ("hs256-with-public-key", hs256_with_ks_public_key, "alg"),
    ("crit-header", lambda ks: ks.token(FORGED, header=forged_header(ks, crit=["exp"])), "crit"),
    (
        "jku-header",
        lambda ks: ks.token(FORGED, header=forged_header(ks, jku=ks.issuer + "/jwks")),
        "header",
    ),
    (
        "jwk-header",
        lambda ks: ks.token(FORGED, header=forged_header(ks, jwk=ks.key.public_jwk())),
        "header",
    ),
    ("x5c-header", lambda ks: ks.token(FORGED, header=forged_header(ks, x5c=["MIIB"])), "header"),
    (
        "typ-access-token",
        lambda ks: ks.token(FORGED, header=forged_header(ks, typ="at+jwt")),
        "typ",
    ),
    (
        "alg-of-another-key-family",  # RS256 header naming the EC key
        lambda ks: ks.token(FORGED, key=ks.keys[1], header=forged_header(ks, kid=ks.keys[1].kid)),
        "alg",
    ),
    (
        "unknown-kid",
        lambda ks: ks.token(FORGED, header=forged_header(ks, kid="nope")),
        "unknown_kid",
    ),
    (
        "foreign-key-same-kid",
        lambda ks: ks.token(FORGED, key=make_key("ES256", ks.keys[1].kid)),
        "signature",
    ),
    ("duplicate-claim", lambda ks: raw_payload(ks, dup_sub_payload(ks)), "malformed"),
    ("payload-not-an-object", lambda ks: raw_payload(ks, b"[1,2]"), "malformed"),
    ("payload-not-utf8", lambda ks: raw_payload(ks, b"\xff\xfe"), "malformed"),
]


def dup_sub_payload(ks: KeyServer) -> bytes:
    claims = json.dumps(ks.claims(FORGED))
    return (claims[:-1] + ', "sub": "admin"}').encode()


@pytest.mark.parametrize(
    ("build", "code"),
    [pytest.param(build, code, id=name) for name, build, code in FORGED_TOKENS],
)
async def test_forged_token_breaking_one_rule(env: Env, build: ForgedBuild, code: str) -> None:
    answer = await env.raw("/forged/doc", [("Authorization", "Bearer " + build(env.ks))])
    assert_rejected(answer, 401, env.upstream)
    assert token_failures(env) == {code: 1.0}  # rejected for exactly the rule it breaks


ACCEPTED_FORGED: list[tuple[str, ForgedBuild, str]] = [
    ("control", lambda ks: ks.token(FORGED), "ks_user-123"),
    ("es256", lambda ks: ks.token(FORGED, key=ks.keys[1]), "ks_user-123"),
    ("expired-within-leeway", lambda ks: ks.token(FORGED, exp=int(NOW()) - 20), "ks_user-123"),
    ("nbf-within-leeway", lambda ks: ks.token(FORGED, nbf=int(NOW()) + 20), "ks_user-123"),
    (
        "no-kid-one-suitable-key",
        lambda ks: ks.token(FORGED, header=forged_header(ks, kid=None)),
        "ks_user-123",
    ),
    ("aud-list", lambda ks: ks.token(FORGED, aud=[FORGED]), "ks_user-123"),
    ("azp-is-us", lambda ks: ks.token(FORGED, azp=FORGED), "ks_user-123"),
    # header injection through claims is neutralised by encoding, never by dropping
    (
        "crlf-in-sub",
        lambda ks: ks.token(FORGED, sub="eve\r\nX-Forwarded-User: admin"),
        "ks_eve%0D%0AX-Forwarded-User%3A+admin",
    ),
]


@pytest.mark.parametrize(
    ("build", "name"),
    [pytest.param(build, name, id=row) for row, build, name in ACCEPTED_FORGED],
)
async def test_forged_token_within_the_rules_is_accepted(
    env: Env, build: ForgedBuild, name: str
) -> None:
    answer = await env.raw("/forged/doc", [("Authorization", "Bearer " + build(env.ks))])
    assert answer.status == 200, answer.body
    assert only(env.upstream, "X-Forwarded-User") == name
    assert "\n" not in only(env.upstream, "X-Forwarded-User")


async def test_claim_values_cannot_split_roles_or_inject_headers(env: Env) -> None:
    token = env.ks.token(
        FORGED, roles=["a,b", "c"], channels=["x\r\ny"], email="e@x.com\r\nX-Evil: 1"
    )
    answer = await env.raw("/forged/doc", [("Authorization", "Bearer " + token)])
    assert answer.status == 200
    up = env.upstream
    assert only(up, "X-Forwarded-Roles") == "a%2Cb,c"
    assert only(up, "X-Forwarded-Channels") == "x%0D%0Ay"
    assert up.header(0, "X-Forwarded-Email") == []  # not a valid email: not forwarded
    assert up.header(0, "X-Evil") == []


# --------------------------------------------------------------------------- cookies


async def test_session_cookie_is_forwarded_with_identity(env: Env) -> None:
    session = await admin_session(
        env.admin_url,
        "db",
        "carol",
        email="carol@example.com",
        admin_roles=["r2", "r1"],
        admin_channels=["c1"],
    )
    answer = await env.raw("/db/doc", [("Cookie", f"{COOKIE}={session}")])
    assert answer.status == 200
    up = env.upstream
    assert only(up, "X-Forwarded-User") == "carol"
    assert only(up, "X-Forwarded-Email") == "carol@example.com"
    assert only(up, "X-Forwarded-Roles") == "r1,r2"
    assert only(up, "X-Forwarded-Channels") == "c1"
    assert up.header(0, "Cookie") == []  # the session cookie was the only cookie: none left


@dataclass
class Sessions:
    """Session ids in every state the cookie table needs, all for database `db`."""

    valid: str
    other_db: str
    deleted: str
    expired: str
    of_deleted_user: str
    of_disabled_user: str


@pytest.fixture
async def sessions(env: Env) -> Sessions:
    admin = env.admin_url
    valid = await admin_session(admin, "db", "carol")
    other_db = await admin_session(admin, "prefixed", "carol")
    deleted = await admin_session(admin, "db", "carol")
    assert await env.admin("DELETE", f"/db/_session/{deleted}") == 200
    # Expired: made by the sidecar's own store with the clock an hour back (ttl is >= 60 s).
    store = env.sidecar.app[keys.STORE]
    carol = await store.get_user("db", "carol")
    assert carol is not None
    expired, _ = await store.create_session(carol, ttl=60, provider=None, now=time.time() - 3600)
    of_deleted_user = await admin_session(admin, "db", "gone")
    assert await env.admin("DELETE", "/db/_user/gone") == 200
    of_disabled_user = await admin_session(admin, "db", "mallory")
    assert await env.admin("PUT", "/db/_user/mallory", {"disabled": True}) == 200
    return Sessions(valid, other_db, deleted, expired, of_deleted_user, of_disabled_user)


CookieBuild = Callable[[Sessions], Sequence[tuple[str | bytes, str | bytes]]]


def cookie(make: Callable[[Sessions], str | bytes]) -> CookieBuild:
    def build(s: Sessions) -> Sequence[tuple[str | bytes, str | bytes]]:
        value = make(s)
        return [("Cookie", value if isinstance(value, bytes) else value.encode())]

    return build


# (id, Cookie/Authorization headers, status, reason in the JSON body: None for aiohttp's parser)
HOSTILE_COOKIES: list[tuple[str, CookieBuild, int, str | None]] = [
    ("garbage", cookie(lambda s: f"{COOKIE}=garbage"), 401, "Session Invalid"),
    ("empty-value", cookie(lambda s: f"{COOKIE}="), 401, "Session Invalid"),
    ("name-only", cookie(lambda s: COOKIE), 401, "Login required"),
    ("quoted-garbage", cookie(lambda s: f'{COOKIE}="garbage"'), 401, "Session Invalid"),
    ("unbalanced-quote", cookie(lambda s: f'{COOKIE}="{s.valid}'), 401, "Login required"),
    (
        "quote-inside",
        cookie(lambda s: f'{COOKIE}={s.valid[:20]}"{s.valid[21:]}'),
        401,
        "Login required",
    ),
    ("unicode", cookie(lambda s: f"{COOKIE}=ñandú🍪".encode()), 401, "Login required"),
    (
        "valid-plus-unicode",
        cookie(lambda s: f"{COOKIE}={s.valid}é".encode()),
        401,
        "Login required",
    ),
    ("latin1-byte", cookie(lambda s: f"{COOKIE}=".encode() + b"\xe9" * 43), 401, "Login required"),
    ("one-char-short", cookie(lambda s: f"{COOKIE}={s.valid[:-1]}"), 401, "Session Invalid"),
    ("one-char-long", cookie(lambda s: f"{COOKIE}={s.valid}A"), 401, "Session Invalid"),
    ("well-formed-unknown", cookie(lambda s: f"{COOKIE}={'A' * 43}"), 401, "Session Invalid"),
    (
        "percent-encoded",
        cookie(lambda s: f"{COOKIE}={quote(s.valid[:10] + '/' + s.valid[11:])}"),
        401,
        "Session Invalid",
    ),
    ("7kb-value", cookie(lambda s: f"{COOKIE}={'a' * 7000}"), 401, "Session Invalid"),
    ("10kb-value", cookie(lambda s: f"{COOKIE}={'a' * 10_000}"), 401, "Session Invalid"),
    # past the parser's 24 KiB line limit the header is refused before any handler runs
    ("30kb-value", cookie(lambda s: f"{COOKIE}={'a' * 30_000}"), 400, None),
    ("semicolons-only", cookie(lambda s: ";;;; ;"), 401, "Login required"),
    (
        "duplicate-garbage-first",
        cookie(lambda s: f"{COOKIE}=garbage; {COOKIE}={s.valid}"),
        401,
        "Session Invalid",
    ),
    ("name-wrong-case", cookie(lambda s: f"{COOKIE.lower()}={s.valid}"), 401, "Login required"),
    ("name-with-space", cookie(lambda s: f"{COOKIE} ={s.valid}"), 401, "Login required"),
    ("other-database-session", cookie(lambda s: f"{COOKIE}={s.other_db}"), 401, "Session Invalid"),
    ("deleted-session", cookie(lambda s: f"{COOKIE}={s.deleted}"), 401, "Session Invalid"),
    ("expired-session", cookie(lambda s: f"{COOKIE}={s.expired}"), 401, "Session Invalid"),
    (
        "session-of-deleted-user",
        cookie(lambda s: f"{COOKIE}={s.of_deleted_user}"),
        401,
        "Session Invalid",
    ),
    (
        "session-of-disabled-user",
        cookie(lambda s: f"{COOKIE}={s.of_disabled_user}"),
        401,
        "Session Invalid",
    ),
    (
        "valid-cookie-with-bad-bearer",  # a bearer that fails never falls back to the cookie
        lambda s: [("Cookie", f"{COOKIE}={s.valid}"), ("Authorization", "Bearer x.y.z")],
        401,
        "Invalid login",
    ),
    (
        "valid-cookie-with-basic",
        lambda s: [("Cookie", f"{COOKIE}={s.valid}"), ("Authorization", "Basic eDp5")],
        401,
        "Invalid login: only Bearer ID tokens are accepted",
    ),
    (
        "valid-cookie-with-two-authorizations",
        lambda s: [("Cookie", f"{COOKIE}={s.valid}")] + [("Authorization", "Bearer x")] * 2,
        400,
        "multiple Authorization headers",
    ),
]


@pytest.mark.parametrize(
    ("build", "status", "reason"),
    [pytest.param(b, status, reason, id=name) for name, b, status, reason in HOSTILE_COOKIES],
)
async def test_hostile_cookie(
    env: Env, sessions: Sessions, build: CookieBuild, status: int, reason: str | None
) -> None:
    answer = await env.raw("/db/doc", build(sessions))
    assert_rejected(answer, status, env.upstream)
    if reason is not None:
        assert answer.json()["reason"] == reason


ACCEPTED_COOKIES: list[tuple[str, CookieBuild]] = [
    ("plain", cookie(lambda s: f"{COOKIE}={s.valid}")),
    ("quoted", cookie(lambda s: f'{COOKIE}="{s.valid}"')),  # as Go's net/http reads it
    ("among-others", cookie(lambda s: f"a=1; {COOKIE}={s.valid}; b=2")),
    ("no-space-separators", cookie(lambda s: f"a=1;{COOKIE}={s.valid};b=2")),
    ("duplicate-valid-first", cookie(lambda s: f"{COOKIE}={s.valid}; {COOKIE}=garbage")),
    ("second-cookie-header", lambda s: [("Cookie", "a=1"), ("Cookie", f"{COOKIE}={s.valid}")]),
    ("garbage-neighbour", cookie(lambda s: f'x="; y=ñ; {COOKIE}={s.valid}'.encode())),
]


@pytest.mark.parametrize(
    "build", [pytest.param(build, id=name) for name, build in ACCEPTED_COOKIES]
)
async def test_accepted_cookie_forms(env: Env, sessions: Sessions, build: CookieBuild) -> None:
    answer = await env.raw("/db/doc", build(sessions))
    assert answer.status == 200, answer.body
    assert only(env.upstream, "X-Forwarded-User") == "carol"
    forwarded = " ".join(env.upstream.header(0, "Cookie"))
    assert sessions.valid not in forwarded  # security: the credential stays with the sidecar


# --------------------------------------------------------------------------- revocation


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server_session")
    return server.url


@pytest.fixture
async def renv(
    registered: OpenIDProvider, key_server: KeyServer, upstream: Upstream, store_url: str | None
) -> AsyncIterator[Env]:
    async with start_env(registered, key_server, upstream, session_store=store_url) as value:
        yield value


def unique(prefix: str = "u") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


async def assert_closed_by_revocation(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 3.0
) -> None:
    started = time.monotonic()
    msg = await ws.receive(timeout=timeout)
    assert msg.type is WSMsgType.CLOSE, msg
    assert msg.data == 1008  # policy violation
    assert time.monotonic() - started < timeout


async def assert_echoes(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str("ping?")
    msg = await ws.receive(timeout=3)
    assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:ping?")


async def upstream_socket_closed(upstream: Upstream, index: int, code: int) -> None:
    async with asyncio.timeout(3):
        while upstream.websockets[index].close_code is None:
            await asyncio.sleep(0.02)
    assert upstream.websockets[index].close_code == code


async def test_revoking_all_sessions_closes_the_websocket(renv: Env) -> None:
    name = unique()
    session = await admin_session(renv.admin_url, "db", name)
    headers = {"Cookie": f"{COOKIE}={session}"}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(renv.url + "/db/_ws", headers=headers) as ws:
            await assert_echoes(ws)
            assert await renv.admin("DELETE", f"/db/_user/{name}/_session") == 200
            await assert_closed_by_revocation(ws)
        await upstream_socket_closed(renv.upstream, 0, 1008)
        async with asyncio.timeout(3):  # untracked once its relay has ended
            while len(renv.sidecar.app[keys.WEBSOCKETS]):
                await asyncio.sleep(0.02)
        async with http.get(renv.url + "/db/doc", headers=headers) as r:
            assert r.status == 401


async def test_deleting_one_session_closes_only_its_websocket(renv: Env) -> None:
    name = unique()
    first = await admin_session(renv.admin_url, "db", name)
    second = await admin_session(renv.admin_url, "db", name)
    async with aiohttp.ClientSession() as http:
        url = renv.url + "/db/_ws"
        async with (
            http.ws_connect(url, headers={"Cookie": f"{COOKIE}={first}"}) as ws1,
            http.ws_connect(url, headers={"Cookie": f"{COOKIE}={second}"}) as ws2,
        ):
            assert await renv.admin("DELETE", f"/db/_session/{first}") == 200
            await assert_closed_by_revocation(ws1)
            await assert_echoes(ws2)


async def test_deleting_the_user_closes_bearer_and_cookie_websockets(renv: Env) -> None:
    login = unique()
    name = f"op_{login}"
    token = await renv.token(login)
    async with aiohttp.ClientSession() as http:
        url = renv.url + "/prefixed/_ws"
        async with http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as bws:
            await assert_echoes(bws)  # the bearer request registered the user
            session = await admin_session(renv.admin_url, "prefixed", name)
            async with (
                http.ws_connect(url, headers={"Cookie": f"{COOKIE}={session}"}) as cws,
                http.ws_connect(
                    url, headers={"Authorization": f"Bearer {await renv.token()}"}
                ) as bystander,
            ):
                assert await renv.admin("DELETE", f"/prefixed/_user/{name}") == 200
                await assert_closed_by_revocation(bws)
                await assert_closed_by_revocation(cws)
                await assert_echoes(bystander)  # op_alice is somebody else


async def test_disabling_closes_but_a_role_change_does_not(renv: Env) -> None:
    name = unique()
    session = await admin_session(renv.admin_url, "db", name)
    async with aiohttp.ClientSession() as http:
        headers = {"Cookie": f"{COOKIE}={session}"}
        async with http.ws_connect(renv.url + "/db/_ws", headers=headers) as ws:
            assert await renv.admin("PUT", f"/db/_user/{name}", {"admin_roles": ["new"]}) == 200
            await assert_echoes(ws)
            assert await renv.admin("PUT", f"/db/_user/{name}", {"disabled": True}) == 200
            await assert_closed_by_revocation(ws)


async def test_revocation_on_one_replica_closes_websockets_on_another(
    registered: OpenIDProvider,
    key_server: KeyServer,
    upstream: Upstream,
    redis_server_session: RedisServer,
) -> None:
    url = redis_server_session.url
    async with (
        start_env(registered, key_server, upstream, session_store=url) as a,
        start_env(registered, key_server, upstream, session_store=url) as b,
    ):
        name = unique()
        session = await admin_session(b.admin_url, "db", name)
        async with aiohttp.ClientSession() as http:
            headers = {"Cookie": f"{COOKIE}={session}"}
            async with http.ws_connect(a.url + "/db/_ws", headers=headers) as ws:
                await assert_echoes(ws)
                assert await b.admin("DELETE", f"/db/_user/{name}/_session") == 200
                await assert_closed_by_revocation(ws)
