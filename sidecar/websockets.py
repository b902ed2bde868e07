"""Open client websockets by user and session, so revocation and shutdown can close them."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from aiohttp import web

from sidecar.identity import Identity
from sidecar.sessions.store import StoreEvent

K = TypeVar("K")
log = logging.getLogger("sidecar.websockets")

POLICY_VIOLATION = 1008  # RFC 6455 7.4.1: the user's access was revoked
GOING_AWAY = 1001  # RFC 6455 7.4.1: the sidecar is shutting down


class WebSocketRegistry:
    def __init__(self) -> None:
        self._by_user: dict[tuple[str, str], set[web.WebSocketResponse]] = defaultdict(set)
        self._by_session: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
        self._tasks: set[asyncio.Task[bool]] = set()

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_user.values())

    @contextmanager
    def track(
        self, ws: web.WebSocketResponse, db: str, identity: Identity, session_key: str | None
    ) -> Iterator[None]:
        user = (db, identity.name)
        self._by_user[user].add(ws)
        if session_key is not None:
            self._by_session[session_key].add(ws)
        try:
            yield
        finally:
            self._discard(self._by_user, user, ws)
            if session_key is not None:
                self._discard(self._by_session, session_key, ws)

    @staticmethod
    def _discard(
        index: dict[K, set[web.WebSocketResponse]], key: K, ws: web.WebSocketResponse
    ) -> None:
        bucket = index.get(key)
        if bucket is not None:
            bucket.discard(ws)
            if not bucket:
                del index[key]

    def on_store_event(self, event: StoreEvent) -> None:
        """Called for revocations heard from any replica (see SessionStore.subscribe)."""
        if not event.revoked:  # a role change keeps the user's connections
            return
        if event.kind == "user" and event.name is not None:
            targets = set(self._by_user.get((event.db, event.name), ()))
        elif event.kind == "session" and event.key is not None:
            targets = set(self._by_session.get(event.key, ()))
        else:
            return
        for ws in targets:
            self._close(ws, POLICY_VIOLATION, b"session revoked")
        if targets:
            log.info(
                "closed websockets after revocation", extra={"count": len(targets), "db": event.db}
            )

    def _close(self, ws: web.WebSocketResponse, code: int, message: bytes) -> None:
        task = asyncio.get_running_loop().create_task(ws.close(code=code, message=message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(
        self, code: int = GOING_AWAY, message: bytes = b"server shutting down"
    ) -> None:
        sockets = {ws for bucket in self._by_user.values() for ws in bucket}
        await asyncio.gather(
            *(ws.close(code=code, message=message) for ws in sockets), return_exceptions=True
        )
