"""ID token validation: valid tokens of every algorithm, tables of hostile ones, the caches."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from joserfc.jwk import KeySet, RSAKey
from support.jwt_factory import (
    CLIENT_ID,
    ISSUER,
    NOW,
    SigningKey,
    b64,
    b64json,
    claims,
    header_for,
    jwks,
    keyset,
    make_key,
    mint,
    mint_hs256,
    mint_unsigned,
    sign,
)

from sidecar.oidc.algorithms import ASYMMETRIC_ALGORITHMS
from sidecar.oidc.tokens import (
    MAX_TOKEN_LENGTH,
    TokenError,
    VerifiedTokenCache,
    parse_jwks,
    peek_claims,
    validate_id_token,
)

RSA = make_key("RS256", "rsa-1")
EC = make_key("ES256", "ec-256")
EC384 = make_key("ES384", "ec-384")
EC521 = make_key("ES512", "ec-521")
ED = make_key("EdDSA", "ed-1")
ATTACKER = make_key("RS256", "rsa-1")  # same kid as RSA, different key: not in the JWKS
KEYS = keyset(RSA, EC, EC384, EC521, ED)
LEEWAY = 60


def as_alg(key: SigningKey, alg: str) -> SigningKey:
    return SigningKey(alg, key.private)


def validate(token: str, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "keys": KEYS,
        "issuer": ISSUER,
        "client_id": CLIENT_ID,
        "allowed_algs": ASYMMETRIC_ALGORITHMS,
        "now": NOW,
        "leeway": LEEWAY,
    }
    options.update(overrides)
    return validate_id_token(token, **options)


# --- valid tokens ------------------------------------------------------------------------

VALID_KEYS = {
    "RS256": RSA,
    "RS384": as_alg(RSA, "RS384"),
    "RS512": as_alg(RSA, "RS512"),
    "PS256": as_alg(RSA, "PS256"),
    "PS384": as_alg(RSA, "PS384"),
    "PS512": as_alg(RSA, "PS512"),
    "ES256": EC,
    "ES384": EC384,
    "ES512": EC521,
    "EdDSA": ED,
}


def test_every_allowed_algorithm_is_covered() -> None:
    assert set(VALID_KEYS) == ASYMMETRIC_ALGORITHMS


@pytest.mark.parametrize("alg", sorted(VALID_KEYS))
def test_valid_token_of_every_algorithm(alg: str) -> None:
    token = mint(VALID_KEYS[alg])
    got = validate(token, allowed_algs={alg}, nonce="n-0S6_WzA2Mj")
    assert got["sub"] == "user-123"
    assert got["iss"] == ISSUER


@pytest.mark.parametrize(
    ("name", "payload", "options"),
    [
        ("aud list with client only", claims(aud=[CLIENT_ID]), {}),
        ("trusted extra audience", claims(aud=[CLIENT_ID, "api"]), {"trusted_audiences": ["api"]}),
        ("azp equals client_id", claims(azp=CLIENT_ID), {}),
        ("exp within leeway", claims(exp=NOW - LEEWAY + 1), {}),
        ("nbf within leeway", claims(nbf=NOW + LEEWAY), {}),
        ("iat within leeway", claims(iat=NOW + LEEWAY), {}),
        ("float times", claims(exp=NOW + 0.5, iat=NOW - 0.5, nbf=NOW - 0.5), {}),
        ("no nonce when none expected", claims(nonce=None), {}),
        ("nonce present, none expected", claims(nonce="whatever"), {}),
        ("sub of 255 chars", claims(sub="s" * 255), {}),
        ("extra claims kept", claims(email="a@example.com", roles=["x"]), {}),
    ],
)
def test_valid_variants(name: str, payload: dict[str, Any], options: dict[str, Any]) -> None:
    assert validate(mint(RSA, payload), **options)["sub"] == payload["sub"]


def test_no_kid_with_exactly_one_suitable_key() -> None:
    assert validate(mint(RSA, header=header_for(RSA, kid=None)))["sub"] == "user-123"
    assert validate(mint(EC, header=header_for(EC, kid=None)))["sub"] == "user-123"


def test_no_kid_ambiguous_is_refused() -> None:
    other = make_key("RS256", "rsa-2")
    token = mint(RSA, header=header_for(RSA, kid=None))
    with pytest.raises(TokenError) as info:
        validate(token, keys=keyset(RSA, other))
    assert info.value.code == "unknown_kid"


def test_key_restricted_to_another_alg() -> None:
    keys = KeySet.import_key_set({"keys": [RSA.public_jwk(alg="RS256")]})
    assert validate(mint(RSA), keys=keys)
    with pytest.raises(TokenError) as info:
        validate(mint(as_alg(RSA, "PS256")), keys=keys)
    assert info.value.code == "alg"


def test_key_for_encryption_is_not_used() -> None:
    keys = KeySet.import_key_set({"keys": [RSA.public_jwk(use="enc")]})
    with pytest.raises(TokenError) as info:
        validate(mint(RSA), keys=keys)
    assert info.value.code == "alg"


# --- hostile tokens ------------------------------------------------------------------------


def _tamper_payload() -> str:
    h, _, s = mint(RSA).split(".")
    return f"{h}.{b64json(claims(sub='admin'))}.{s}"


def _tamper_signature() -> str:
    token = mint(RSA)
    flipped = "A" if token[-5] != "A" else "B"
    return token[:-5] + flipped + token[-4:]


def _tamper_header() -> str:
    _, p, s = mint(RSA).split(".")
    return f"{b64json(header_for(RSA, typ='jwt'))}.{p}.{s}"


def _signed_as(key: SigningKey, header: dict[str, Any], alg: str | None = None) -> str:
    h, p = b64json(header), b64json(claims())
    return f"{h}.{p}.{sign(key, h, p, alg)}"


def _with_raw(header: bytes | str, payload: bytes | str, key: SigningKey = RSA) -> str:
    h = b64(header)
    p = b64(payload)
    return f"{h}.{p}.{sign(key, h, p)}"


def rsa_header() -> str:
    return json.dumps(header_for(RSA))


RSA_PEM = RSA.private.as_pem(private=False) if isinstance(RSA.private, RSAKey) else b""
RSA_N = str(RSA.public_jwk()["n"]).encode()
HOSTILE: list[tuple[str, Callable[[], str], dict[str, Any], str]] = [
    # alg: none and symmetric algorithms never pass (RFC 8725 2.1, 3.1)
    ("alg none", lambda: mint_unsigned(claims()), {}, "alg"),
    (
        "alg none with kid",
        lambda: mint_unsigned(claims(), {"alg": "none", "kid": "rsa-1"}),
        {},
        "alg",
    ),
    ("alg None capitalised", lambda: mint_unsigned(claims(), {"alg": "None"}), {}, "alg"),
    (
        "HS256 with RSA public PEM as secret",
        lambda: mint_hs256(RSA_PEM, claims(), {"alg": "HS256", "kid": "rsa-1"}),
        {},
        "alg",
    ),
    (
        "HS256 even when the caller allows it",
        lambda: mint_hs256(RSA_PEM, claims(), {"alg": "HS256", "kid": "rsa-1"}),
        {"allowed_algs": {"HS256", "RS256"}},
        "alg",
    ),
    (
        "HS256 with modulus as secret",
        lambda: mint_hs256(RSA_N, claims(), {"alg": "HS256"}),
        {},
        "alg",
    ),
    ("alg not in allowed list", lambda: mint(RSA), {"allowed_algs": {"ES256"}}, "alg"),
    ("unknown alg", lambda: _signed_as(RSA, header_for(RSA, alg="RS999"), "RS256"), {}, "alg"),
    # key family must match the alg (RFC 8725 3.1)
    ("ES256 header on RSA kid", lambda: _signed_as(EC, header_for(EC, kid="rsa-1")), {}, "alg"),
    ("RS256 header on EC kid", lambda: _signed_as(RSA, header_for(RSA, kid="ec-256")), {}, "alg"),
    ("EdDSA header on RSA kid", lambda: _signed_as(ED, header_for(ED, kid="rsa-1")), {}, "alg"),
    (
        "ES384 header on P-256 key",
        lambda: _signed_as(EC384, header_for(EC384, kid="ec-256")),
        {},
        "alg",
    ),
    (
        "PS256 signature under RS256 header",
        lambda: _signed_as(RSA, header_for(RSA), "PS256"),
        {},
        "signature",
    ),
    # the key comes from the JWKS only
    (
        "unknown kid",
        lambda: mint(ATTACKER, header=header_for(ATTACKER, kid="rsa-9")),
        {},
        "unknown_kid",
    ),
    ("attacker key under known kid", lambda: mint(ATTACKER), {}, "signature"),
    (
        "jwk header with attacker key",
        lambda: mint(ATTACKER, header=header_for(ATTACKER, jwk=ATTACKER.public_jwk())),
        {},
        "header",
    ),
    (
        "jku header",
        lambda: mint(RSA, header=header_for(RSA, jku="https://evil.example/jwks")),
        {},
        "header",
    ),
    (
        "x5u header",
        lambda: mint(RSA, header=header_for(RSA, x5u="https://evil.example/c.pem")),
        {},
        "header",
    ),
    ("x5c header", lambda: mint(RSA, header=header_for(RSA, x5c=["MIIB"])), {}, "header"),
    ("crit header", lambda: mint(RSA, header=header_for(RSA, crit=["exp"], exp=1)), {}, "crit"),
    ("empty crit", lambda: mint(RSA, header=header_for(RSA, crit=[])), {}, "crit"),
    ("b64 false", lambda: mint(RSA, header=header_for(RSA, b64=False)), {}, "header"),
    ("nested JWT cty", lambda: mint(RSA, header=header_for(RSA, cty="JWT")), {}, "header"),
    ("access token typ", lambda: mint(RSA, header=header_for(RSA, typ="at+jwt")), {}, "typ"),
    (
        "access token media typ",
        lambda: mint(RSA, header=header_for(RSA, typ="application/at+JWT")),
        {},
        "typ",
    ),
    ("logout token typ", lambda: mint(RSA, header=header_for(RSA, typ="logout+jwt")), {}, "typ"),
    ("typ not a string", lambda: mint(RSA, header=header_for(RSA, typ=1)), {}, "malformed"),
    # time claims (RFC 7519 4.1.4-6)
    ("expired", lambda: mint(RSA, claims(exp=NOW - LEEWAY)), {}, "expired"),
    ("expired without leeway", lambda: mint(RSA, claims(exp=NOW)), {"leeway": 0}, "expired"),
    ("exp missing", lambda: mint(RSA, claims(exp=None)), {}, "expired"),
    ("exp bool", lambda: mint(RSA, claims(exp=True)), {}, "expired"),
    ("exp string", lambda: mint(RSA, claims(exp=str(NOW + 300))), {}, "expired"),
    (
        "exp null",
        lambda: _with_raw(rsa_header(), json.dumps({**claims(), "exp": None})),
        {},
        "expired",
    ),
    ("exp list", lambda: mint(RSA, claims(exp=[NOW + 300])), {}, "expired"),
    ("nbf in the future", lambda: mint(RSA, claims(nbf=NOW + LEEWAY + 1)), {}, "not_yet_valid"),
    ("nbf string", lambda: mint(RSA, claims(nbf="0")), {}, "not_yet_valid"),
    ("iat in the future", lambda: mint(RSA, claims(iat=NOW + LEEWAY + 1)), {}, "iat"),
    ("iat missing", lambda: mint(RSA, claims(iat=None)), {}, "iat"),
    ("iat bool", lambda: mint(RSA, claims(iat=False)), {}, "iat"),
    # subject
    ("sub missing", lambda: mint(RSA, claims(sub=None)), {}, "sub"),
    ("sub empty", lambda: mint(RSA, claims(sub="")), {}, "sub"),
    ("sub number", lambda: mint(RSA, claims(sub=123)), {}, "sub"),
    ("sub too long", lambda: mint(RSA, claims(sub="s" * 256)), {}, "sub"),
    # issuer: exact string equality (OIDC Core 3.1.3.7 step 2)
    ("iss other case", lambda: mint(RSA, claims(iss="https://OP.example.com")), {}, "issuer"),
    ("iss trailing slash", lambda: mint(RSA, claims(iss=ISSUER + "/")), {}, "issuer"),
    ("iss http", lambda: mint(RSA, claims(iss="http://op.example.com")), {}, "issuer"),
    ("iss missing", lambda: mint(RSA, claims(iss=None)), {}, "issuer"),
    ("iss list", lambda: mint(RSA, claims(iss=[ISSUER])), {}, "issuer"),
    # audience (step 3) and azp (steps 4-5)
    ("aud without client", lambda: mint(RSA, claims(aud="other-client")), {}, "audience"),
    ("aud missing", lambda: mint(RSA, claims(aud=None)), {}, "audience"),
    ("aud empty list", lambda: mint(RSA, claims(aud=[])), {}, "audience"),
    ("aud number", lambda: mint(RSA, claims(aud=1)), {}, "audience"),
    ("aud list with number", lambda: mint(RSA, claims(aud=[CLIENT_ID, 1])), {}, "audience"),
    ("aud client case", lambda: mint(RSA, claims(aud=CLIENT_ID.upper())), {}, "audience"),
    ("foreign extra aud", lambda: mint(RSA, claims(aud=[CLIENT_ID, "evil"])), {}, "audience"),
    (
        "extra aud not trusted",
        lambda: mint(RSA, claims(aud=[CLIENT_ID, "evil"])),
        {"trusted_audiences": ["api"]},
        "audience",
    ),
    ("foreign azp", lambda: mint(RSA, claims(azp="other-client")), {}, "azp"),
    ("azp not a string", lambda: mint(RSA, claims(azp=[CLIENT_ID])), {}, "azp"),
    # nonce (step 11)
    (
        "nonce mismatch",
        lambda: mint(RSA, claims(nonce="other")),
        {"nonce": "n-0S6_WzA2Mj"},
        "nonce",
    ),
    ("nonce missing", lambda: mint(RSA, claims(nonce=None)), {"nonce": "n-0S6_WzA2Mj"}, "nonce"),
    ("nonce not a string", lambda: mint(RSA, claims(nonce=1)), {"nonce": "1"}, "nonce"),
    ("nonce prefix", lambda: mint(RSA, claims(nonce="n-0S6")), {"nonce": "n-0S6_WzA2Mj"}, "nonce"),
    # shape (RFC 7515 7.1, RFC 7519 7.2)
    ("empty", lambda: "", {}, "malformed"),
    ("garbage", lambda: "not a token", {}, "malformed"),
    ("two parts", lambda: ".".join(mint(RSA).split(".")[:2]), {}, "malformed"),
    ("four parts", lambda: mint(RSA) + ".x", {}, "malformed"),
    ("five-part JWE", lambda: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", {}, "malformed"),
    ("huge token", lambda: mint(RSA, claims(pad="x" * MAX_TOKEN_LENGTH)), {}, "malformed"),
    ("non-base64url header", lambda: "!!!." + mint(RSA).split(".", 1)[1], {}, "malformed"),
    ("padded segment", lambda: mint(RSA).replace(".", "=.", 1), {}, "malformed"),
    ("standard base64 chars", lambda: "ab+/." + mint(RSA).split(".", 1)[1], {}, "malformed"),
    ("non-ascii", lambda: "é" + mint(RSA), {}, "malformed"),
    ("header not JSON", lambda: _with_raw(b"{alg:RS256}", json.dumps(claims())), {}, "malformed"),
    ("header a list", lambda: _with_raw(b'["RS256"]', json.dumps(claims())), {}, "malformed"),
    ("header no alg", lambda: _with_raw(b'{"kid":"rsa-1"}', json.dumps(claims())), {}, "malformed"),
    ("header alg number", lambda: _with_raw(b'{"alg":256}', json.dumps(claims())), {}, "malformed"),
    (
        "header kid number",
        lambda: _with_raw(b'{"alg":"RS256","kid":1}', json.dumps(claims())),
        {},
        "malformed",
    ),
    (
        "duplicate header alg",
        lambda: _with_raw(b'{"alg":"none","alg":"RS256","kid":"rsa-1"}', json.dumps(claims())),
        {},
        "malformed",
    ),
    ("payload a list", lambda: _with_raw(rsa_header(), b"[1,2]"), {}, "malformed"),
    ("payload a string", lambda: _with_raw(rsa_header(), b'"sub"'), {}, "malformed"),
    ("payload not JSON", lambda: _with_raw(rsa_header(), b"\x00\x01"), {}, "malformed"),
    (
        "payload NaN",
        lambda: _with_raw(rsa_header(), json.dumps(claims(exp=float("nan")))),
        {},
        "malformed",
    ),
    (
        "payload UTF-16",
        lambda: _with_raw(rsa_header(), json.dumps(claims()).encode("utf-16")),
        {},
        "malformed",
    ),
    (
        "duplicate sub claim",
        lambda: _with_raw(rsa_header(), json.dumps(claims())[:-1] + ',"sub":"admin"}'),
        {},
        "malformed",
    ),
    # Back-Channel Logout 1.0 2.4: a logout token (typ JWT, with an exp) is no ID token
    (
        "logout token typed JWT with exp",
        lambda: mint(
            RSA,
            claims(
                nonce=None,
                jti="j-1",
                sid="s-1",
                events={"http://schemas.openid.net/event/backchannel-logout": {}},
            ),
            header={**header_for(RSA), "typ": "JWT"},
        ),
        {},
        "events",
    ),
    ("any events claim", lambda: mint(RSA, claims(events={})), {}, "events"),
    # integrity
    ("tampered payload", _tamper_payload, {}, "signature"),
    ("tampered signature", _tamper_signature, {}, "signature"),
    ("tampered header", _tamper_header, {}, "signature"),
    ("empty signature", lambda: mint(RSA).rsplit(".", 1)[0] + ".", {}, "signature"),
    ("truncated ES256 signature", lambda: mint(EC)[:-4], {}, "signature"),
    (
        "EdDSA signature of another key",
        lambda: _signed_as(make_key("EdDSA", "x"), header_for(ED)),
        {},
        "signature",
    ),
]


@pytest.mark.parametrize(
    ("make", "options", "code"),
    [pytest.param(make, options, code, id=name) for name, make, options, code in HOSTILE],
)
def test_hostile_tokens(make: Callable[[], str], options: dict[str, Any], code: str) -> None:
    token = make()
    with pytest.raises(TokenError) as info:
        validate(token, **options)
    assert info.value.code == code, info.value.reason


def test_non_string_token() -> None:
    with pytest.raises(TokenError) as info:
        validate(b"abc")  # type: ignore[arg-type]
    assert info.value.code == "malformed"


def test_peek_claims_does_not_verify() -> None:
    assert peek_claims(mint(ATTACKER))["sub"] == "user-123"
    with pytest.raises(TokenError):
        peek_claims("x.y")


# --- JWKS parsing --------------------------------------------------------------------------


def test_parse_jwks_skips_unusable_keys() -> None:
    weak = make_key("RS256", "weak", rsa_bits=1024)
    private = RSA.private.as_dict(private=True)
    document = {
        "keys": [
            RSA.public_jwk(),
            EC.public_jwk(use="sig"),
            ED.public_jwk(),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**EC384.public_jwk(), "use": "enc"},
            {"kty": "PQC", "kid": "future"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            weak.public_jwk(),
            {**private, "kid": "leaked"},
            "not an object",
        ]
    }
    keys, skipped = parse_jwks(document)
    assert sorted(str(k.kid) for k in keys) == ["ec-256", "ed-1", "rsa-1"]
    assert len(skipped) == 7
    assert validate(mint(RSA), keys=keys)


@pytest.mark.parametrize("document", [None, [], {}, {"keys": {}}, {"keys": "x"}])
def test_parse_jwks_rejects_non_sets(document: Any) -> None:
    with pytest.raises(ValueError):
        parse_jwks(document)


def test_jwks_helper_round_trip() -> None:
    keys, skipped = parse_jwks(jwks(RSA, EC))
    assert not skipped and len(keys.keys) == 2


# --- caches --------------------------------------------------------------------------------


def test_cache_hit_and_isolation() -> None:
    cache = VerifiedTokenCache()
    token = mint(RSA)
    payload = validate(token)
    cache.put(token, ISSUER, CLIENT_ID, payload)
    assert cache.get(token, ISSUER, CLIENT_ID, NOW) == payload
    # Another provider (issuer or client) never sees this entry.
    assert cache.get(token, ISSUER + "/", CLIENT_ID, NOW) is None
    assert cache.get(token, ISSUER, "other-client", NOW) is None
    # Another token, even one character apart, never shares it.
    assert (
        cache.get(token[:-1] + ("A" if token[-1] != "A" else "B"), ISSUER, CLIENT_ID, NOW) is None
    )
    assert cache.get(mint(RSA, claims(sub="other")), ISSUER, CLIENT_ID, NOW) is None


def test_cache_entries_end_at_exp() -> None:
    cache = VerifiedTokenCache()
    token = mint(RSA)
    cache.put(token, ISSUER, CLIENT_ID, claims(exp=NOW + 10))
    assert cache.get(token, ISSUER, CLIENT_ID, NOW + 9.9) is not None
    assert cache.get(token, ISSUER, CLIENT_ID, NOW + 10) is None
    assert len(cache) == 0


def test_cache_is_bounded_lru() -> None:
    cache = VerifiedTokenCache(max_entries=2)
    a, b, c = (mint(RSA, claims(sub=s)) for s in "abc")
    cache.put(a, ISSUER, CLIENT_ID, claims(sub="a"))
    cache.put(b, ISSUER, CLIENT_ID, claims(sub="b"))
    assert cache.get(a, ISSUER, CLIENT_ID, NOW) is not None  # a is now most recent
    cache.put(c, ISSUER, CLIENT_ID, claims(sub="c"))
    assert len(cache) == 2
    assert cache.get(b, ISSUER, CLIENT_ID, NOW) is None
    assert cache.get(a, ISSUER, CLIENT_ID, NOW) is not None
    assert cache.get(c, ISSUER, CLIENT_ID, NOW) is not None


def test_cache_returns_copies() -> None:
    cache = VerifiedTokenCache()
    token = mint(RSA)
    cache.put(token, ISSUER, CLIENT_ID, claims(roles=["a"]))
    got = cache.get(token, ISSUER, CLIENT_ID, NOW)
    assert got is not None
    got["roles"].append("admin")
    got["sub"] = "admin"
    again = cache.get(token, ISSUER, CLIENT_ID, NOW)
    assert again is not None and again["roles"] == ["a"] and again["sub"] == "user-123"


@pytest.mark.parametrize("exp", [None, True, "123"])
def test_cache_ignores_claims_without_numeric_exp(exp: Any) -> None:
    cache = VerifiedTokenCache()
    cache.put("t", ISSUER, CLIENT_ID, claims(exp=exp))
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("code", "remembered"),
    [
        ("signature", True),
        ("malformed", True),
        ("audience", True),
        ("events", True),
        ("unknown_kid", False),  # a key rotation can make it valid
        ("not_yet_valid", False),  # time makes it valid
        ("iat", False),
        ("nonce", False),  # depends on the caller's expectation
        ("expired", False),
    ],
)
def test_negative_cache_only_remembers_stable_failures(code: str, remembered: bool) -> None:
    cache = VerifiedTokenCache(negative_ttl=30)
    cache.put_failure("t", ISSUER, CLIENT_ID, TokenError("x", code), NOW)
    got = cache.get_failure("t", ISSUER, CLIENT_ID, NOW + 1)
    assert (got is not None) is remembered
    assert cache.get_failure("t", ISSUER, "other", NOW + 1) is None
    assert cache.get_failure("t", ISSUER, CLIENT_ID, NOW + 30) is None


def test_negative_cache_is_bounded() -> None:
    cache = VerifiedTokenCache(negative_entries=3)
    for i in range(10):
        cache.put_failure(f"t{i}", ISSUER, CLIENT_ID, TokenError("x", "signature"), NOW)
    assert cache.get_failure("t0", ISSUER, CLIENT_ID, NOW) is None
    assert cache.get_failure("t9", ISSUER, CLIENT_ID, NOW) is not None
