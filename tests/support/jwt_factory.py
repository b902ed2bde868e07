"""Mint JWS tokens with our own keys for tests, including deliberately hostile ones.

Signing is done by hand (header and payload encoded as given) so tests can put anything in
the header — `crit`, `jku`, `alg: none` — that a well-behaved library would refuse to write.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings
from dataclasses import dataclass
from typing import Any

from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, KeyParameters, KeySet, KeySetSerialization, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

ISSUER = "https://op.example.com"
CLIENT_ID = "sidecar-client"
NOW = 1_700_000_000


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")))


@dataclass(frozen=True)
class SigningKey:
    """A private key, its kid, and the algorithm it signs with."""

    alg: str
    private: Key

    @property
    def kid(self) -> str:
        kid = self.private.kid
        assert kid is not None
        return kid

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        jwk = dict(self.private.as_dict(private=False))
        jwk.update(extra)
        return jwk


_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def make_key(alg: str, kid: str, *, rsa_bits: int = 2048) -> SigningKey:
    params: KeyParameters = {"kid": kid}
    family = _FAMILY[alg[:2]]
    key: Key
    if family == "RSA":
        with warnings.catch_warnings():  # weak keys are wanted by some tests
            warnings.simplefilter("ignore", SecurityWarning)
            key = RSAKey.generate_key(rsa_bits, parameters=params)
    elif family == "EC":
        key = ECKey.generate_key(_CURVE[alg], parameters=params)
    else:
        key = OKPKey.generate_key("Ed25519", parameters=params)
    return SigningKey(alg, key)


def jwks(*keys: SigningKey, **extra: Any) -> dict[str, Any]:
    return {"keys": [k.public_jwk(**extra) for k in keys]}


def keyset(*keys: SigningKey) -> KeySet:
    document: KeySetSerialization = {"keys": [k.public_jwk() for k in keys]}
    return KeySet.import_key_set(document)


def claims(now: float = NOW, **overrides: Any) -> dict[str, Any]:
    """A valid ID token claim set; an override of None removes the claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "sub": "user-123",
        "iat": int(now),
        "exp": int(now) + 300,
        "nonce": "n-0S6_WzA2Mj",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def header_for(key: SigningKey, **overrides: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    header.update(overrides)
    return {k: v for k, v in header.items() if v is not None}


def sign(key: SigningKey, header_b64: str, payload_b64: str, alg: str | None = None) -> str:
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    model = JWSRegistry.algorithms[alg or key.alg]
    return b64(model.sign(signing_input, key.private))


def mint(
    key: SigningKey,
    payload: dict[str, Any] | None = None,
    *,
    header: dict[str, Any] | None = None,
    raw_payload: bytes | None = None,
) -> str:
    """A token signed by `key` (with its own alg) over exactly the given header and payload."""
    h = b64json(header if header is not None else header_for(key))
    p = b64(raw_payload) if raw_payload is not None else b64json(payload or claims())
    return f"{h}.{p}.{sign(key, h, p)}"


def mint_hs256(secret: bytes, payload: dict[str, Any], header: dict[str, Any]) -> str:
    """HMAC-signed token (the classic RSA-public-key-as-HMAC-secret confusion attack)."""
    h, p = b64json(header), b64json(payload)
    mac = hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(mac)}"


def mint_unsigned(payload: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    return f"{b64json(header or {'alg': 'none'})}.{b64json(payload)}."
