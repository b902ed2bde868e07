"""One piece of work per secret across every replica (the refresh grant of one refresh token):
a short lock in the session store, and the outcome shared sealed with a key only holders of
the secret can derive.

Why: a provider that rotates refresh tokens treats a second use of one as theft and revokes
the whole grant (RFC 9700 4.14.2), so ten concurrent refreshes must reach it once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sidecar.errors import (
    BadRequest,
    GatewayTimeout,
    ProviderError,
    ServiceUnavailable,
    SidecarError,
    Unauthorized,
)
from sidecar.sessions.store import SessionStore

log = logging.getLogger("sidecar.oidc")

OUTCOME_SECONDS = 10  # how long a finished flight's outcome answers latecomers
_POLL_FIRST, _POLL_MAX = 0.02, 0.25  # seconds between a waiter's looks at the outcome
_REPLAYED: dict[int, type[SidecarError]] = {
    400: BadRequest,
    401: Unauthorized,
    502: ProviderError,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}
# Leaders whose caller went away: their flight still finishes for the waiters.
_flights: set[asyncio.Task[dict[str, Any]]] = set()

Work = Callable[[], Awaitable[Mapping[str, Any]]]


def digest(secret: str) -> str:
    """What the store sees of a secret: its SHA-256, never the secret itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _cipher(kind: str, secret: str) -> AESGCM:
    # Security: the key comes from the secret, which the store never holds, so whoever reads
    # the store (a Redis dump, a replica of it) cannot open the tokens in an outcome.
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"sidecar {kind} outcome".encode()
    ).derive(secret.encode())
    return AESGCM(key)


def seal(kind: str, secret: str, flight: str, outcome: Mapping[str, Any]) -> dict[str, str]:
    nonce = os.urandom(12)
    aad = f"{kind}:{flight}".encode()
    box = _cipher(kind, secret).encrypt(nonce, json.dumps(dict(outcome)).encode(), aad)
    return {"flight": flight, "box": base64.b64encode(nonce + box).decode("ascii")}


def unseal(kind: str, secret: str, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The outcome in a stored record; None when it is not one this secret sealed."""
    flight, box = record.get("flight"), record.get("box")
    if not isinstance(flight, str) or not isinstance(box, str):
        return None
    try:
        raw = base64.b64decode(box, validate=True)
        plain = _cipher(kind, secret).decrypt(raw[:12], raw[12:], f"{kind}:{flight}".encode())
        outcome = json.loads(plain)
    except (binascii.Error, InvalidTag, ValueError):
        return None
    return outcome if isinstance(outcome, dict) else None


def _result(outcome: Mapping[str, Any]) -> dict[str, Any]:
    """A success's value, or the leader's error raised again (same status and reason)."""
    value = outcome.get("ok")
    if isinstance(value, dict):
        return value
    status, reason = outcome.get("status"), outcome.get("reason")
    if not isinstance(status, int) or not isinstance(reason, str):
        raise ServiceUnavailable("unreadable shared outcome")
    raise _REPLAYED.get(status, ServiceUnavailable)(reason)


async def single_flight(
    store: SessionStore,
    kind: str,
    secret: str,
    work: Work,
    *,
    lock_seconds: float,
    outcome_seconds: int = OUTCOME_SECONDS,
) -> dict[str, Any]:
    """`work()`'s value for this secret, computed by one caller on one replica at a time.

    Callers that find the lock held wait (polling, at most `lock_seconds`) for the holder's
    outcome: its value, or its error raised again. A success also answers latecomers for
    `outcome_seconds`; an error answers only that flight's waiters, and the lock is released,
    so the next caller tries again.
    """
    key = digest(secret)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lock_seconds
    waited_for: str | None = None
    pause = _POLL_FIRST
    while True:
        record = await store.get_record(f"{kind}-outcome", key)
        outcome = None if record is None else unseal(kind, secret, record)
        if outcome is not None and ("ok" in outcome or _record_flight(record) == waited_for):
            return _result(outcome)
        taken, holder = await store.acquire_lock(kind, key, lock_seconds)
        if taken:
            flight = asyncio.ensure_future(
                _lead(store, kind, secret, key, holder, work, lock_seconds, outcome_seconds)
            )
            _flights.add(flight)
            flight.add_done_callback(_finished)
            # Shielded: a caller that disconnects does not cancel the provider call its
            # waiters (and the rotated token) depend on.
            return await asyncio.shield(flight)
        waited_for = holder
        if loop.time() >= deadline:
            raise GatewayTimeout(f"another {kind} of this token is still running; retry")
        await asyncio.sleep(pause)
        pause = min(pause * 2, _POLL_MAX)


def _finished(flight: asyncio.Task[dict[str, Any]]) -> None:
    _flights.discard(flight)
    if not flight.cancelled():
        flight.exception()  # retrieved: its caller may be gone; the waiters got it from the store


def _record_flight(record: Mapping[str, Any] | None) -> str | None:
    flight = None if record is None else record.get("flight")
    return flight if isinstance(flight, str) else None


async def _lead(
    store: SessionStore,
    kind: str,
    secret: str,
    key: str,
    flight: str,
    work: Work,
    lock_seconds: float,
    outcome_seconds: int,
) -> dict[str, Any]:
    try:
        # A flight that finished between our look and our lock: its outcome stands.
        record = await store.get_record(f"{kind}-outcome", key)
        earlier = None if record is None else unseal(kind, secret, record)
        if earlier is not None and "ok" in earlier:
            return _result(earlier)
        failure: SidecarError | None = None
        try:
            # Ends before the lock does, so no second flight starts while this one runs.
            async with asyncio.timeout(max(lock_seconds - 1.0, lock_seconds / 2)):
                value = dict(await work())
        except TimeoutError:
            failure = GatewayTimeout(f"the {kind} took too long")
        except SidecarError as exc:
            failure = exc
        outcome = (
            {"ok": value}
            if failure is None
            else {"status": failure.status, "reason": failure.reason}
        )
        await store.put_record(
            f"{kind}-outcome", key, seal(kind, secret, flight, outcome), outcome_seconds
        )
        if failure is not None:
            raise failure
        return value
    finally:
        try:
            await store.release_lock(kind, key, flight)
        except SidecarError as exc:  # it ends by itself after lock_seconds
            log.warning("could not release the %s lock: %s", kind, exc.reason)
