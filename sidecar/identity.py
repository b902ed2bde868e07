"""Who a caller is, once proven: what the auth middleware hands the proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    email: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    channels: frozenset[str] = field(default_factory=frozenset)
    via: Literal["session", "bearer"] = "session"
    session_id: str | None = None  # the session's public id when via == "session"
    session_key: str | None = None  # its store key (the id's hash), what revocations name
    provider: str | None = None
    # Set when the session's expiry just moved (created or extended): the answer re-sends the
    # cookie with the new Expires, as Sync Gateway does, so browsers keep it.
    session_expires: float | None = None
    # When the credential stops proving who this is (epoch seconds): the session's expiry as
    # read for this request, or the bearer token's exp plus the clock-skew leeway. A live
    # stream is ended then (sidecar/exchanges.py); None means no such end.
    valid_until: float | None = None
