"""Users and sessions as stored (frozen records and their JSON), session ids and the
extension rule (idle TTL, never past the absolute lifetime)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

from sidecar.config import SESSION_MAX_LIFETIME
from sidecar.identity import Identity

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # urlsafe base64 of 32 bytes, no padding
_SESSION_KEY = re.compile(r"[0-9a-f]{64}")  # sha256 hex digest


def new_session_id() -> str:
    """A fresh session id: 256 random bits, urlsafe base64 without padding (43 chars)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def is_well_formed_session_id(value: str) -> bool:
    """Cheap shape check so junk cookies never reach the store."""
    return _SESSION_ID.fullmatch(value) is not None


def is_well_formed_session_key(value: str) -> bool:
    return _SESSION_KEY.fullmatch(value) is not None


def hash_session_id(session_id: str) -> str:
    """The store key for a session id.

    Security: the store only ever holds this digest, never the id, so a leaked dump or a
    read-only Redis user yields no usable cookie. The id has 256 bits of entropy, so an
    unsalted fast hash is enough (nothing to brute-force).
    """
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def needs_extension(session: Session, now: float) -> bool:
    """Sync Gateway's rule: extend back to the full ttl once that moves the expiry forward by
    more than 10% of it (i.e. more than 10% elapsed since the last extension), but never past
    `max_expires`; the last step up to `max_expires` is taken whatever its size, once."""
    target = session.extension_target(now)
    gain = target - session.expires
    return gain > session.ttl / 10 or (gain > 0 and target == session.max_expires)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def _optional_str(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{what} must be a string or null")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number")
    return float(value)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


@dataclass(frozen=True, slots=True)
class User:
    db: str
    name: str
    email: str | None = None
    admin_channels: tuple[str, ...] = ()
    admin_roles: tuple[str, ...] = ()
    disabled: bool = False
    jwt_issuer: str | None = None
    jwt_roles: tuple[str, ...] = ()
    jwt_channels: tuple[str, ...] = ()
    jwt_last_updated: float | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.admin_roles) | set(self.jwt_roles)))

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.admin_channels) | set(self.jwt_channels)))

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "db": self.db,
                "name": self.name,
                "email": self.email,
                "admin_channels": list(self.admin_channels),
                "admin_roles": list(self.admin_roles),
                "disabled": self.disabled,
                "jwt_issuer": self.jwt_issuer,
                "jwt_roles": list(self.jwt_roles),
                "jwt_channels": list(self.jwt_channels),
                "jwt_last_updated": self.jwt_last_updated,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> User:
        """Parse a stored user; raises ValueError on anything malformed."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("user must be an object")
        last = data.get("jwt_last_updated")
        disabled = data.get("disabled", False)
        if not isinstance(disabled, bool):
            raise ValueError("disabled must be a boolean")
        return cls(
            db=_str(data.get("db"), "db"),
            name=_str(data.get("name"), "name"),
            email=_optional_str(data.get("email"), "email"),
            admin_channels=_strings(data.get("admin_channels", []), "admin_channels"),
            admin_roles=_strings(data.get("admin_roles", []), "admin_roles"),
            disabled=disabled,
            jwt_issuer=_optional_str(data.get("jwt_issuer"), "jwt_issuer"),
            jwt_roles=_strings(data.get("jwt_roles", []), "jwt_roles"),
            jwt_channels=_strings(data.get("jwt_channels", []), "jwt_channels"),
            jwt_last_updated=None if last is None else _number(last, "jwt_last_updated"),
        )


@dataclass(frozen=True, slots=True)
class Session:
    """A live session. `key` is hash_session_id(id); roles/channels snapshot the user's.

    `max_expires` is the absolute end (created + session.max_lifetime): no extension goes past
    it. `renewed` is when the expiry was last set (creation or extension). Both may be None
    only in records built by hand: no absolute end, and `expires - ttl`.
    """

    key: str
    db: str
    name: str
    email: str | None
    roles: tuple[str, ...]
    channels: tuple[str, ...]
    provider: str | None
    created: float
    expires: float
    ttl: int
    max_expires: float | None = None
    renewed: float | None = None

    @classmethod
    def for_user(
        cls,
        user: User,
        *,
        key: str,
        ttl: int,
        provider: str | None,
        now: float,
        max_lifetime: int = SESSION_MAX_LIFETIME,
    ) -> Session:
        max_expires = now + max_lifetime
        return cls(
            key=key,
            db=user.db,
            name=user.name,
            email=user.email,
            roles=user.roles,
            channels=user.channels,
            provider=provider,
            created=now,
            expires=min(now + ttl, max_expires),  # an admin ttl above max_lifetime is cut
            ttl=ttl,
            max_expires=max_expires,
            renewed=now,
        )

    @property
    def last_renewed(self) -> float:
        return self.expires - self.ttl if self.renewed is None else self.renewed

    def extension_target(self, now: float) -> float:
        """The expiry an extension at `now` would set: a full ttl, cut at `max_expires`."""
        target = now + self.ttl
        return target if self.max_expires is None else min(target, self.max_expires)

    def with_user(self, user: User) -> Session:
        """This session with its identity snapshot refreshed from `user`."""
        return replace(self, email=user.email, roles=user.roles, channels=user.channels)

    def extended(self, now: float) -> Session:
        return replace(self, expires=self.extension_target(now), renewed=now)

    def to_identity(self, session_id: str) -> Identity:
        return Identity(
            name=self.name,
            email=self.email,
            roles=frozenset(self.roles),
            channels=frozenset(self.channels),
            via="session",
            session_id=session_id,
            provider=self.provider,
        )

    def to_json(self) -> bytes:
        # The key is not stored in the value: it is the record's address already.
        return json.dumps(
            {
                "db": self.db,
                "name": self.name,
                "email": self.email,
                "roles": list(self.roles),
                "channels": list(self.channels),
                "provider": self.provider,
                "created": self.created,
                "expires": self.expires,
                "ttl": self.ttl,
                "max_expires": self.max_expires,
                "renewed": self.renewed,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> Session:
        """Parse a stored session; raises ValueError on anything malformed."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("session must be an object")
        ttl = data.get("ttl")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise ValueError("ttl must be a positive integer")
        created = _number(data.get("created"), "created")
        # Records written before max_lifetime existed get the default absolute end.
        max_expires = data.get("max_expires", created + SESSION_MAX_LIFETIME)
        renewed = data.get("renewed")
        return cls(
            key=key,
            db=_str(data.get("db"), "db"),
            name=_str(data.get("name"), "name"),
            email=_optional_str(data.get("email"), "email"),
            roles=_strings(data.get("roles", []), "roles"),
            channels=_strings(data.get("channels", []), "channels"),
            provider=_optional_str(data.get("provider"), "provider"),
            created=created,
            expires=_number(data.get("expires"), "expires"),
            ttl=ttl,
            max_expires=None if max_expires is None else _number(max_expires, "max_expires"),
            renewed=None if renewed is None else _number(renewed, "renewed"),
        )
