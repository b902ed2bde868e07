"""Who an ID token's claims make a user, as Sync Gateway decides it: the name, the email,
and the roles/channels granted by the token; registering or refusing on login."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit

from sidecar.errors import Unauthorized
from sidecar.sessions.models import User

# Go's url.QueryEscape leaves only these bytes alone (shouldEscape, encodeQueryComponent).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Sync Gateway's auth.IsValidEmail; Go's \w is ASCII-only, and `$` must not accept a trailing
# newline, hence fullmatch + re.ASCII.
_EMAIL = re.compile(r"[-+.\w]+@\w[-.\w]+", re.ASCII)


class UsernameError(Unauthorized):
    """The token's claims cannot name a user (empty sub, missing or unusable username claim)."""


class ClaimError(UsernameError):
    """A roles/channels claim has a shape other than a string or a list of strings."""


class LoginRefused(Unauthorized):
    """The user is unknown and may not register, or is disabled."""


def go_query_escape(value: str) -> str:
    """Go's `url.QueryEscape`: UTF-8 bytes, unreserved kept, space as `+`, the rest `%XX`.

    Lone surrogates (which Python's JSON decoder keeps and Go's turns into U+FFFD) become
    U+FFFD first, so the same token gives the same name here and in Sync Gateway.
    """
    data = _SURROGATE.sub("\ufffd", value).encode("utf-8")
    out: list[str] = []
    for byte in data:
        if byte in _UNRESERVED:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def issuer_prefix(issuer: str) -> str:
    """The user prefix when neither `user_prefix` nor `username_claim` is set: the issuer's
    host + path, query-escaped (`https://www.someprovider.com/extra` ->
    `www.someprovider.com%2Fextra`). Like Go's URL, the host drops any userinfo and the path
    is percent-decoded before escaping.

    Sync Gateway falls back to the provider name for an issuer it cannot parse; the config
    only admits absolute URLs, so here the whole issuer is escaped instead.
    """
    parts = urlsplit(issuer)
    if not parts.scheme or not parts.netloc:
        return go_query_escape(issuer)
    host = parts.netloc.rpartition("@")[2]
    return go_query_escape(host + unquote(parts.path))


def format_number(value: int | float) -> str:
    """A numeric claim as Sync Gateway prints it (Go `strconv.FormatFloat(v, 'f', -1, 64)`):
    shortest round-trip digits, never an exponent (1.0 -> "1", 1e21 -> "1000...0", -0.0 -> "-0").

    Deliberate difference: integers are printed exactly. Sync Gateway decodes every JSON
    number as float64, so integers beyond 2**53 get rounded there and distinct ids can
    collapse into one user name; here they never collide.
    """
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):  # Python's JSON decoder accepts NaN/Infinity; Go's does not
        raise UsernameError("username claim is not a finite number")
    return format(Decimal(repr(value)).normalize(), "f")


def _claim_as_name(value: Any, claim: str) -> str:
    if isinstance(value, bool) or value is None:  # bool is an int in Python, not in JSON
        raise UsernameError(f"username claim {claim!r} is not a string or number")
    if isinstance(value, str):
        # Deliberate: Sync Gateway would take "" (with no prefix, the guest user's name).
        if not value:
            raise UsernameError(f"username claim {claim!r} is empty")
        return go_query_escape(value)
    if isinstance(value, int | float):
        return go_query_escape(format_number(value))
    raise UsernameError(f"username claim {claim!r} is not a string or number")


def username_from_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    user_prefix: str | None,
    username_claim: str | None,
) -> str:
    """The Sync Gateway user name for a validated token's claims.

    - `username_claim` set: the escaped claim value, as `user_prefix + "_" + value` when a
      prefix is set.
    - otherwise: `prefix + "_" + escaped(sub)`, the prefix being `user_prefix` or, when unset,
      the escaped issuer host+path.
    Empty strings count as unset, as in Go. Raises UsernameError when `sub` is missing, empty
    or not a string (OIDC Core 2 makes it required), or the username claim is missing, empty,
    or neither a string nor a number.
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise UsernameError("token has no subject")
    if username_claim:
        if username_claim not in claims:
            raise UsernameError(f"username claim {username_claim!r} not found in token")
        name = _claim_as_name(claims[username_claim], username_claim)
        return f"{user_prefix}_{name}" if user_prefix else name
    prefix = user_prefix or issuer_prefix(issuer)
    return f"{prefix}_{go_query_escape(sub)}"


def claim_strings(claims: Mapping[str, Any], claim_name: str | None) -> tuple[str, ...]:
    """The roles or channels a `roles_claim`/`channels_claim` grants.

    A string is one item, a list of strings is those items (duplicates and empty strings
    dropped, order kept); no claim configured, a missing claim or null grants nothing.
    Sync Gateway documents these claims as "a string or string[]"; any other shape raises
    ClaimError so a misconfigured provider fails loudly instead of silently losing grants.
    """
    if not claim_name:
        return ()
    value = claims.get(claim_name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(dict.fromkeys(item for item in value if item))
    raise ClaimError(f"claim {claim_name!r} is not a string or a list of strings")


def valid_email(value: Any) -> str | None:
    """`value` when it is a syntactically valid email by Sync Gateway's rule, else None."""
    if isinstance(value, str) and _EMAIL.fullmatch(value):
        return value
    return None


def apply_login(
    existing: User | None,
    claims: Mapping[str, Any],
    *,
    db: str,
    name: str,
    issuer: str,
    roles_claim: str | None,
    channels_claim: str | None,
    register: bool,
    now: float,
) -> User:
    """The user after a successful token validation: registered when missing and `register`,
    refreshed otherwise.

    Refreshed: the email when the token carries a valid one (an absent or invalid email keeps
    the stored one, as Sync Gateway does), the issuer, and the token-granted roles/channels,
    which a missing claim clears. Admin-granted roles/channels are never touched.
    Raises LoginRefused("Invalid login") for a missing user without `register` and for a
    disabled user; ClaimError for a malformed roles/channels claim.
    """
    if existing is not None and (existing.db, existing.name) != (db, name):
        raise ValueError("existing user does not match db/name")
    # Claims are checked before the registration decision so a bad token never creates a user.
    jwt_roles = claim_strings(claims, roles_claim)
    jwt_channels = claim_strings(claims, channels_claim)
    email = valid_email(claims.get("email"))
    if existing is None:
        if not register:
            raise LoginRefused("Invalid login")
        return User(
            db=db,
            name=name,
            email=email,
            jwt_issuer=issuer,
            jwt_roles=jwt_roles,
            jwt_channels=jwt_channels,
            jwt_last_updated=now,
        )
    if existing.disabled:  # security: a disabled user must not get in through a fresh token
        raise LoginRefused("Invalid login")
    return replace(
        existing,
        email=email if email is not None else existing.email,
        jwt_issuer=issuer,
        jwt_roles=jwt_roles,
        jwt_channels=jwt_channels,
        jwt_last_updated=now,
    )
