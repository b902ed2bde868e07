"""ID token validation (compact JWS, asymmetric algorithms only) and a cache of verified tokens.

Pure: no I/O; the provider's keys, the time and every expectation are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, KeySet, OKPKey
from joserfc.jws import JWSRegistry

from sidecar.oidc.algorithms import ASYMMETRIC_ALGORITHMS

MAX_TOKEN_LENGTH = 16 * 1024
MAX_SUB_LENGTH = 255  # OIDC Core 2: sub "MUST NOT exceed 255 ASCII characters"
MIN_RSA_BITS = 2048  # RFC 7518 3.3 / 3.5: "A key of size 2048 bits or larger MUST be used"

# Security: header parameters that name a key or key location chosen by the token's author.
# The key comes only from the provider's JWKS (RFC 8725 3.10); their presence is refused.
KEY_CARRYING_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c"})
# RFC 8725 3.11 explicit typing: tokens typed for another purpose are never ID tokens.
FOREIGN_TYPES = frozenset({"at+jwt", "logout+jwt", "secevent+jwt", "token-introspection+jwt"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_EDDSA_CURVES = frozenset({"Ed25519", "Ed448"})


class TokenError(Exception):
    """The token is not acceptable. `reason` is for logs; `code` is a short metric label."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __repr__(self) -> str:
        return f"TokenError({self.reason!r}, {self.code!r})"


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A compact JWS split and decoded, nothing verified yet."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.header["alg"])

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None


def _malformed(reason: str) -> NoReturn:
    raise TokenError(reason, "malformed")


def _b64decode(segment: str, what: str) -> bytes:
    # RFC 7515 2: base64url without padding; anything else is refused, not repaired.
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        _malformed(f"{what} is not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 4 / RFC 7519 4: duplicate member names are rejected (no parser differentials).
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity are Python extensions


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            raw.decode("utf-8"),  # RFC 7515 / 7519: UTF-8 only (json.loads would sniff UTF-16)
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        _malformed(f"{what} is not valid JSON")
    if not isinstance(value, dict):
        _malformed(f"{what} is not a JSON object")
    return value


def parse_token(token: str) -> ParsedToken:
    """Cheap pre-parse: split and decode; checks shape only. Raises TokenError("malformed")."""
    if not isinstance(token, str) or not token:
        _malformed("empty token")
    if len(token) > MAX_TOKEN_LENGTH:
        _malformed("token too large")
    parts = token.split(".")
    if len(parts) == 5:
        _malformed("encrypted (JWE) tokens are not accepted")
    if len(parts) != 3:
        _malformed("not a compact JWS")
    header_b64, payload_b64, signature_b64 = parts
    header = _json_object(_b64decode(header_b64, "header"), "header")
    claims = _json_object(_b64decode(payload_b64, "payload"), "payload")
    signature = _b64decode(signature_b64, "signature")
    if not isinstance(header.get("alg"), str):
        _malformed("header has no alg")
    if "kid" in header and not isinstance(header["kid"], str):
        _malformed("kid is not a string")
    return ParsedToken(header, claims, f"{header_b64}.{payload_b64}".encode("ascii"), signature)


def peek_claims(token: str) -> dict[str, Any]:
    """The unverified claims: only to choose which provider validates the token."""
    return parse_token(token).claims


def check_header(header: Mapping[str, Any], allowed_algs: Collection[str]) -> None:
    """RFC 8725 3.1 / OIDC Core 3.1.3.7 step 7: the algorithm is ours to choose, not the token's."""
    alg = header["alg"]
    # Security: `none` and HS* never pass: allowed_algs is narrowed to the asymmetric set here
    # too, so a misconfigured caller cannot reopen the RSA-public-key-as-HMAC-secret confusion.
    if alg not in allowed_algs or alg not in ASYMMETRIC_ALGORITHMS:
        raise TokenError(f"algorithm {alg!r} is not allowed", "alg")
    if "crit" in header:
        # RFC 7515 4.1.11: we understand no extension, so any crit list is refused.
        raise TokenError("crit header parameters are not supported", "crit")
    found = KEY_CARRYING_HEADERS.intersection(header)
    if found:
        raise TokenError(f"header parameter {sorted(found)[0]} is not accepted", "header")
    if "b64" in header or "cty" in header:
        # RFC 7797 unencoded payloads and RFC 7519 5.2 nested JWTs are not ID tokens.
        raise TokenError("b64/cty header parameters are not accepted", "header")
    typ = header.get("typ")
    if typ is not None:
        if not isinstance(typ, str):
            _malformed("typ is not a string")
        if typ.lower().removeprefix("application/") in FOREIGN_TYPES:
            raise TokenError(f"token type {typ!r} is not an ID token", "typ")


def _suitable(key: Key, alg: str) -> bool:
    """The key can verify `alg`: matching kty (and curve), use sig, alg param compatible."""
    model = JWSRegistry.algorithms[alg]
    try:
        model.check_key(key)  # kty, use, alg member; the EC curve for ES*
        key.check_key_op("verify")
    except JoseError:
        return False
    if isinstance(key, OKPKey):
        return key.curve_name in _EDDSA_CURVES
    return True


def select_key(keys: Iterable[Key], header: Mapping[str, Any]) -> Key:
    """The verification key: from the provider's JWKS only, by kid (RFC 7515 4.1.4)."""
    alg = header["alg"]
    kid = header.get("kid")
    if kid is None:
        # Without a kid we only guess when the guess is unambiguous.
        candidates = [k for k in keys if _suitable(k, alg)]
        if len(candidates) == 1:
            return candidates[0]
        raise TokenError(f"no kid and {len(candidates)} candidate keys", "unknown_kid")
    named = [k for k in keys if k.kid == kid]
    if not named:
        raise TokenError("unknown kid", "unknown_kid")
    for key in named:
        if _suitable(key, alg):
            return key
    # Security: the key exists but is of another family (e.g. RS256 header on an EC key).
    raise TokenError(f"key {kid!r} cannot verify {alg}", "alg")


def verify_signature(parsed: ParsedToken, key: Key) -> None:
    """RFC 7515 5.2: exactly one signature, verified with the selected key."""
    # joserfc's algorithm models do the cryptography; we call them directly because
    # JWSRegistry.get_alg() emits a SecurityWarning for EdDSA and we have done the header
    # checks ourselves.
    model = JWSRegistry.algorithms[parsed.alg]
    try:
        ok = model.verify(parsed.signing_input, parsed.signature, key)
    except (JoseError, ValueError, TypeError):
        ok = False
    if not ok:
        raise TokenError("bad signature", "signature")


def _numeric(claims: Mapping[str, Any], name: str, code: str, *, required: bool) -> float | None:
    """A NumericDate claim (RFC 7519 2: a JSON number; bool is an int in Python and is
    refused), or None when absent and not required; TokenError with `code` otherwise."""
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenError(f"{name} missing", code)
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(f"{name} is not a number", code)
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenError(f"{name} is not a number", code)
    return value


def check_nonce(claims: Mapping[str, Any], nonce: str) -> None:
    """OIDC Core 3.1.3.7 step 11: the nonce must equal the one sent in the request."""
    got = claims.get("nonce")
    # Security: constant-time comparison.
    if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
        raise TokenError("nonce mismatch", "nonce")


def check_issuer_audience(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    client_id: str,
    trusted_audiences: Collection[str] = (),
) -> None:
    """OIDC Core 3.1.3.7 steps 2-3 (and Back-Channel Logout 2.6 step 3)."""
    # Step 2: iss exactly equal (no case folding, no trailing-slash tolerance).
    if claims.get("iss") != issuer:
        raise TokenError("issuer mismatch", "issuer")

    # Step 3: aud contains client_id; every other audience must be one we trust.
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise TokenError("aud missing or not a string/list of strings", "audience")
    if client_id not in audiences:
        raise TokenError("client_id not in aud", "audience")
    foreign = [a for a in audiences if a != client_id and a not in trusted_audiences]
    if foreign:
        raise TokenError("untrusted audience in aud", "audience")


def check_times(
    claims: Mapping[str, Any], *, now: float, leeway: int, exp_required: bool
) -> float | None:
    """exp, nbf and iat against the clock (RFC 7519 4.1.4-4.1.6); returns iat."""
    # OIDC Core 3.1.3.7 step 9 / RFC 7519 4.1.4: exp in the future (minus leeway).
    exp = _numeric(claims, "exp", "expired", required=exp_required)
    if exp is not None and exp <= now - leeway:
        raise TokenError("token expired", "expired")

    # RFC 7519 4.1.5: nbf, when present, not in the future (plus leeway).
    nbf = _numeric(claims, "nbf", "not_yet_valid", required=False)
    if nbf is not None and nbf > now + leeway:
        raise TokenError("token not yet valid", "not_yet_valid")

    # Step 10 / OIDC Core 2: iat required; a token issued in the future is refused.
    iat = _numeric(claims, "iat", "iat", required=True)
    if iat is not None and iat > now + leeway:
        raise TokenError("iat in the future", "iat")
    return iat


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    client_id: str,
    now: float,
    leeway: int,
    nonce: str | None = None,
    trusted_audiences: Collection[str] = (),
) -> None:
    """OIDC Core 3.1.3.7 / 2 and RFC 7519 4.1 checks on an already verified claim set."""
    check_issuer_audience(
        claims, issuer=issuer, client_id=client_id, trusted_audiences=trusted_audiences
    )

    # Steps 4-5: azp, when present, must be us.
    if "azp" in claims and claims["azp"] != client_id:
        raise TokenError("azp is not client_id", "azp")

    check_times(claims, now=now, leeway=leeway, exp_required=True)

    # Back-Channel Logout 1.0 2.4: a logout token (typed plain JWT, with an exp) must never
    # pass as an ID token; its `events` claim tells it apart.
    if "events" in claims:
        raise TokenError("token has an events claim: a logout token, not an ID token", "events")

    # OIDC Core 2: sub required, a non-empty string of at most 255 characters.
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH:
        raise TokenError("sub missing or invalid", "sub")

    if nonce is not None:
        check_nonce(claims, nonce)


def verify_parsed(
    parsed: ParsedToken,
    *,
    keys: Iterable[Key],
    issuer: str,
    client_id: str,
    allowed_algs: Collection[str],
    now: float,
    leeway: int,
    nonce: str | None = None,
    trusted_audiences: Collection[str] = (),
) -> dict[str, Any]:
    """Header, key, signature, then claims (signature first: no claim verdicts on forgeries)."""
    check_header(parsed.header, allowed_algs)
    verify_signature(parsed, select_key(keys, parsed.header))
    check_claims(
        parsed.claims,
        issuer=issuer,
        client_id=client_id,
        now=now,
        leeway=leeway,
        nonce=nonce,
        trusted_audiences=trusted_audiences,
    )
    return parsed.claims


def validate_id_token(
    token: str,
    *,
    keys: Iterable[Key],
    issuer: str,
    client_id: str,
    allowed_algs: Collection[str],
    now: float,
    leeway: int,
    nonce: str | None = None,
    trusted_audiences: Collection[str] = (),
) -> dict[str, Any]:
    """The token's claims if it is a valid ID token for (issuer, client_id); else TokenError."""
    return verify_parsed(
        parse_token(token),
        keys=keys,
        issuer=issuer,
        client_id=client_id,
        allowed_algs=allowed_algs,
        now=now,
        leeway=leeway,
        nonce=nonce,
        trusted_audiences=trusted_audiences,
    )


# --- OpenID Connect Back-Channel Logout 1.0 logout tokens -------------------------------------

LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
# Back-Channel Logout 2.4 recommends typ logout+jwt; plain JWT is what several providers send.
LOGOUT_TYPES = frozenset({"logout+jwt", "jwt"})
LOGOUT_TOKEN_MAX_AGE = 300  # seconds; an older iat is refused (and jtis are kept longer)
MAX_JTI_LENGTH = 255


def check_logout_header(header: Mapping[str, Any], allowed_algs: Collection[str]) -> None:
    """The ID-token header rules, except that the type must be a logout token's when given."""
    typ = header.get("typ")
    check_header({k: v for k, v in header.items() if k != "typ"}, allowed_algs)
    if typ is not None:
        if not isinstance(typ, str):
            _malformed("typ is not a string")
        # Security (RFC 8725 3.11): a token typed for another purpose is never a logout token.
        if typ.lower().removeprefix("application/") not in LOGOUT_TYPES:
            raise TokenError(f"token type {typ!r} is not a logout token", "typ")


def _short_string(claims: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise TokenError(f"{name} is not a non-empty string", name)
    return value


def check_logout_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    client_id: str,
    now: float,
    leeway: int,
    max_age: int = LOGOUT_TOKEN_MAX_AGE,
    trusted_audiences: Collection[str] = (),
) -> None:
    """Back-Channel Logout 1.0 2.6 steps 3-7 on an already verified claim set."""
    check_issuer_audience(
        claims, issuer=issuer, client_id=client_id, trusted_audiences=trusted_audiences
    )
    # Step 3 (RFC 7519 4.1.6): iat required, neither in the future nor too old; exp optional.
    iat = check_times(claims, now=now, leeway=leeway, exp_required=False)
    if iat is not None and iat < now - max_age - leeway:
        raise TokenError("logout token too old", "iat")
    # Step 5: events holds the back-channel logout event, as a JSON object.
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(LOGOUT_EVENT), dict):
        raise TokenError("events claim without the back-channel logout event", "events")
    # Step 7: a nonce is forbidden (it would make an ID token usable as a logout token).
    if "nonce" in claims:
        raise TokenError("logout token carries a nonce", "nonce")
    # Step 4: sid and/or sub.
    sub = _short_string(claims, "sub", MAX_SUB_LENGTH)
    sid = _short_string(claims, "sid", MAX_SUB_LENGTH)
    if sub is None and sid is None:
        raise TokenError("neither sid nor sub", "sub")
    # 2.4: jti is required; replay is refused by the caller, which has the store.
    if _short_string(claims, "jti", MAX_JTI_LENGTH) is None:
        raise TokenError("jti missing", "jti")


def verify_logout_token(
    parsed: ParsedToken,
    *,
    keys: Iterable[Key],
    issuer: str,
    client_id: str,
    allowed_algs: Collection[str],
    now: float,
    leeway: int,
    max_age: int = LOGOUT_TOKEN_MAX_AGE,
    trusted_audiences: Collection[str] = (),
) -> dict[str, Any]:
    """Back-Channel Logout 2.6: header, key, signature (step 2), then claims."""
    check_logout_header(parsed.header, allowed_algs)
    verify_signature(parsed, select_key(keys, parsed.header))
    check_logout_claims(
        parsed.claims,
        issuer=issuer,
        client_id=client_id,
        now=now,
        leeway=leeway,
        max_age=max_age,
        trusted_audiences=trusted_audiences,
    )
    return parsed.claims


def _rsa_bits(data: Mapping[str, Any]) -> int:
    n = data.get("n")
    if not isinstance(n, str):
        return 0
    try:
        return int.from_bytes(_b64decode(n, "n")).bit_length()
    except TokenError:
        return 0


def parse_jwks(document: Any) -> tuple[KeySet, list[str]]:
    """Signature keys from a JWKS document, and why any others were skipped.

    One unusable key (unknown kty, use=enc, oct, weak RSA, bad encoding) is skipped rather
    than failing the whole set (RFC 7517 5).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set")
    keys: list[Key] = []
    skipped: list[str] = []
    for i, data in enumerate(document["keys"]):
        kid = data.get("kid") if isinstance(data, dict) else None
        label = f"key {i}" + (f" ({kid[:40]!r})" if isinstance(kid, str) else "")
        if not isinstance(data, dict):
            skipped.append(f"{label}: not an object")
            continue
        if data.get("use", "sig") != "sig":
            skipped.append(f"{label}: use is not sig")
            continue
        if data.get("kty") not in ("RSA", "EC", "OKP"):
            # Security: symmetric (oct) keys never verify ID tokens here.
            skipped.append(f"{label}: unsupported kty")
            continue
        if any(p in data for p in ("d", "p", "q", "k")):
            skipped.append(f"{label}: contains private key material")
            continue
        if data["kty"] == "RSA" and _rsa_bits(data) < MIN_RSA_BITS:
            # Checked before import: joserfc would only warn about a weak key.
            skipped.append(f"{label}: RSA key shorter than {MIN_RSA_BITS} bits")
            continue
        try:
            keys.append(JWKRegistry.import_key(data))
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            skipped.append(f"{label}: {type(exc).__name__}")
    return KeySet(keys), skipped


# Failures that hold whatever the time and whatever the keys: safe to remember briefly.
_STABLE_FAILURES = frozenset(
    {
        "malformed",
        "alg",
        "crit",
        "header",
        "typ",
        "signature",
        "issuer",
        "audience",
        "azp",
        "sub",
        "events",
    }
)


class VerifiedTokenCache:
    """Claims of tokens already verified, keyed by SHA-256(token) + (issuer, client_id).

    Entries end at the token's exp. A small negative cache remembers failures that cannot
    turn into success (bad signature, wrong audience...) for `negative_ttl` seconds; failures
    that can (unknown kid, not yet valid, nonce) are never remembered.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        negative_entries: int = 1_000,
        negative_ttl: float = 30.0,
    ) -> None:
        self.max_entries = max_entries
        self.negative_entries = negative_entries
        self.negative_ttl = negative_ttl
        self._ok: OrderedDict[tuple[bytes, str, str], tuple[float, str]] = OrderedDict()
        self._bad: OrderedDict[tuple[bytes, str, str], tuple[float, TokenError]] = OrderedDict()

    @staticmethod
    def _key(token: str, issuer: str, client_id: str) -> tuple[bytes, str, str]:
        # The whole token (signature included) is hashed: two tokens never share an entry.
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), issuer, client_id

    def __len__(self) -> int:
        return len(self._ok)

    def get(self, token: str, issuer: str, client_id: str, now: float) -> dict[str, Any] | None:
        """The claims a token was verified with, while it lives (a copy of its own)."""
        key = self._key(token, issuer, client_id)
        entry = self._ok.get(key)
        if entry is None:
            return None
        expires, claims = entry
        if now >= expires:
            del self._ok[key]
            return None
        self._ok.move_to_end(key)
        # A fresh copy each time, so a caller can never change the cached claims; decoding
        # the stored JSON costs a fraction of copy.deepcopy (which showed in profiles).
        fresh: dict[str, Any] = json.loads(claims)
        return fresh

    def put(self, token: str, issuer: str, client_id: str, claims: Mapping[str, Any]) -> None:
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or self.max_entries <= 0:
            return
        key = self._key(token, issuer, client_id)
        self._ok[key] = (float(exp), json.dumps(dict(claims), separators=(",", ":")))
        self._ok.move_to_end(key)
        while len(self._ok) > self.max_entries:
            self._ok.popitem(last=False)

    def get_failure(self, token: str, issuer: str, client_id: str, now: float) -> TokenError | None:
        key = self._key(token, issuer, client_id)
        entry = self._bad.get(key)
        if entry is None:
            return None
        until, error = entry
        if now >= until:
            del self._bad[key]
            return None
        return error

    def put_failure(
        self, token: str, issuer: str, client_id: str, error: TokenError, now: float
    ) -> None:
        if error.code not in _STABLE_FAILURES or self.negative_entries <= 0:
            return
        key = self._key(token, issuer, client_id)
        self._bad[key] = (now + self.negative_ttl, error)
        self._bad.move_to_end(key)
        while len(self._bad) > self.negative_entries:
            self._bad.popitem(last=False)

    def clear(self) -> None:
        self._ok.clear()
        self._bad.clear()
