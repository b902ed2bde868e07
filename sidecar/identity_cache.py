"""Bearer tokens already resolved to an Identity, dropped when their user changes anywhere."""

from __future__ import annotations

from typing import Protocol

from sidecar.identity import Identity
from sidecar.sessions.store import StoreEvent


class KeyedSource(Protocol):
    """Who verified the token (a provider): its keys_epoch moves when one of its keys retires."""

    keys_epoch: int


class BearerIdentities:
    """The identity a verified bearer token resolved to, until the token expires or its user
    changes (any replica: StoreEvent), so a known token costs no user lookup or write."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._entries: dict[tuple[str, bytes], tuple[Identity, float, int, KeyedSource, int]] = {}
        self._by_user: dict[tuple[str, str], set[tuple[str, bytes]]] = {}
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, db: str, digest: bytes, now: float, generation: int) -> Identity | None:
        """The identity, while the token lives, no event may have been missed (`generation`),
        and none of its provider's keys retired since it was verified (`keys_epoch`)."""
        entry = self._entries.get((db, digest))
        if entry is None or now >= entry[1] or entry[2] != generation:
            return None
        if entry[3].keys_epoch != entry[4]:  # security: verified with a key since retired
            return None
        return entry[0]

    def put(
        self,
        db: str,
        digest: bytes,
        identity: Identity,
        expires: float,
        generation: int,
        source: KeyedSource,
    ) -> None:
        if len(self._entries) >= self._max:
            self.clear()  # rare; simpler and safer than partial eviction with the index
        key = (db, digest)
        self._entries[key] = (identity, expires, generation, source, source.keys_epoch)
        self._by_user.setdefault((db, identity.name), set()).add(key)

    def clear(self) -> None:
        self._entries.clear()
        self._by_user.clear()

    def on_store_event(self, event: StoreEvent) -> None:
        if event.kind == "user" and event.name is not None:
            for key in self._by_user.pop((event.db, event.name), ()):
                self._entries.pop(key, None)
