"""The session store contract, run against every implementation (memory, and Redis on a real
redis-server), plus what only Redis has: replicas, outages, what is stored, round trips."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from support.redis_server import RedisServer

from sidecar.errors import ServiceUnavailable
from sidecar.sessions.memory_store import MemoryStore
from sidecar.sessions.models import (
    Session,
    User,
    hash_session_id,
    is_well_formed_session_id,
    needs_extension,
    new_session_id,
)
from sidecar.sessions.redis_store import RedisStore, redis_client
from sidecar.sessions.store import (
    InactiveUser,
    LocalCache,
    SessionStore,
    StoreEvent,
    StoreUnavailable,
    create_store,
)

DB = "db"
T = 1_900_000_000.0  # an injected "now"; Redis expiry is relative (PX), so any value works
TTL = 1000
ALICE = User(db=DB, name="alice", email="alice@example.com", admin_roles=("editor",))
BOB = User(db=DB, name="bob", admin_channels=("public",))

# Commands a client sends on its own (listener keepalive, connection setup) or that the
# test itself sends to read the stats: not round trips of the store's operations.
BACKGROUND = {"ping", "info", "client|setname", "client|setinfo", "hello", "select"}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisServer]:
    """A one-node Redis Cluster: enough to catch any cross-slot multi-key command."""
    with RedisServer(cluster=True) as server:
        yield server


def cluster_url(server: RedisServer) -> str:
    return f"redis+cluster://127.0.0.1:{server.port}"


@pytest.fixture(params=["redis", "cluster"])
def shared_redis(request: pytest.FixtureRequest) -> tuple[str, RedisServer]:
    """(url, server) of a Redis the replicas share."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return server.url, server
    server = request.getfixturevalue("redis_cluster")
    return cluster_url(server), server


def prefix() -> str:
    return f"t{secrets.token_hex(4)}:"


@pytest.fixture(params=["memory", "memory-cached", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    s: SessionStore
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "memory-cached":
        s = MemoryStore(local_cache_seconds=30)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(server.url, local_cache_seconds=30, prefix=prefix())
    else:
        server = request.getfixturevalue("redis_cluster")
        s = RedisStore(cluster_url(server), local_cache_seconds=30, prefix=prefix())
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def login(store: SessionStore, user: User = ALICE, now: float = T) -> tuple[str, Session]:
    await store.put_user(user)
    return await store.create_session(user, ttl=TTL, provider="google", now=now)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 1.0) -> float:
    """Poll until check() holds; returns how long it took, fails after `within` seconds."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# -- pure pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires", "ttl", "now", "expected"),
    [
        (T + 1000, 1000, T, False),  # just extended
        (T + 1000, 1000, T + 99, False),
        (T + 1000, 1000, T + 100, False),  # exactly 10%: not "more than"
        (T + 1000, 1000, T + 100.001, True),
        (T + 1000, 1000, T + 500, True),
        (T + 1000, 1000, T + 999, True),
        (T + 86400, 86400, T + 8640, False),  # Sync Gateway's 24 h default: 2.4 h
        (T + 86400, 86400, T + 8641, True),
        (T + 60, 60, T + 6, False),
        (T + 60, 60, T + 7, True),
        (T + 500, 1000, T - 500, False),  # created/extended at T - 500 with ttl 1000, now T - 500
        (T + 500, 1000, T - 399, True),
    ],
)
def test_needs_extension(expires: float, ttl: int, now: float, expected: bool) -> None:
    session = Session("k", DB, "n", None, (), (), None, created=T, expires=expires, ttl=ttl)
    assert needs_extension(session, now) is expected


@pytest.mark.parametrize(
    ("expires", "max_expires", "now", "expected", "after"),
    [
        # ttl 1000, absolute end at T + 1500
        (T + 1000, T + 1500, T + 101, True, T + 1101),  # a full ttl still fits
        (T + 1000, T + 1500, T + 600, True, T + 1500),  # cut at the absolute end
        (T + 1000, T + 1500, T + 1400, True, T + 1500),  # the last step, however small
        (T + 1499, T + 1500, T + 1400, True, T + 1500),  # ... taken whatever its size
        (T + 1500, T + 1500, T + 1400, False, T + 1500),  # at the end: nothing to do, no write
        (T + 1500, T + 1500, T + 1499, False, T + 1500),
        (T + 1000, T + 1000, T + 500, False, T + 1000),  # max_lifetime == ttl: never extended
        (T + 1000, T + 1050, T + 40, False, T + 1050),  # +40 s: under 10%, end not reached
        (T + 1000, T + 1050, T + 50, True, T + 1050),  # reaching the end: one write, before 10%
    ],
)
def test_extension_never_passes_the_absolute_end(
    expires: float, max_expires: float, now: float, expected: bool, after: float
) -> None:
    session = Session(
        "k", DB, "n", None, (), (), None, created=T, expires=expires, ttl=1000,
        max_expires=max_expires,
    )  # fmt: skip
    assert needs_extension(session, now) is expected
    if expected:
        extended = session.extended(now)
        assert (extended.expires, extended.renewed, extended.last_renewed) == (after, now, now)
        assert not needs_extension(extended, now)
    assert session.extension_target(now) <= max_expires


def test_new_sessions_end_at_max_lifetime() -> None:
    session = Session.for_user(ALICE, key="k" * 64, ttl=100, provider=None, now=T, max_lifetime=500)
    assert (session.expires, session.max_expires, session.renewed) == (T + 100, T + 500, T)
    # An admin session asking for a ttl beyond max_lifetime gets max_lifetime.
    long = Session.for_user(ALICE, key="k" * 64, ttl=9000, provider=None, now=T, max_lifetime=500)
    assert (long.expires, long.max_expires) == (T + 500, T + 500)
    assert not needs_extension(long, T + 400)


def test_records_without_an_absolute_end_get_the_default() -> None:
    """Sessions stored before max_lifetime existed end 7 days after their creation."""
    raw = b'{"db":"db","name":"n","created":1000,"expires":2000,"ttl":1000}'
    session = Session.from_json("k", raw)
    assert session.max_expires == 1000 + 7 * 86400
    assert session.last_renewed == 1000  # expires - ttl, as before


def test_session_ids() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    for session_id in ids:
        assert len(session_id) == 43 and is_well_formed_session_id(session_id)
        assert hash_session_id(session_id) != session_id
        assert len(hash_session_id(session_id)) == 64


HOSTILE_IDS = [
    "",
    "a" * 42,
    "a" * 44,
    "a" * 42 + "=",
    "a" * 43 + "\n",
    "a" * 42 + "\n",
    "a" * 42 + "+",  # standard, not urlsafe, alphabet
    "a" * 42 + "/",
    "é" * 43,
    "a" * 42 + "\x00",
    " " + "a" * 42,
    "../" + "a" * 40,
    "a" * 10_000,
]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_malformed_session_ids(value: str) -> None:
    assert not is_well_formed_session_id(value)


def test_user_roles_and_channels() -> None:
    user = User(
        DB, "u", admin_roles=("b", "a"), jwt_roles=("c", "a"), admin_channels=("x",),
        jwt_channels=("y", "x"),
    )  # fmt: skip
    assert user.roles == ("a", "b", "c")
    assert user.channels == ("x", "y")


def test_json_round_trips() -> None:
    user = User(
        DB, "ü:{x}", email=None, admin_channels=("c",), admin_roles=("r",), disabled=True,
        jwt_issuer="https://op", jwt_roles=("j",), jwt_channels=("k",), jwt_last_updated=T,
    )  # fmt: skip
    assert User.from_json(user.to_json()) == user
    session = Session.for_user(user, key="k" * 64, ttl=60, provider=None, now=T)
    assert Session.from_json(session.key, session.to_json()) == session
    identity = session.to_identity("the-id")
    assert identity.via == "session" and identity.session_id == "the-id"
    assert identity.roles == frozenset({"r", "j"}) and identity.channels == frozenset({"c", "k"})


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"[]",
        b"{}",
        b'{"db":"db","name":"n","created":1,"expires":2,"ttl":"60"}',
        b'{"db":"db","name":"n","created":1,"expires":2,"ttl":0}',
        b'{"db":"db","name":"n","created":1,"expires":2,"ttl":true}',
        b'{"db":"db","name":"n","created":1,"expires":"2","ttl":60}',
        b'{"db":"db","name":1,"created":1,"expires":2,"ttl":60}',
        b'{"db":"db","name":"n","created":1,"expires":2,"ttl":60,"roles":"admin"}',
        b'{"db":"db","name":"n","created":1,"expires":2,"ttl":60,"roles":[1]}',
        b'{"db":"db","name":"n","created":1,"expires":2,"ttl":60,"max_expires":"3"}',
        b'{"db":"db","name":"n","created":1,"expires":2,"ttl":60,"renewed":true}',
        b"\xff",
    ],
)
def test_malformed_stored_session(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Session.from_json("k", raw)


def test_store_unavailable_is_a_503() -> None:
    error = StoreUnavailable()
    assert isinstance(error, ServiceUnavailable) and error.status == 503
    assert error.body() == {"error": "Service Unavailable", "reason": "session store unavailable"}


async def test_create_store() -> None:
    memory = create_store(None, local_cache_seconds=30)
    assert isinstance(memory, MemoryStore)
    redis = create_store("redis://127.0.0.1:1/0", local_cache_seconds=30, prefix="x:")
    assert isinstance(redis, RedisStore)
    await redis.close()


def test_local_cache_is_bounded_and_indexed() -> None:
    cache = LocalCache(seconds=30, max_entries=2)
    s1, s2, s3 = (Session.for_user(ALICE, key=k * 64, ttl=TTL, provider=None, now=T) for k in "123")
    for session in (s1, s2, s3):
        cache.put_session(session, T)
    assert cache.session(s1.key, T) is None  # the oldest went
    assert cache.session(s2.key, T) == s2 and cache.session(s3.key, T) == s3
    assert cache.session(s2.key, T + 30) is None  # entry lifetime over
    short = Session.for_user(BOB, key="4" * 64, ttl=10, provider=None, now=T)
    cache.put_session(short, T)
    assert cache.session(short.key, T + 9.9) == short
    assert cache.session(short.key, T + 10) is None  # never beyond the session's expires
    cache.put_session(s1, T)
    cache.put_user(("db", "alice"), ALICE, T)
    cache.drop_user(("db", "alice"))  # forgets the user and all their sessions
    assert cache.user(("db", "alice"), T) == (False, None)
    assert cache.session(s1.key, T) is None and cache.session(s3.key, T) is None
    cache.put_user(("db", "nobody"), None, T)
    assert cache.user(("db", "nobody"), T) == (True, None)
    assert cache.user(("db", "nobody"), T + 30) == (False, None)


# -- the contract, for every store ------------------------------------------------------------


async def test_create_and_get(store: SessionStore) -> None:
    session_id, session = await login(store)
    assert is_well_formed_session_id(session_id)
    assert session.key == hash_session_id(session_id)
    assert (session.db, session.name, session.email) == (DB, "alice", "alice@example.com")
    assert (session.roles, session.provider, session.ttl) == (("editor",), "google", TTL)
    assert (session.created, session.expires) == (T, T + TTL)
    assert await store.get_session(DB, session_id, T + 1) == session
    assert await store.get_session(DB, session_id, T + 2) == session  # cached, same answer
    assert await store.get_session_by_key(DB, session.key, T + 2) == session


async def test_unknown_and_other_db(store: SessionStore) -> None:
    session_id, session = await login(store)
    assert await store.get_session(DB, new_session_id(), T) is None
    assert await store.get_session("other", session_id, T) is None
    assert await store.get_session_by_key("other", session.key, T) is None
    assert await store.get_session(DB, session_id, T) is not None


@pytest.mark.parametrize("value", HOSTILE_IDS)
async def test_malformed_cookie_is_unknown(store: SessionStore, value: str) -> None:
    assert await store.get_session(DB, value, T) is None
    assert await store.delete_session(DB, value) is False


async def test_the_stored_key_is_not_a_credential(store: SessionStore) -> None:
    _, session = await login(store)
    assert await store.get_session(DB, session.key, T) is None
    assert await store.get_session(DB, session.key[:43], T) is None


async def test_expiry(store: SessionStore) -> None:
    session_id, session = await login(store)
    assert await store.get_session_by_key(DB, session.key, T + TTL - 0.001) == session
    assert await store.get_session_by_key(DB, session.key, T + TTL) is None
    assert await store.get_session(DB, session_id, T + TTL) is None
    assert await store.get_session(DB, session_id, T + TTL + 1) is None
    assert await store.list_user_sessions(DB, "alice", T + TTL) == []
    assert await store.list_user_sessions(DB, "alice", T) == [session]


async def test_the_backend_expires_records_itself(store: SessionStore) -> None:
    # Redis PX / the memory deadline: gone after `expires - now` of real time, whatever
    # clock the caller injects, so dead sessions do not pile up.
    await store.put_user(ALICE)
    session = Session.for_user(ALICE, key="e" * 64, ttl=TTL, provider=None, now=T)
    await store._insert_session(session, now=session.expires - 0.05)
    assert await store.get_session_by_key(DB, session.key, T) == session
    await asyncio.sleep(0.1)
    if isinstance(store, MemoryStore):
        store.sweep()
        assert store._sessions == {} and store._index == {}
    assert await store.get_session_by_key(DB, session.key, T) is None
    assert await store.list_user_sessions(DB, "alice", T) == []


async def test_extension(store: SessionStore) -> None:
    session_id, session = await login(store)
    at_10_percent = await store.get_session(DB, session_id, T + TTL / 10)
    assert at_10_percent is not None and at_10_percent.expires == T + TTL  # not yet
    extended = await store.get_session(DB, session_id, T + 101)
    assert extended is not None and extended.expires == T + 101 + TTL
    # Written through: a lookup that bypasses every cache sees it, and it outlives the original.
    assert await store.get_session_by_key(DB, session.key, T + 101) == extended
    later = await store.get_session(DB, session_id, T + TTL + 50)
    assert later is not None and later.expires == T + TTL + 50 + TTL


async def test_extension_stops_at_max_lifetime(store: SessionStore) -> None:
    """ttl 1000, max_lifetime 1500: extended to the absolute end, never past it; the backend
    drops the record then, as it does at an idle expiry."""
    store.max_lifetime = 1500
    session_id, session = await login(store)
    assert (session.expires, session.max_expires) == (T + TTL, T + 1500)
    extended = await store.get_session(DB, session_id, T + 600)
    assert extended is not None and extended.expires == T + 1500  # not T + 1600
    assert await store.get_session_by_key(DB, session.key, T + 600) == extended  # written
    again = await store.get_session(DB, session_id, T + 1400)
    assert again == extended  # nothing left to extend: no change
    assert await store.get_session(DB, session_id, T + 1500) is None
    # An admin session asking for more than max_lifetime is cut at creation.
    await store.put_user(BOB)
    _, long = await store.create_session(BOB, ttl=10 * TTL, provider=None, now=T)
    assert long.expires == T + 1500


async def test_looking_by_key_never_extends(store: SessionStore) -> None:
    """The admin API's view: a session due for extension keeps its expiry when looked at."""
    session_id, session = await login(store)
    for _ in range(3):
        assert await store.get_session_by_key(DB, session.key, T + 500) == session
    extended = await store.get_session(DB, session_id, T + 500)  # a real use extends it
    assert extended is not None and extended.expires == T + 500 + TTL


async def test_delete_session(store: SessionStore) -> None:
    session_id, session = await login(store)
    other_id, _ = await login(store)
    await store.get_session(DB, session_id, T)  # warm the cache
    assert await store.delete_session("other", session_id) is False
    assert await store.get_session(DB, session_id, T) is not None
    assert await store.delete_session(DB, session_id) is True
    assert await store.get_session(DB, session_id, T) is None
    assert await store.delete_session(DB, session_id) is False
    assert await store.delete_session_by_key(DB, session.key) is False
    assert await store.get_session(DB, other_id, T) is not None


async def test_delete_session_by_key(store: SessionStore) -> None:
    session_id, session = await login(store)
    assert await store.delete_session_by_key(DB, "not-a-key") is False
    assert await store.delete_session_by_key(DB, session.key) is True
    assert await store.get_session(DB, session_id, T) is None


async def test_revoke_all(store: SessionStore) -> None:
    alice = [(await login(store))[0] for _ in range(3)]
    bob, _ = await login(store, BOB)
    for session_id in alice:
        assert await store.get_session(DB, session_id, T) is not None
    assert len(await store.list_user_sessions(DB, "alice", T)) == 3
    assert await store.delete_user_sessions(DB, "alice") == 3
    for session_id in alice:
        assert await store.get_session(DB, session_id, T) is None
    assert await store.list_user_sessions(DB, "alice", T) == []
    assert await store.get_session(DB, bob, T) is not None
    assert await store.delete_user_sessions(DB, "alice") == 0
    assert await store.get_user(DB, "alice") == ALICE  # the user stays


async def test_put_user_rewrites_snapshots(store: SessionStore) -> None:
    session_id, _ = await login(store)
    assert (await store.get_session(DB, session_id, T)) is not None  # cached
    changed = replace(ALICE, email="new@example.com", admin_roles=("viewer",), jwt_channels=("ch",))
    await store.put_user(changed)
    session = await store.get_session(DB, session_id, T)
    assert session is not None
    assert (session.email, session.roles, session.channels) == (
        "new@example.com",
        ("viewer",),
        ("ch",),
    )
    assert session.expires == T + TTL  # the lifetime is untouched
    assert await store.get_user(DB, "alice") == changed


@pytest.mark.parametrize("how", ["disable", "delete"])
async def test_disable_or_delete_user_kills_sessions(store: SessionStore, how: str) -> None:
    sessions = [(await login(store))[0] for _ in range(2)]
    bob, _ = await login(store, BOB)
    for session_id in sessions:
        assert await store.get_session(DB, session_id, T) is not None
    if how == "disable":
        await store.put_user(replace(ALICE, disabled=True))
        assert (await store.get_user(DB, "alice")) == replace(ALICE, disabled=True)
    else:
        assert await store.delete_user(DB, "alice") is True
        assert await store.get_user(DB, "alice") is None
        assert await store.delete_user(DB, "alice") is False
    for session_id in sessions:
        assert await store.get_session(DB, session_id, T) is None
    assert await store.list_user_sessions(DB, "alice", T) == []
    assert await store.get_session(DB, bob, T) is not None


async def test_no_session_for_unknown_or_disabled_user(store: SessionStore) -> None:
    with pytest.raises(InactiveUser):
        await store.create_session(ALICE, ttl=TTL, provider=None, now=T)
    await store.put_user(replace(ALICE, disabled=True))
    with pytest.raises(InactiveUser):
        await store.create_session(ALICE, ttl=TTL, provider=None, now=T)
    assert await store.list_user_sessions(DB, "alice", T) == []


async def test_create_session_snapshots_the_stored_user(store: SessionStore) -> None:
    await store.put_user(ALICE)
    stale = replace(ALICE, admin_roles=("admin",))  # the caller's copy is out of date
    session_id, session = await store.create_session(stale, ttl=TTL, provider=None, now=T)
    assert session.roles == ("editor",)
    again = await store.get_session(DB, session_id, T)
    assert again is not None and again.roles == ("editor",)


async def test_get_user_is_cached_and_invalidated(store: SessionStore) -> None:
    assert await store.get_user(DB, "alice") is None
    await store.put_user(ALICE)  # also forgets the cached "no such user"
    assert await store.get_user(DB, "alice") == ALICE
    await store.put_user(replace(ALICE, email=None))
    assert await store.get_user(DB, "alice") == replace(ALICE, email=None)
    assert await store.get_user("other", "alice") is None


async def test_names_cannot_collide(store: SessionStore) -> None:
    # Key-building must be injective: ("a:b", "c") and ("a", "b:c") are different users.
    one, two = User("a:b", "c"), User("a", "b:c")
    await store.put_user(one)
    assert await store.get_user("a", "b:c") is None
    await store.put_user(two)
    s1, _ = await store.create_session(one, ttl=TTL, provider=None, now=T)
    await store.create_session(two, ttl=TTL, provider=None, now=T)
    assert await store.delete_user_sessions("a", "b:c") == 1
    assert await store.get_session("a:b", s1, T) is not None


async def test_events(store: SessionStore) -> None:
    events: list[StoreEvent] = []
    unsubscribe = store.subscribe(events.append)
    session_id, session = await login(store)
    assert events == [StoreEvent("user", DB, "alice", revoked=False)]
    events.clear()
    await store.delete_session(DB, session_id)
    await store.delete_user_sessions(DB, "alice")
    await store.put_user(replace(ALICE, admin_roles=()))
    await store.put_user(replace(ALICE, disabled=True))
    await store.delete_user(DB, "alice")
    assert events == [
        StoreEvent("session", DB, "alice", session.key),
        StoreEvent("user", DB, "alice", revoked=True),
        StoreEvent("user", DB, "alice", revoked=False),
        StoreEvent("user", DB, "alice", revoked=True),
        StoreEvent("user", DB, "alice", revoked=True),
    ]
    unsubscribe()
    unsubscribe()  # idempotent
    await store.delete_user_sessions(DB, "alice")
    assert len(events) == 5


async def test_a_failing_listener_does_not_break_the_store(store: SessionStore) -> None:
    def boom(event: StoreEvent) -> None:
        raise RuntimeError("listener bug")

    events: list[StoreEvent] = []
    store.subscribe(boom)
    store.subscribe(events.append)
    session_id, _ = await login(store)
    assert await store.delete_session(DB, session_id) is True
    assert events[-1].kind == "session"


async def test_records(store: SessionStore) -> None:
    await store.put_record("login", "k1", {"state": "s", "n": 1, "l": ["a"]}, 60)
    assert await store.get_record("login", "k1") == {"state": "s", "n": 1, "l": ["a"]}
    assert await store.get_record("refresh", "k1") is None
    assert await store.take_record("login", "k1") == {"state": "s", "n": 1, "l": ["a"]}
    assert await store.take_record("login", "k1") is None  # single use
    assert await store.get_record("login", "k1") is None


async def test_locks(store: SessionStore) -> None:
    taken, mine = await store.acquire_lock("refresh", "d1", 30)
    assert taken and mine
    # Everyone else is told who holds it, however many ask at once.
    others = await asyncio.gather(*(store.acquire_lock("refresh", "d1", 30) for _ in range(10)))
    assert others == [(False, mine)] * 10
    assert (await store.acquire_lock("refresh", "d2", 30))[0]  # another key is another lock
    assert (await store.acquire_lock("login", "d1", 30))[0]  # so is another kind
    assert await store.release_lock("refresh", "d1", "not-the-holder") is False
    assert (await store.acquire_lock("refresh", "d1", 30)) == (False, mine)
    assert await store.release_lock("refresh", "d1", mine) is True
    assert await store.release_lock("refresh", "d1", mine) is False  # already released
    again, theirs = await store.acquire_lock("refresh", "d1", 30)
    assert again and theirs != mine


async def test_a_lock_ends_by_itself(store: SessionStore) -> None:
    taken, first = await store.acquire_lock("refresh", "d", 0.2)
    assert taken
    await asyncio.sleep(0.3)  # the holder crashed: nobody waits past its ttl
    taken, second = await store.acquire_lock("refresh", "d", 30)
    assert taken and second != first
    # The first holder, back late, cannot release the lock someone else holds now.
    assert await store.release_lock("refresh", "d", first) is False
    assert await store.acquire_lock("refresh", "d", 30) == (False, second)


async def test_concurrent_gets_extend_once(store: SessionStore) -> None:
    session_id, _ = await login(store)
    results = await asyncio.gather(*(store.get_session(DB, session_id, T + 500) for _ in range(20)))
    assert all(r is not None for r in results)
    fresh = await store.get_session(DB, session_id, T + 500)
    assert fresh is not None and fresh.expires == T + 500 + TTL


# -- Redis only -------------------------------------------------------------------------------


@pytest.fixture
async def replicas(
    shared_redis: tuple[str, RedisServer],
) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one Redis: two replicas of the sidecar."""
    shared = prefix()
    a = RedisStore(shared_redis[0], local_cache_seconds=30, prefix=shared)
    b = RedisStore(shared_redis[0], local_cache_seconds=30, prefix=shared)
    await a.start()
    await b.start()
    assert a.listening and b.listening
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def login_on(a: RedisStore, b: RedisStore, user: User = ALICE) -> tuple[str, Session]:
    """Log in on `a` and wait until `b` heard of it, so later events are the test's own."""
    events: list[StoreEvent] = []
    unsubscribe = b.subscribe(events.append)
    try:
        result = await login(a, user)

        async def heard() -> bool:
            return bool(events)

        await eventually(heard)
        return result
    finally:
        unsubscribe()


def store_commands(server: RedisServer, before: dict[str, int]) -> dict[str, int]:
    after = server.commandstats()
    return {
        name: calls - before.get(name, 0)
        for name, calls in after.items()
        if name not in BACKGROUND and calls != before.get(name, 0)
    }


async def test_replicas_share_locks(replicas: tuple[RedisStore, RedisStore]) -> None:
    a, b = replicas
    taken, token = await a.acquire_lock("refresh", "d", 30)
    assert taken
    assert await b.acquire_lock("refresh", "d", 30) == (False, token)
    assert await b.release_lock("refresh", "d", token) is True  # the token, not the replica
    assert (await b.acquire_lock("refresh", "d", 30))[0]


async def test_replicas_share_sessions(replicas: tuple[RedisStore, RedisStore]) -> None:
    a, b = replicas
    session_id, session = await login(a)
    assert await b.get_session(DB, session_id, T) == session
    assert await b.get_user(DB, "alice") == ALICE


@pytest.mark.parametrize(
    "revoke",
    ["delete_session", "delete_user_sessions", "disable", "delete_user"],
)
async def test_revocation_reaches_the_other_replica_within_a_second(
    replicas: tuple[RedisStore, RedisStore], shared_redis: tuple[str, RedisServer], revoke: str
) -> None:
    a, b = replicas
    redis_server = shared_redis[1]
    session_id, _ = await login_on(a, b)
    assert await b.get_session(DB, session_id, T) is not None
    before = redis_server.commandstats()
    assert await b.get_session(DB, session_id, T) is not None
    assert store_commands(redis_server, before) == {}  # b serves it from its cache
    if revoke == "delete_session":
        await a.delete_session(DB, session_id)
    elif revoke == "delete_user_sessions":
        await a.delete_user_sessions(DB, "alice")
    elif revoke == "disable":
        await a.put_user(replace(ALICE, disabled=True))
    else:
        await a.delete_user(DB, "alice")

    async def gone() -> bool:
        return await b.get_session(DB, session_id, T) is None

    await eventually(gone, within=1.0)


async def test_role_change_reaches_the_other_replica(
    replicas: tuple[RedisStore, RedisStore],
) -> None:
    a, b = replicas
    session_id, _ = await login_on(a, b)
    events: list[StoreEvent] = []
    b.subscribe(events.append)
    assert await b.get_user(DB, "alice") == ALICE
    assert await b.get_session(DB, session_id, T) is not None
    await a.put_user(replace(ALICE, admin_roles=("viewer",)))

    async def updated() -> bool:
        session = await b.get_session(DB, session_id, T)
        user = await b.get_user(DB, "alice")
        return session is not None and session.roles == ("viewer",) and user is not None

    await eventually(updated, within=1.0)
    assert events == [StoreEvent("user", DB, "alice", revoked=False)]
    user = await b.get_user(DB, "alice")
    assert user is not None and user.admin_roles == ("viewer",)


async def test_warm_cache_makes_no_round_trip(
    replicas: tuple[RedisStore, RedisStore], shared_redis: tuple[str, RedisServer]
) -> None:
    a, b = replicas
    redis_server = shared_redis[1]
    session_id, _ = await login_on(a, b)
    assert await b.ping()  # the pool has a connection: measure commands, not setup
    before = redis_server.commandstats()
    assert await b.get_session(DB, session_id, T) is not None
    assert store_commands(redis_server, before) == {"get": 1}  # a miss: exactly one GET
    before = redis_server.commandstats()
    for i in range(50):  # within the 30 s cache lifetime
        assert await b.get_session(DB, session_id, T + i / 2) is not None
    assert store_commands(redis_server, before) == {}
    before = redis_server.commandstats()
    assert await b.get_session(DB, new_session_id(), T) is None
    assert store_commands(redis_server, before) == {"get": 1}
    before = redis_server.commandstats()
    for value in HOSTILE_IDS:
        assert await b.get_session(DB, value, T) is None
    assert store_commands(redis_server, before) == {}  # junk never reaches Redis


async def test_cache_lifetime_is_bounded(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, local_cache_seconds=5, prefix=prefix())
    await store.start()
    try:
        session_id, _ = await login(store)
        await store.get_session(DB, session_id, T)
        before = redis_server.commandstats()
        await store.get_session(DB, session_id, T + 4.9)
        assert store_commands(redis_server, before) == {}
        await store.get_session(DB, session_id, T + 5)  # entry lifetime over: asks Redis
        assert store_commands(redis_server, before) == {"get": 1}
    finally:
        await store.close()


async def test_extension_does_not_resurrect_a_deleted_session(
    replicas: tuple[RedisStore, RedisStore], shared_redis: tuple[str, RedisServer]
) -> None:
    a, _ = replicas
    redis_server = shared_redis[1]
    session_id, session = await login(a)
    assert await a.get_session(DB, session_id, T) is not None  # cached on a
    key = f"{a._prefix}s:{session.key}"
    assert redis_server.command("DEL", key) == 1  # gone without an event reaching a
    assert await a.get_session(DB, session_id, T + 500) is None  # due for extension: checks
    assert redis_server.command("EXISTS", key) == 0


async def test_the_session_id_is_never_stored(
    replicas: tuple[RedisStore, RedisStore], shared_redis: tuple[str, RedisServer]
) -> None:
    a, b = replicas
    redis_server = shared_redis[1]
    ids = []
    for user in (ALICE, BOB):
        session_id, _ = await login(a, user)
        ids.append(session_id)
        assert await b.get_session(DB, session_id, T + 200) is not None  # extended too
    await a.put_user(replace(ALICE, admin_roles=("x",)))  # rewrites the snapshot
    dump = bytearray()
    with redis_server.client() as client:
        keys = list(client.scan_iter(match=f"{a._prefix}*"))
        for key in keys:
            dump += key
            kind = client.type(key)
            if kind == b"string":
                dump += client.get(key) or b""
            elif kind == b"set":
                dump += b"".join(client.smembers(key))
            else:
                pytest.fail(f"unexpected {kind!r} at {key!r}")
    assert len(keys) == 2 + 2 + 2  # 2 users, 2 indexes, 2 sessions
    for session_id in ids:
        assert session_id.encode() not in bytes(dump)
        assert hash_session_id(session_id).encode() in bytes(dump)


async def test_index_outlives_every_session(
    replicas: tuple[RedisStore, RedisStore], shared_redis: tuple[str, RedisServer]
) -> None:
    a, _ = replicas
    redis_server = shared_redis[1]
    await a.put_user(ALICE)
    await a.create_session(ALICE, ttl=5000, provider=None, now=T)
    await a.create_session(ALICE, ttl=100, provider=None, now=T)  # must not shorten it
    index = f"{a._prefix}u:{{{DB}:alice}}:s"
    assert 4900_000 < redis_server.command("PTTL", index) <= 5000_000


async def test_malformed_event_clears_the_cache(
    replicas: tuple[RedisStore, RedisStore], shared_redis: tuple[str, RedisServer]
) -> None:
    a, b = replicas
    redis_server = shared_redis[1]
    session_id, _ = await login_on(a, b)
    assert await b.get_session(DB, session_id, T) is not None
    redis_server.command("PUBLISH", f"{b._prefix}events", "not json")

    async def cleared() -> bool:
        before = redis_server.commandstats()
        await b.get_session(DB, session_id, T)
        return store_commands(redis_server, before) == {"get": 1}

    await eventually(cleared, within=1.0)


async def test_a_dropped_subscription_clears_the_cache(
    replicas: tuple[RedisStore, RedisStore], shared_redis: tuple[str, RedisServer]
) -> None:
    # The pub/sub connection dies while Redis stays up; a revocation published before the
    # listener is back is lost, so the cache must not survive the gap.
    a, b = replicas
    redis_server = shared_redis[1]
    session_id, _ = await login_on(a, b)
    assert await b.get_session(DB, session_id, T) is not None  # cached on b
    assert redis_server.command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    await a.delete_session(DB, session_id)  # nobody hears this one

    async def gone() -> bool:
        return await b.get_session(DB, session_id, T) is None

    await eventually(gone, within=1.0)


async def test_outage_fails_closed_and_recovers() -> None:
    async with RedisServer() as server:
        store = RedisStore(server.url, local_cache_seconds=30, prefix=prefix(), timeout=0.5)
        await store.start()
        try:
            session_id, _ = await login(store)
            assert await store.get_session(DB, session_id, T) is not None  # cached
            await server.astop()

            async def deaf() -> bool:
                return not store.listening

            await eventually(deaf, within=2.0)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):  # not None: "unknown" would log people out
                await store.get_session(DB, session_id, T)
            with pytest.raises(StoreUnavailable):
                await store.create_session(ALICE, ttl=TTL, provider=None, now=T)
            with pytest.raises(StoreUnavailable):
                await store.delete_user_sessions(DB, "alice")
            assert time.monotonic() - started < 3
            assert await store.ping() is False

            await server.arestart()  # empty: no persistence

            async def back() -> bool:
                return store.listening

            await eventually(back, within=3.0)
            assert await store.ping() is True
            # The cache was emptied: the session cached before the outage is not served.
            assert await store.get_session(DB, session_id, T) is None
            new_id, _ = await login(store)
            assert await store.get_session(DB, new_id, T) is not None
        finally:
            await store.close()


async def test_hung_redis_gives_unavailable_not_a_hang() -> None:
    async with RedisServer() as server:
        store = RedisStore(server.url, local_cache_seconds=30, prefix=prefix(), timeout=0.5)
        await store.start()
        try:
            session_id, _ = await login(store)
            server.pause()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.get_session(DB, new_session_id(), T)
            assert time.monotonic() - started < 2

            async def deaf() -> bool:
                return not store.listening

            await eventually(deaf, within=3.0)  # the silent pub/sub connection is given up
            with pytest.raises(StoreUnavailable):
                await store.get_session(DB, session_id, T)  # cached, but bypassed
            server.resume()

            async def back() -> bool:
                return store.listening

            await eventually(back, within=4.0)
            assert await store.get_session(DB, session_id, T) is not None
        finally:
            await store.close()


async def test_store_starts_while_redis_is_down() -> None:
    server = RedisServer()
    store = RedisStore(server.url, prefix=prefix(), timeout=0.5)
    try:
        await store.start()  # does not raise, does not hang
        assert not store.listening
        assert await store.ping() is False
        await server.astart()

        async def back() -> bool:
            return store.listening

        await eventually(back, within=4.0)
        session_id, _ = await login(store)
        assert await store.get_session(DB, session_id, T) is not None
    finally:
        await store.close()
        server.close()


async def test_sentinel(redis_server: RedisServer) -> None:
    async with RedisServer(monitor=("mymaster", redis_server.port)) as sentinel:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
        store = RedisStore(url, prefix=prefix())
        await store.start()
        try:
            assert store.listening
            session_id, session = await login(store)
            assert await store.get_session(DB, session_id, T) == session
        finally:
            await store.close()


def _kwargs(client: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = client.connection_pool.connection_kwargs
    return kwargs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6380/2", {"host": "127.0.0.1", "port": 6380, "db": 2}),
        ("redis://:pw@h:1/0", {"host": "h", "port": 1, "password": "pw"}),
        ("rediss://u:p@h:6380/0", {"host": "h", "username": "u", "password": "p"}),
        ("unix:///run/redis.sock?db=3", {"path": "/run/redis.sock", "db": 3}),
    ],
)
async def test_plain_urls(url: str, expected: dict[str, Any]) -> None:
    client = redis_client(url, timeout=1.5)
    try:
        assert isinstance(client.redis, Redis) and not client.cluster
        kwargs = _kwargs(client.redis)
        assert {k: kwargs.get(k) for k in expected} == expected
        assert kwargs["socket_timeout"] == 1.5 and kwargs["socket_connect_timeout"] == 1.5
    finally:
        await client.aclose()


async def test_sentinel_url() -> None:
    client = redis_client("rediss+sentinel://:s%40cret@10.0.0.1:26380,[::1],h3/svc/4")
    try:
        assert client.sentinel is not None and not client.cluster
        hosts = [_kwargs(s) for s in client.sentinel.sentinels]
        assert [(h["host"], h["port"]) for h in hosts] == [
            ("10.0.0.1", 26380),
            ("::1", 26379),
            ("h3", 26379),
        ]
        pool: Any = client.redis.connection_pool  # type: ignore[union-attr]
        assert pool.service_name == "svc"
        assert pool.connection_kwargs["db"] == 4
        assert pool.connection_kwargs["password"] == "s@cret"
        assert "SSL" in pool.connection_class.__name__
    finally:
        await client.aclose()


async def test_cluster_url() -> None:
    client = redis_client("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2")
    try:
        assert isinstance(client.redis, RedisCluster) and client.cluster
        nodes = client.redis.nodes_manager.startup_nodes
        assert sorted(nodes) == ["10.0.0.1:7000", "10.0.0.2:6379"]
        assert client.redis.nodes_manager.connection_kwargs["password"] == "pw"
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1",
        "redis+foo://h:1",
        "memcached+sentinel://h/svc",
        "redis+sentinel://h:1",  # no service name
        "redis+sentinel://h:1/svc/db",
        "redis+sentinel://h:port/svc",
        "redis+cluster://,h:1",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        redis_client(url)
