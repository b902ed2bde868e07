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
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from aiohttp import web

from sidecar.identity import Identity
from sidecar.sessions.store import StoreEvent

log = logging.getLogger("sidecar.exchanges")

K = TypeVar("K")
# (db, session key) -> the session's expiry now, or None when it is gone (read fresh, not cached).
SessionExpiry = Callable[[str, str], Awaitable[float | None]]

POLICY_VIOLATION = 1008  # RFC 6455 7.4.1: the caller's access ended
GOING_AWAY = 1001  # RFC 6455 7.4.1: the sidecar is shutting down
PROMOTE_AFTER = 1.0  # seconds an exchange runs before it is indexed and timed
WS_CLOSE_GRACE = 1.0  # a websocket told 1008 that is still open this much later is cut


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
        self._session_expiry: SessionExpiry | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._young) + sum(len(s) for s in self._by_user.values())

    def _all(self) -> list[Exchange]:
        return [*self._young, *(ex for bucket in self._by_user.values() for ex in bucket)]

    # -- lifecycle (cleanup_ctx) ------------------------------------------------------------

    def start(self, session_expiry: SessionExpiry) -> None:
        """`session_expiry` is asked when a session stream reaches its known expiry: another
        request may have extended the session meanwhile (then the stream goes on)."""
        self._session_expiry = session_expiry

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
        if ex.session_key is not None and self._session_expiry is not None:
            self._spawn(self._recheck_session(ex, ex.session_key, self._session_expiry))
        else:
            self._end(ex, b"credential expired")

    async def _recheck_session(self, ex: Exchange, key: str, expiry: SessionExpiry) -> None:
        try:
            expires = await expiry(ex.db, key)
        except Exception:  # security: fail closed when the store cannot say
            log.warning("session expiry unknown (store unavailable); ending its stream")
            expires = None
        if ex.closed or ex.ended:
            return
        if expires is not None and expires > time.time():
            ex.valid_until = expires  # extended by another request: the stream goes on
            self._arm(ex, expires)
        else:
            self._end(ex, b"session expired")

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
