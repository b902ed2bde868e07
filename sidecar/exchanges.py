"""Every live proxied exchange (HTTP or websocket) by user and session, so that a revocation
heard from any replica, or the end of the caller's credential, ends it; shutdown closes websockets.

Ending an exchange is forwarder-agnostic: an HTTP exchange has its client connection aborted
(a partial chunked body never gets its terminating chunk, so it cannot look complete) and its
handler task cancelled, which closes the upstream request; an upgraded websocket is closed with
1008 (policy violation), and cut like HTTP if it is not closed a second later.

Hot path: opening and closing an exchange is one set add and one set discard. Exchanges still
running after PROMOTE_AFTER seconds are indexed by user and session and get a timer at their
credential's end; the many that finish sooner never touch an index or a timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from aiohttp import web

from sidecar.identity import Identity
from sidecar.sessions.store import SessionStore, StoreEvent

log = logging.getLogger("sidecar.exchanges")

K = TypeVar("K")

POLICY_VIOLATION = 1008  # RFC 6455 7.4.1: the caller's access ended
GOING_AWAY = 1001  # RFC 6455 7.4.1: the sidecar is shutting down
PROMOTE_AFTER = 1.0  # seconds an exchange runs before it is indexed and timed
WS_CLOSE_GRACE = 1.0  # a websocket told 1008 that is still open this much later is cut
WATCH_INTERVAL = 1.0  # how often the store's event feed is checked for a gap
# Security: how long a replica that hears no revocations (its event feed is down or cut off)
# keeps its live streams before ending them; it goes on ending every stream older than
# PROMOTE_AFTER while the feed stays down.
FEED_LOSS_GRACE = 5.0
RECHECK_CONCURRENCY = 32  # store lookups at once when every live exchange is re-checked


class Exchange:
    """One proxied request, from authentication until its handler returns."""

    __slots__ = (
        "closed",
        "db",
        "ended",
        "name",
        "promoted",
        "request",
        "session_key",
        "task",
        "timer",
        "valid_until",
        "websocket",
    )

    def __init__(self, request: web.Request, db: str, identity: Identity) -> None:
        self.request = request
        self.task = asyncio.current_task()
        self.db = db
        self.name = identity.name
        self.session_key = identity.session_key
        self.valid_until = identity.valid_until
        self.websocket: web.WebSocketResponse | None = None  # set once upgraded
        self.promoted = False
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False  # the registry ended it (revoked, expired, shutdown)
        self.closed = False  # its handler is done


class Exchanges:
    """The registry of live exchanges; `on_store_event` is subscribed to the session store."""

    def __init__(self) -> None:
        self._young: set[Exchange] = set()  # opened since the last promotion
        self._by_user: dict[tuple[str, str], set[Exchange]] = {}
        self._by_session: dict[str, set[Exchange]] = {}
        self._promotion: asyncio.TimerHandle | None = None
        self._store: SessionStore | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._young) + sum(len(s) for s in self._by_user.values())

    def _all(self) -> list[Exchange]:
        return [*self._young, *(ex for bucket in self._by_user.values() for ex in bucket)]

    # -- lifecycle (cleanup_ctx) ------------------------------------------------------------

    def start(self, store: SessionStore) -> None:
        """`store` is asked when a session stream reaches its known expiry (another request
        may have extended the session meanwhile), and after a gap in its event feed."""
        self._store = store
        self._spawn(self._watch_feed(store))

    async def stop(self) -> None:
        if self._promotion is not None:
            self._promotion.cancel()
            self._promotion = None
        for ex in self._all():
            if ex.timer is not None:
                ex.timer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the hot path -----------------------------------------------------------------------

    def open(self, request: web.Request, db: str, identity: Identity) -> Exchange:
        """Track the running handler's exchange; pair with `close` in a finally."""
        ex = Exchange(request, db, identity)
        self._young.add(ex)
        if self._promotion is None:
            loop = asyncio.get_running_loop()
            self._promotion = loop.call_later(PROMOTE_AFTER, self._promote)
        return ex

    def close(self, ex: Exchange) -> None:
        ex.closed = True
        if not ex.promoted:
            self._young.discard(ex)
            return
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        _discard(self._by_user, (ex.db, ex.name), ex)
        if ex.session_key is not None:
            _discard(self._by_session, ex.session_key, ex)

    # -- long-lived exchanges ---------------------------------------------------------------

    def _promote(self) -> None:
        self._promotion = None
        young, self._young = self._young, set()
        for ex in young:
            ex.promoted = True
            self._by_user.setdefault((ex.db, ex.name), set()).add(ex)
            if ex.session_key is not None:
                self._by_session.setdefault(ex.session_key, set()).add(ex)
            if ex.valid_until is not None:
                self._arm(ex, ex.valid_until)

    def _arm(self, ex: Exchange, until: float) -> None:
        loop = asyncio.get_running_loop()
        ex.timer = loop.call_later(max(0.0, until - time.time()), self._credential_ended, ex)

    def _credential_ended(self, ex: Exchange) -> None:
        ex.timer = None
        if ex.closed or ex.ended:
            return
        if ex.session_key is not None and self._store is not None:
            self._spawn(self._recheck_session(ex, ex.session_key, self._store))
        else:
            self._end(ex, b"credential expired")

    async def _recheck_session(self, ex: Exchange, key: str, store: SessionStore) -> None:
        expires = await _session_expiry(store, ex.db, key)
        if ex.closed or ex.ended:
            return
        if expires is not None and expires > time.time():
            ex.valid_until = expires  # extended by another request: the stream goes on
            self._arm(ex, expires)
        else:
            self._end(ex, b"session expired")

    async def _watch_feed(self, store: SessionStore) -> None:
        """Security: while a replica's event feed is down it hears no revocation from the
        others. Once it is back (the store's generation moved), every live exchange is checked
        against the store, so what was revoked meanwhile ends then."""
        seen = store.generation
        deaf_since: float | None = None
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if not store.caching:
                # Security (fail closed): a revocation made now would not reach these streams.
                now = time.monotonic()
                deaf_since = now if deaf_since is None else deaf_since
                if now - deaf_since >= FEED_LOSS_GRACE:
                    self._end_all_long_lived(b"session events unavailable")
                continue
            deaf_since = None
            if store.generation != seen:
                seen = store.generation
                try:
                    await self._recheck_all(store)
                except Exception:  # never stop watching
                    log.exception("re-checking live exchanges failed")

    def _end_all_long_lived(self, reason: bytes) -> None:
        ended = [ex for ex in self._all() if ex.promoted and not ex.ended]
        for ex in ended:
            self._end(ex, reason)
        if ended:
            log.warning(
                "ended live exchanges: session events unavailable",
                extra={"count": len(ended)},
            )

    async def _recheck_all(self, store: SessionStore) -> None:
        live = [ex for ex in self._all() if not ex.ended]
        sessions = {(ex.db, ex.session_key) for ex in live if ex.session_key is not None}
        users = {(ex.db, ex.name) for ex in live if ex.session_key is None}
        limit = asyncio.Semaphore(RECHECK_CONCURRENCY)

        async def session_gone(db: str, key: str) -> str | None:
            async with limit:
                return key if await _session_expiry(store, db, key) is None else None

        async def user_gone(db: str, name: str) -> tuple[str, str] | None:
            async with limit:
                try:
                    user = await store.get_user(db, name)
                except Exception:  # security: fail closed
                    return (db, name)
                return (db, name) if user is None or user.disabled else None

        gone_sessions = set(await asyncio.gather(*(session_gone(*s) for s in sessions)))
        gone_users = set(await asyncio.gather(*(user_gone(*u) for u in users)))
        ended = 0
        for ex in live:
            if ex.session_key in gone_sessions or (
                ex.session_key is None and (ex.db, ex.name) in gone_users
            ):
                self._end(ex, b"session revoked")
                ended += 1
        log.info(
            "re-checked live exchanges after a gap in session events",
            extra={"checked": len(live), "ended": ended},
        )

    # -- ending -----------------------------------------------------------------------------

    def on_store_event(self, event: StoreEvent) -> None:
        """Called for revocations heard from any replica (see SessionStore.subscribe)."""
        if not event.revoked:  # a role change keeps the user's exchanges
            return
        if event.kind == "user" and event.name is not None:
            user = (event.db, event.name)
            targets = _matching(
                self._by_user.get(user), self._young, lambda ex: (ex.db, ex.name) == user
            )
        elif event.kind == "session" and event.key is not None:
            key = event.key
            targets = _matching(
                self._by_session.get(key), self._young, lambda ex: ex.session_key == key
            )
        else:
            return
        for ex in targets:
            self._end(ex, b"session revoked")
        if targets:
            log.info("ended live exchanges after revocation", extra={"count": len(targets)})

    def _end(self, ex: Exchange, reason: bytes) -> None:
        if ex.ended or ex.closed:
            return
        ex.ended = True
        ws = ex.websocket
        if ws is not None and not ws.closed:
            self._spawn(ws.close(code=POLICY_VIOLATION, message=reason))
            asyncio.get_running_loop().call_later(WS_CLOSE_GRACE, _cut, ex)
        else:
            _cut(ex)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(
        self, code: int = GOING_AWAY, message: bytes = b"server shutting down"
    ) -> None:
        """Shutdown: websockets are told `code`; HTTP exchanges are left to the server's drain."""
        sockets = {ex.websocket for ex in self._all() if ex.websocket is not None}
        await asyncio.gather(
            *(ws.close(code=code, message=message) for ws in sockets), return_exceptions=True
        )


async def _session_expiry(store: SessionStore, db: str, key: str) -> float | None:
    """The session's expiry read fresh from the store; None when it is gone or the store
    cannot say (security: fail closed)."""
    try:
        session = await store.get_session_by_key(db, key, time.time())
    except Exception:
        log.warning("session unknown (store unavailable); ending its streams")
        return None
    return session.expires if session is not None else None


def _cut(ex: Exchange) -> None:
    """Abort the client connection, then cancel the handler (which closes the upstream)."""
    if ex.closed:
        return
    transport = ex.request.transport
    if transport is not None:
        transport.abort()  # security: no terminating chunk, no buffered bytes sent after this
    if ex.task is not None:
        ex.task.cancel()


def _matching(
    indexed: set[Exchange] | None, young: Iterable[Exchange], match: Callable[[Exchange], bool]
) -> list[Exchange]:
    return [*(indexed or ()), *(ex for ex in young if match(ex))]


def _discard(index: dict[K, set[Exchange]], key: K, ex: Exchange) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.discard(ex)
        if not bucket:
            del index[key]
