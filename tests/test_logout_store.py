"""The store primitives logout needs, on every implementation (the contract suite's fixtures):
groups of sessions by the provider's `sid`, and single-use records for logout-token `jti`s."""

# ruff: noqa: F401, F811  (fixtures imported from the contract suite are used as parameters)
from __future__ import annotations

# The contract suite's fixtures, imported so pytest finds them here by name.
from test_session_store import ALICE, BOB, DB, T, login, redis_cluster, redis_server, store

from sidecar.sessions.store import SessionStore, StoreEvent


async def test_linked_sessions_end_together(store: SessionStore) -> None:
    first_id, first = await login(store, ALICE)
    second_id, second = await login(store, ALICE)
    other_id, other = await login(store, BOB)
    events: list[StoreEvent] = []
    store.subscribe(events.append)
    await store.link_sessions("sid", "g1", first.key, 60)
    await store.link_sessions("sid", "g1", second.key, 60)
    await store.link_sessions("sid", "g2", other.key, 60)

    ended = await store.end_linked_sessions(DB, "sid", "g1")
    assert sorted(s.key for s in ended) == sorted([first.key, second.key])
    assert await store.get_session(DB, first_id, T) is None
    assert await store.get_session(DB, second_id, T) is None
    assert await store.get_session(DB, other_id, T) is not None
    assert {e.key for e in events if e.kind == "session"} == {first.key, second.key}
    assert await store.end_linked_sessions(DB, "sid", "g1") == []  # the group is gone


async def test_linked_sessions_of_another_db_are_not_ended(store: SessionStore) -> None:
    session_id, session = await login(store, ALICE)
    await store.link_sessions("sid", "g", session.key, 60)
    assert await store.end_linked_sessions("other-db", "sid", "g") == []
    assert await store.get_session(DB, session_id, T) is not None


async def test_a_linked_session_already_gone_is_not_counted(store: SessionStore) -> None:
    session_id, session = await login(store, ALICE)
    await store.link_sessions("sid", "g", session.key, 60)
    assert await store.delete_session(DB, session_id)
    assert await store.end_linked_sessions(DB, "sid", "g") == []


async def test_records_added_once(store: SessionStore) -> None:
    assert await store.add_record_once("jti", "j1", {"iss": "x"}, 60)
    assert not await store.add_record_once("jti", "j1", {"iss": "y"}, 60)
    assert await store.get_record("jti", "j1") == {"iss": "x"}
    assert await store.add_record_once("jti", "j2", {}, 60)
