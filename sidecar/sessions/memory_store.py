"""The in-process store for a single replica: dicts, expiry on read plus a periodic sweep."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.config import SESSION_MAX_LIFETIME
from sidecar.sessions.models import Session, User
from sidecar.sessions.store import SessionStore, StoreEvent, UserId


def _object(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise TypeError("records are JSON objects")
    return value


class MemoryStore(SessionStore):
    """Everything lives in this process, so events are local and the cache is off by default
    (the dicts are as fast as a cache would be)."""

    def __init__(
        self,
        *,
        local_cache_seconds: float = 0.0,
        sweep_seconds: float = 60.0,
        max_lifetime: int = SESSION_MAX_LIFETIME,
    ) -> None:
        super().__init__(local_cache_seconds=local_cache_seconds, max_lifetime=max_lifetime)
        # Deadlines on the monotonic clock, like Redis PX: a record outlives neither.
        self._sessions: dict[str, tuple[Session, float]] = {}
        self._index: dict[UserId, set[str]] = {}
        self._users: dict[UserId, User] = {}
        self._records: dict[tuple[str, str], tuple[bytes, float]] = {}
        self._locks: dict[tuple[str, str], tuple[str, float]] = {}  # -> (token, deadline)
        self._groups: dict[tuple[str, str], tuple[set[str], float]] = {}
        self._sweep_seconds = sweep_seconds
        self._sweeper: asyncio.Task[None] | None = None
        self._set_listening(True)  # no remote writers: nothing can be missed

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def ping(self) -> bool:
        return True

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_seconds)
            self.sweep()

    def sweep(self) -> None:
        """Drop every expired session and record."""
        now = time.monotonic()
        for key, (session, deadline) in list(self._sessions.items()):
            if deadline <= now:
                self._drop(session.db, session.name, key)
        for name, (_, deadline) in list(self._records.items()):
            if deadline <= now:
                del self._records[name]
        for lock, (_, deadline) in list(self._locks.items()):
            if deadline <= now:
                del self._locks[lock]
        for group, (_, deadline) in list(self._groups.items()):
            if deadline <= now:
                del self._groups[group]

    def _drop(self, db: str, name: str, key: str) -> None:
        self._sessions.pop(key, None)
        keys = self._index.get((db, name))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._index[(db, name)]

    def _live(self, key: str) -> Session | None:
        entry = self._sessions.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            self._drop(entry[0].db, entry[0].name, key)
            return None
        return entry[0]

    async def _load_session(self, key: str) -> Session | None:
        return self._live(key)

    async def _insert_session(self, session: Session, now: float) -> None:
        self._sessions[session.key] = (session, time.monotonic() + session.expires - now)
        self._index.setdefault((session.db, session.name), set()).add(session.key)

    async def _update_session(
        self, key: str, change: Callable[[Session], Session], *, now: float | None
    ) -> Session | None:
        current = self._live(key)
        if current is None:
            return None
        new = change(current)
        deadline = self._sessions[key][1] if now is None else time.monotonic() + new.expires - now
        self._sessions[key] = (new, deadline)
        return new

    async def _load_user_sessions(self, db: str, name: str) -> list[Session]:
        live = (self._live(key) for key in list(self._index.get((db, name), ())))
        return [session for session in live if session is not None]

    async def _remove_sessions(self, db: str, name: str, keys: list[str]) -> None:
        for key in keys:
            self._drop(db, name, key)

    async def _load_user(self, db: str, name: str) -> User | None:
        return self._users.get((db, name))

    async def _save_user(self, user: User) -> None:
        self._users[(user.db, user.name)] = user

    async def _remove_user(self, db: str, name: str) -> bool:
        return self._users.pop((db, name), None) is not None

    async def put_record(self, kind: str, key: str, value: Mapping[str, Any], ttl: int) -> None:
        # Stored as JSON, as in Redis, so both stores accept and return the same values.
        self._records[(kind, key)] = (json.dumps(dict(value)).encode(), time.monotonic() + ttl)

    async def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        entry = self._records.get((kind, key))
        if entry is None or entry[1] <= time.monotonic():
            return None
        return _object(entry[0])

    async def take_record(self, kind: str, key: str) -> dict[str, Any] | None:
        record = await self.get_record(kind, key)
        self._records.pop((kind, key), None)
        return record

    async def acquire_lock(self, kind: str, key: str, ttl: float) -> tuple[bool, str]:
        now = time.monotonic()
        held = self._locks.get((kind, key))
        if held is not None and held[1] > now:
            return False, held[0]
        token = secrets.token_urlsafe(16)
        self._locks[(kind, key)] = (token, now + ttl)
        return True, token

    async def release_lock(self, kind: str, key: str, token: str) -> bool:
        held = self._locks.get((kind, key))
        if held is None or held[0] != token:
            return False
        del self._locks[(kind, key)]
        return held[1] > time.monotonic()

    async def _add_to_group(self, kind: str, key: str, member: str, ttl: int) -> None:
        now = time.monotonic()
        members, deadline = self._groups.get((kind, key), (set(), now))
        if deadline <= now:
            members = set()
        members.add(member)
        self._groups[(kind, key)] = (members, max(deadline, now + ttl))  # as Redis's GT expiry

    async def _take_group(self, kind: str, key: str) -> list[str]:
        entry = self._groups.pop((kind, key), None)
        if entry is None or entry[1] <= time.monotonic():
            return []
        return sorted(entry[0])

    async def _put_record_if_absent(
        self, kind: str, key: str, value: Mapping[str, Any], ttl: int
    ) -> bool:
        if await self.get_record(kind, key) is not None:
            return False
        await self.put_record(kind, key, value, ttl)
        return True

    async def _publish(self, event: StoreEvent) -> None:
        """Nobody else to tell: `_emit` already delivered it here."""
