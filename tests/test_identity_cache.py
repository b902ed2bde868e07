"""A bearer token's resolved identity is cached, yet every change to its user takes effect at
once: disabled, deleted, re-granted — on this replica and, through Redis, on the others."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from conftest import KeyServer
from support.redis_server import RedisServer, free_port
from support.sidecar import Upstream, base_config, running_sidecar
from yarl import URL

from sidecar.identity import Identity
from sidecar.identity_cache import BearerIdentities
from sidecar.sessions.store import StoreEvent

ALICE = Identity(name="alice", via="bearer")


class Source:
    """Stands in for the provider that verified a token: only its keys_epoch matters here."""

    keys_epoch = 0


SOURCE = Source()


@pytest.mark.parametrize(
    ("now", "generation", "expected"),
    [(10.0, 1, ALICE), (99.9, 1, ALICE), (100.0, 1, None), (10.0, 2, None)],
)
def test_entries_expire_with_the_token_and_with_the_store_generation(
    now: float, generation: int, expected: Identity | None
) -> None:
    cache = BearerIdentities()
    cache.put("db", b"t1", ALICE, 100.0, 1, SOURCE)
    assert cache.get("db", b"t1", now, generation) == expected
    assert cache.get("other", b"t1", 10.0, 1) is None


@pytest.mark.parametrize(
    ("event", "kept"),
    [
        (StoreEvent("user", "db", "alice"), False),
        (StoreEvent("user", "db", "alice", revoked=False), False),  # roles changed: re-resolve
        (StoreEvent("user", "db", "bob"), True),
        (StoreEvent("user", "other", "alice"), True),
        (StoreEvent("session", "db", "alice", key="k"), True),
    ],
)
def test_user_events_drop_that_users_entries(event: StoreEvent, kept: bool) -> None:
    cache = BearerIdentities()
    cache.put("db", b"t1", ALICE, 100.0, 0, SOURCE)
    cache.put("db", b"t2", ALICE, 100.0, 0, SOURCE)
    cache.on_store_event(event)
    assert (cache.get("db", b"t1", 1.0, 0) is not None) is kept
    assert (cache.get("db", b"t2", 1.0, 0) is not None) is kept


def test_a_retired_provider_key_drops_what_it_verified() -> None:
    """Security: an identity resolved from a token verified with a key the provider has since
    retired is never served again (the token must be verified anew, and then fails)."""
    source = Source()
    cache = BearerIdentities()
    cache.put("db", b"t1", ALICE, 100.0, 0, source)
    assert cache.get("db", b"t1", 1.0, 0) == ALICE
    source.keys_epoch += 1
    assert cache.get("db", b"t1", 1.0, 0) is None


def test_bounded() -> None:
    cache = BearerIdentities(max_entries=3)
    for i in range(10):
        cache.put("db", bytes([i]), ALICE, 100.0, 0, SOURCE)
    assert len(cache) <= 3


def config(
    port: int, admin: int, upstream: Upstream, key_server: KeyServer, redis: str
) -> dict[str, Any]:
    return base_config(
        port,
        admin,
        upstream=upstream.url,
        session_store=redis,
        databases={
            "db": {
                "oidc": {
                    "providers": {
                        "ks": {"issuer": key_server.issuer, "client_id": "app", "register": True}
                    }
                }
            }
        },
    )


async def test_changes_to_a_cached_bearer_user_apply_on_every_replica(
    upstream: Upstream, key_server: KeyServer, redis_server_session: RedisServer
) -> None:
    a_port, a_admin, b_port, b_admin = free_port(), free_port(), free_port(), free_port()
    redis = redis_server_session.url
    token = key_server.token("app", sub="carol")
    name = f"127.0.0.1%3A{key_server.port}_carol"
    bearer = {"Authorization": f"Bearer {token}"}
    async with (
        running_sidecar(config(a_port, a_admin, upstream, key_server, redis)) as a,
        running_sidecar(config(b_port, b_admin, upstream, key_server, redis)) as b,
        aiohttp.ClientSession() as http,
    ):

        async def status(url: str) -> int:
            async with http.get(f"{url}/db/doc", headers=bearer) as r:
                return r.status

        async def roles(url: str) -> list[str]:
            async with http.get(f"{url}/db/doc", headers=bearer) as r:
                assert r.status == 200
            return upstream.header(-1, "X-Forwarded-Roles")

        assert await status(a.url) == 200 and await status(b.url) == 200  # both cache it
        user_url = URL(f"{a.admin_url}/db/_user/{quote(name, safe='')}", encoded=True)
        async with http.put(user_url, json={"admin_roles": ["editor"]}) as r:
            assert r.status == 200
        await wait_for(lambda: roles(b.url), ["editor"])
        async with http.put(user_url, json={"disabled": True}) as r:
            assert r.status == 200
        await wait_for(lambda: status(b.url), 401)
        assert await status(a.url) == 401


async def wait_for(probe: Any, expected: Any, tries: int = 50) -> None:
    import asyncio

    for _ in range(tries):
        if await probe() == expected:
            return
        await asyncio.sleep(0.02)  # invalidation reaches the other replica within 1 s
    assert await probe() == expected
