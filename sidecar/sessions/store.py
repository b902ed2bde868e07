"""The session and user store: the API every backend offers, with the local cache and the
invalidation events implemented once on top of a few raw backend operations."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.config import SESSION_MAX_LIFETIME
from sidecar.errors import ServiceUnavailable, Unauthorized
from sidecar.sessions.models import (
    Session,
    User,
    hash_session_id,
    is_well_formed_session_id,
    is_well_formed_session_key,
    needs_extension,
    new_session_id,
)

__all__ = [
    "InactiveUser",
    "LocalCache",
    "SessionStore",
    "StoreEvent",
    "StoreUnavailable",
    "create_store",
    "hash_session_id",
    "is_well_formed_session_id",
    "is_well_formed_session_key",
    "needs_extension",
    "new_session_id",
]

log = logging.getLogger(__name__)

UserId = tuple[str, str]  # (db, name)
Listener = Callable[["StoreEvent"], None]


class StoreUnavailable(ServiceUnavailable):
    """The backend could not be reached or answered garbage. Callers must fail closed."""

    def __init__(self, reason: str = "session store unavailable") -> None:
        super().__init__(reason)


class InactiveUser(Unauthorized):
    """create_session for a user that is not stored, or is disabled."""

    def __init__(self) -> None:
        super().__init__("Invalid login")


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """A session was deleted, or a user changed/was disabled/deleted/revoked.

    Delivered to local listeners on every replica; `key` is the session's hash, never its id.
    `revoked` is False only for a user whose record changed while their sessions live on
    (with refreshed roles/channels); True means sessions ended.
    """

    kind: Literal["session", "user"]
    db: str
    name: str | None = None
    key: str | None = None
    revoked: bool = True


class LocalCache:
    """Bounded LRU of sessions (by key) and users, each entry with its own deadline."""

    def __init__(self, seconds: float, max_entries: int) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._sessions: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._by_user: dict[UserId, set[str]] = {}
        self._users: OrderedDict[UserId, tuple[User | None, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._sessions) + len(self._users)

    def session(self, key: str, now: float) -> Session | None:
        entry = self._sessions.get(key)
        if entry is None:
            return None
        if now >= entry[1]:
            self.drop_session(key)
            return None
        self._sessions.move_to_end(key)
        return entry[0]

    def put_session(self, session: Session, now: float) -> None:
        until = min(now + self.seconds, session.expires)  # never beyond the session's life
        if until <= now:
            return
        self.drop_session(session.key)
        self._sessions[session.key] = (session, until)
        self._by_user.setdefault((session.db, session.name), set()).add(session.key)
        while len(self._sessions) > self.max_entries:
            self.drop_session(next(iter(self._sessions)))

    def drop_session(self, key: str) -> None:
        entry = self._sessions.pop(key, None)
        if entry is not None:
            uid = (entry[0].db, entry[0].name)
            keys = self._by_user.get(uid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[uid]

    def user(self, uid: UserId, now: float) -> tuple[bool, User | None]:
        """(hit, user); a hit may be a cached "no such user"."""
        entry = self._users.get(uid)
        if entry is None:
            return False, None
        if now >= entry[1]:
            del self._users[uid]
            return False, None
        self._users.move_to_end(uid)
        return True, entry[0]

    def put_user(self, uid: UserId, user: User | None, now: float) -> None:
        self._users[uid] = (user, now + self.seconds)
        self._users.move_to_end(uid)
        while len(self._users) > self.max_entries:
            self._users.popitem(last=False)

    def drop_user(self, uid: UserId) -> None:
        """Forget the user and every cached session of theirs."""
        self._users.pop(uid, None)
        for key in list(self._by_user.get(uid, ())):
            self.drop_session(key)

    def clear(self) -> None:
        self._sessions.clear()
        self._by_user.clear()
        self._users.clear()


class SessionStore(ABC):
    """Sessions and users, cached locally and invalidated on every replica.

    Subclasses implement the raw `_`-operations against their backend (raising
    StoreUnavailable on backend failure) and call `_set_listening` / `_receive` as their
    invalidation feed comes and goes; everything else lives here.
    """

    def __init__(
        self,
        *,
        local_cache_seconds: float,
        cache_entries: int = 100_000,
        max_lifetime: int = SESSION_MAX_LIFETIME,
    ) -> None:
        self._cache = LocalCache(local_cache_seconds, cache_entries)
        self.max_lifetime = max_lifetime  # session.max_lifetime for the sessions it creates
        self._listeners: list[Listener] = []
        # Bumped on every invalidation: a read that started before one must not fill the cache.
        self._epoch = 0
        self._generation = 0
        self._listening = False
        self._extending: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> bool: ...

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(
        self, user: User, *, ttl: int, provider: str | None, now: float
    ) -> tuple[str, Session]:
        """A new session for a stored, enabled user: (the id for the cookie, the record).

        It ends at the latest `max_lifetime` after `now`, however often it is extended."""
        session_id = new_session_id()
        session = Session.for_user(
            user,
            key=hash_session_id(session_id),
            ttl=ttl,
            provider=provider,
            now=now,
            max_lifetime=self.max_lifetime,
        )
        await self._insert_session(session, now)
        # Security: re-read the user only after the session is indexed. put_user/delete_user
        # write the user before reading the index, so a concurrent disable or delete either
        # sees this session in the index or is seen here; no session outlives it.
        stored = await self._load_user(user.db, user.name)
        if stored is None or stored.disabled:
            await self._remove_sessions(user.db, user.name, [session.key])
            raise InactiveUser()
        if session.with_user(stored) != session:  # the user changed under the caller
            changed = await self._update_session(
                session.key, lambda s: s.with_user(stored), now=None
            )
            if changed is None:
                raise InactiveUser()
            session = changed
        return session_id, session

    def cached_session(self, db: str, session_id: str, now: float) -> Session | None:
        """The session from this replica's cache when the cache alone may answer: every
        revocation is being heard, the record is cached, live, of `db`, and no extension is
        due. None means only that `get_session` must decide (it makes the same checks)."""
        if not self._listening or not is_well_formed_session_id(session_id):
            return None
        session = self._cache.session(hash_session_id(session_id), now)
        if session is None or session.db != db or session.expires <= now:
            return None
        return None if needs_extension(session, now) else session

    async def get_session(self, db: str, session_id: str, now: float) -> Session | None:
        """The live session for a cookie value, extended when due; None if unknown/expired.

        Hot path: a warm cache answers with no backend round trip, a miss costs one.
        """
        if not is_well_formed_session_id(session_id):
            return None  # Security: junk never reaches the store
        key = hash_session_id(session_id)
        session = self._cache.session(key, now) if self._listening else None
        if session is None:
            epoch = self._epoch
            session = await self._load_session(key)
            if session is None or session.expires <= now:
                return None
            if self._may_cache(epoch):
                self._cache.put_session(session, now)
        if session.db != db or session.expires <= now:
            return None
        if needs_extension(session, now) and key not in self._extending:
            return await self._extend(session, now)
        return session

    async def get_session_by_key(self, db: str, key: str, now: float) -> Session | None:
        """Fresh from the backend (no cache, no extension): for admin and revalidation."""
        if not is_well_formed_session_key(key):
            return None
        session = await self._load_session(key)
        if session is None or session.db != db or session.expires <= now:
            return None
        return session

    async def delete_session(self, db: str, session_id: str) -> bool:
        if not is_well_formed_session_id(session_id):
            return False
        return await self.delete_session_by_key(db, hash_session_id(session_id))

    async def delete_session_by_key(self, db: str, key: str) -> bool:
        if not is_well_formed_session_key(key):
            return False
        session = await self._load_session(key)
        if session is None or session.db != db:
            return False
        await self._remove_sessions(db, session.name, [key])
        await self._emit(StoreEvent("session", db, session.name, key))
        return True

    async def list_user_sessions(self, db: str, name: str, now: float) -> list[Session]:
        sessions = await self._load_user_sessions(db, name)
        return sorted((s for s in sessions if s.expires > now), key=lambda s: s.created)

    async def delete_user_sessions(self, db: str, name: str) -> int:
        """Revoke every session of the user; returns how many there were."""
        keys = [s.key for s in await self._load_user_sessions(db, name)]
        if keys:
            await self._remove_sessions(db, name, keys)
        await self._emit(StoreEvent("user", db, name))
        return len(keys)

    # -- users ------------------------------------------------------------------------------

    async def get_user(self, db: str, name: str, now: float | None = None) -> User | None:
        uid = (db, name)
        now = time.time() if now is None else now
        if self._listening:
            hit, cached = self._cache.user(uid, now)
            if hit:
                return cached
        epoch = self._epoch
        user = await self._load_user(db, name)
        if self._may_cache(epoch):
            self._cache.put_user(uid, user, now)
        return user

    async def put_user(self, user: User) -> None:
        """Store the user, refresh (or, when disabled, delete) their sessions, tell everyone."""
        # Security: the user is written before the index is read; see create_session.
        await self._save_user(user)
        sessions = await self._load_user_sessions(user.db, user.name)
        if user.disabled:
            if sessions:
                await self._remove_sessions(user.db, user.name, [s.key for s in sessions])
        else:
            for session in sessions:
                if session.with_user(user) != session:
                    await self._update_session(session.key, lambda s: s.with_user(user), now=None)
        await self._emit(StoreEvent("user", user.db, user.name, revoked=user.disabled))

    async def delete_user(self, db: str, name: str) -> bool:
        existed = await self._remove_user(db, name)  # Security: first; see create_session
        sessions = await self._load_user_sessions(db, name)
        if sessions:
            await self._remove_sessions(db, name, [s.key for s in sessions])
        await self._emit(StoreEvent("user", db, name))
        return existed

    # -- short-lived records (login state, refresh token bindings) --------------------------

    @abstractmethod
    async def put_record(self, kind: str, key: str, value: Mapping[str, Any], ttl: int) -> None:
        """Keep a JSON object for `ttl` seconds under (kind, key); `key` should be a digest,
        never a secret itself, for the same reason sessions are stored by hash."""

    @abstractmethod
    async def get_record(self, kind: str, key: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def take_record(self, kind: str, key: str) -> dict[str, Any] | None:
        """Get and delete atomically: a record taken on one replica is gone for all."""

    # -- short locks (one replica does a piece of work, the others wait for its outcome) -----

    @abstractmethod
    async def acquire_lock(self, kind: str, key: str, ttl: float) -> tuple[bool, str]:
        """Take the lock (kind, key) for `ttl` seconds unless it is held, on every replica:
        (True, our token) or (False, the holder's token). `key` should be a digest, as for
        records. The lock ends by itself after `ttl`, so a crashed holder blocks nobody long."""

    @abstractmethod
    async def release_lock(self, kind: str, key: str, token: str) -> bool:
        """Release the lock if `token` still holds it (never one that expired and was taken
        again by someone else); True when it did."""

    # -- provider sessions (OIDC Back-Channel Logout 1.0) -------------------------------------

    async def link_sessions(self, kind: str, key: str, session_key: str, ttl: int) -> None:
        """Remember that `session_key` belongs to the group (kind, key) for `ttl` seconds, e.g.
        the provider's `sid` ("sid", digest) it was created under; the group lives as long as
        its longest-lived member. `key` should be a digest, as for records."""
        await self._add_to_group(kind, key, session_key, ttl)

    async def end_linked_sessions(self, db: str, kind: str, key: str) -> list[Session]:
        """Delete every live session of the group (kind, key) in `db` on every replica, with a
        revocation event each (which closes their websockets); returns the sessions ended."""
        ended: list[Session] = []
        for session_key in await self._take_group(kind, key):
            session = await self._load_session(session_key)
            if session is not None and await self.delete_session_by_key(db, session_key):
                ended.append(session)
        return ended

    async def add_record_once(
        self, kind: str, key: str, value: Mapping[str, Any], ttl: int
    ) -> bool:
        """Store the record unless (kind, key) already holds one; True when stored. Atomic on
        every replica: for single-use values (a logout token's jti)."""
        return await self._put_record_if_absent(kind, key, value, ttl)

    @abstractmethod
    async def _add_to_group(self, kind: str, key: str, member: str, ttl: int) -> None: ...

    @abstractmethod
    async def _take_group(self, kind: str, key: str) -> list[str]:
        """The group's members, removing the group (atomically: one taker wins)."""

    @abstractmethod
    async def _put_record_if_absent(
        self, kind: str, key: str, value: Mapping[str, Any], ttl: int
    ) -> bool: ...

    # -- events -----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` for every event, local or from another replica; returns unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    async def _emit(self, event: StoreEvent) -> None:
        """Apply locally at once, then tell the other replicas."""
        self._receive(event)
        await self._publish(event)

    def _receive(self, event: StoreEvent) -> None:
        self._epoch += 1
        if event.kind == "session" and event.key is not None:
            self._cache.drop_session(event.key)
        if event.name is not None:
            self._cache.drop_user((event.db, event.name))
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("session store listener failed on %s", event)

    def _invalidate_all(self) -> None:
        self._epoch += 1
        self._generation += 1
        self._cache.clear()

    @property
    def caching(self) -> bool:
        """Whether this replica hears every revocation now; local caches are safe only then."""
        return self._listening

    @property
    def generation(self) -> int:
        """Changes whenever events may have been missed: caches built on events start over."""
        return self._generation

    def _set_listening(self, listening: bool) -> None:
        """Security: without an invalidation feed we cannot hear revocations, so the cache is
        bypassed while it is down and emptied whenever it changes (messages may be lost)."""
        self._listening = listening
        self._invalidate_all()

    def _may_cache(self, epoch: int) -> bool:
        return self._listening and self._cache.enabled and self._epoch == epoch

    async def _extend(self, session: Session, now: float) -> Session | None:
        key = session.key
        self._extending.add(key)  # concurrent requests keep using the current copy meanwhile
        try:
            epoch = self._epoch
            fresh = await self._update_session(
                key, lambda s: s.extended(now) if needs_extension(s, now) else s, now=now
            )
        finally:
            self._extending.discard(key)
        if fresh is None or fresh.db != session.db or fresh.expires <= now:
            self._cache.drop_session(key)
            return None
        if self._may_cache(epoch):
            self._cache.put_session(fresh, now)
        return fresh

    # -- raw backend operations -------------------------------------------------------------

    @abstractmethod
    async def _load_session(self, key: str) -> Session | None:
        """One round trip."""

    @abstractmethod
    async def _insert_session(self, session: Session, now: float) -> None:
        """Write the session (living until its expires, counted from `now`) and index it."""

    @abstractmethod
    async def _update_session(
        self, key: str, change: Callable[[Session], Session], *, now: float | None
    ) -> Session | None:
        """Atomically replace a session with change(current); None if it is gone.

        With `now`, its lifetime is reset to its (new) expires; without, it is kept.
        """

    @abstractmethod
    async def _load_user_sessions(self, db: str, name: str) -> list[Session]:
        """The user's indexed sessions that still exist (dropping stale index entries)."""

    @abstractmethod
    async def _remove_sessions(self, db: str, name: str, keys: list[str]) -> None: ...

    @abstractmethod
    async def _load_user(self, db: str, name: str) -> User | None: ...

    @abstractmethod
    async def _save_user(self, user: User) -> None: ...

    @abstractmethod
    async def _remove_user(self, db: str, name: str) -> bool: ...

    @abstractmethod
    async def _publish(self, event: StoreEvent) -> None:
        """Deliver the event to the other replicas (not to this one)."""


def create_store(
    url: str | None,
    *,
    local_cache_seconds: float,
    prefix: str = "sidecar:",
    max_lifetime: int = SESSION_MAX_LIFETIME,
) -> SessionStore:
    """The store for `session_store` from the config: Redis for a URL, else in-process
    (whose dicts need no cache in front of them, so `local_cache_seconds` is Redis's only)."""
    if url is None:
        from sidecar.sessions.memory_store import MemoryStore

        return MemoryStore(max_lifetime=max_lifetime)
    from sidecar.sessions.redis_store import RedisStore

    return RedisStore(
        url, local_cache_seconds=local_cache_seconds, prefix=prefix, max_lifetime=max_lifetime
    )
