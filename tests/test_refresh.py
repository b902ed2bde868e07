"""`/_oidc_refresh` against a provider that rotates refresh tokens (the real npm oidc-provider,
which counts its token requests): the client gets the new token, and concurrent refreshes of one
token reach the provider once, on one replica or two (a second `sidecar run` process on the
same redis-server)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp
import pytest
from conftest import DB, Answer, LoginHarness, browser, forget_refresh_outcome
from support.op import OpenIDProvider
from support.redis_server import free_port
from support.sidecar import base_config, sidecar_process

from sidecar.errors import GatewayTimeout, ProviderError, SidecarError, Unauthorized
from sidecar.oidc.single_flight import OUTCOME_SECONDS, digest, seal, single_flight, unseal
from sidecar.sessions.memory_store import MemoryStore

SESSION_COOKIE = "SyncGatewaySession"


async def refresh(harness: LoginHarness, token: str, *, url: str | None = None) -> Answer:
    async with aiohttp.ClientSession() as http:
        return await harness.get(
            http, f"{url or harness.url}/{DB}/_oidc_refresh", params={"refresh_token": token}
        )


def refreshes(harness: LoginHarness, client_id: str) -> dict[str, int]:
    counts = harness.op.grant_counts(client_id).get("refresh_token", {})
    return {"success": counts.get("success", 0), "error": counts.get("error", 0)}


async def login(harness: LoginHarness) -> str:
    async with browser() as http:
        answer = await harness.login(http, "alice")
    assert answer.status == 200, answer.text
    token: str = answer.body["refresh_token"]
    return token


# --- rotation ----------------------------------------------------------------------------------


async def test_the_rotated_refresh_token_reaches_the_client(harness: LoginHarness) -> None:
    client = await harness.start_op(user_prefix="op")
    token = await login(harness)
    seen = [token]
    for _ in range(3):  # each answer's token is the next refresh's: the chain never breaks
        answer = await refresh(harness, seen[-1])
        assert answer.status == 200, answer.text
        # Sync Gateway's body, plus the new token (Couchbase Lite keeps its old one without it).
        assert list(answer.body) == ["id_token", "refresh_token", "session_id", "name"]
        assert answer.body["refresh_token"] not in seen
        assert answer.headers["Cache-Control"] == "no-store"
        seen.append(answer.body["refresh_token"])
    assert refreshes(harness, client.client_id) == {"success": 3, "error": 0}


async def test_no_refresh_token_in_the_answer_when_the_provider_keeps_it(
    harness: LoginHarness,
) -> None:
    async with OpenIDProvider(rotate_refresh_tokens=False) as keeping:
        harness.op = keeping
        await harness.start_op(user_prefix="op")
        token = await login(harness)
        for _ in range(2):
            answer = await refresh(harness, token)
            assert answer.status == 200, answer.text
            assert list(answer.body) == ["id_token", "session_id", "name"]  # as Sync Gateway


# --- one provider call per token ---------------------------------------------------------------


async def test_ten_concurrent_refreshes_reach_the_provider_once(harness: LoginHarness) -> None:
    client = await harness.start_op(user_prefix="op")
    token = await login(harness)
    answers = await asyncio.gather(*(refresh(harness, token) for _ in range(10)))
    assert [a.status for a in answers] == [200] * 10, [a.text for a in answers]
    assert refreshes(harness, client.client_id) == {"success": 1, "error": 0}
    assert len({a.body["refresh_token"] for a in answers}) == 1
    assert len({a.body["id_token"] for a in answers}) == 1
    sessions = {a.body["session_id"] for a in answers}
    assert len(sessions) == 10  # every caller gets a session of its own
    for answer in answers:
        assert answer.cookie(SESSION_COOKIE) is not None
    # The provider saw no reuse (which would have revoked the grant): the new token works.
    following = await refresh(harness, answers[0].body["refresh_token"])
    assert following.status == 200, following.text
    assert refreshes(harness, client.client_id) == {"success": 2, "error": 0}


async def test_what_redis_holds_reveals_no_token(harness: LoginHarness) -> None:
    await harness.start_op(user_prefix="op")
    token = await login(harness)
    answer = await refresh(harness, token)
    assert answer.status == 200, answer.text
    redis = harness.redis
    keys = [k.decode() for k in await asyncio.to_thread(redis.command, "KEYS", "*")]
    outcome = f"sidecar:r:refresh-outcome:{digest(token)}"
    assert outcome in keys
    assert 0 < await asyncio.to_thread(redis.command, "TTL", outcome) <= OUTCOME_SECONDS
    assert f"sidecar:l:refresh:{digest(token)}" not in keys  # released
    stored = b" ".join(
        [*(k.encode() for k in keys)]
        + [
            await asyncio.to_thread(redis.command, "GET", k)
            for k in keys
            if k.startswith("sidecar:r:")
        ]
    )
    for secret in (token, answer.body["refresh_token"], answer.body["id_token"]):
        assert secret.encode() not in stored


async def test_a_failed_refresh_is_shared_then_forgotten(harness: LoginHarness) -> None:
    client = await harness.start_op(user_prefix="op")
    token = await login(harness)
    assert (await refresh(harness, token)).status == 200
    await forget_refresh_outcome(harness, token)
    # Ten callers of the spent token all get the provider's refusal (those that waited for one
    # caller's provider call get its answer: test_waiters_get_the_leaders_error).
    answers = await asyncio.gather(*(refresh(harness, token) for _ in range(10)))
    assert {(a.status, a.body["reason"]) for a in answers} == {
        (401, "Unable to refresh token: provider answered invalid_grant: grant request is invalid")
    }
    assert all(a.cookie(SESSION_COOKIE) is None for a in answers)
    failed = refreshes(harness, client.client_id)["error"]
    assert failed >= 1
    # The failure released the lock and is not served to the next caller: it asks again.
    again = await refresh(harness, token)
    assert again.status == 401
    assert refreshes(harness, client.client_id) == {"success": 1, "error": failed + 1}


async def test_two_replicas_reach_the_provider_once(harness: LoginHarness) -> None:
    client = await harness.start_op(user_prefix="op")
    other_port, other_admin = free_port(), free_port()
    config = base_config(
        other_port,
        other_admin,
        upstream=harness.upstream.url,
        session_store=harness.redis.url,
        databases={DB: {"oidc": {"providers": {"op": harness.provider(client, user_prefix="op")}}}},
    )
    token = await login(harness)
    other = f"http://127.0.0.1:{other_port}"
    # A real second replica: its own process, the same redis (started off the event loop:
    # sidecar_process waits for it with a loop of its own).
    replica = sidecar_process(config)
    await asyncio.to_thread(replica.__enter__)
    try:
        answers = await asyncio.gather(
            *(refresh(harness, token, url=harness.url if i % 2 else other) for i in range(10))
        )
        assert [a.status for a in answers] == [200] * 10, [a.text for a in answers]
        assert refreshes(harness, client.client_id) == {"success": 1, "error": 0}
        assert len({a.body["refresh_token"] for a in answers}) == 1
        following = await refresh(harness, answers[0].body["refresh_token"], url=other)
    finally:
        await asyncio.to_thread(replica.__exit__, None, None, None)
    assert following.status == 200, following.text


# --- the single-flight rule on its own (the in-process store) ----------------------------------


def test_an_outcome_opens_only_with_its_secret() -> None:
    record = seal("refresh", "the-token", "flight-1", {"ok": {"id_token": "x"}})
    assert unseal("refresh", "the-token", record) == {"ok": {"id_token": "x"}}
    assert "the-token" not in str(record) and "id_token" not in str(record)
    assert unseal("refresh", "another-token", record) is None
    assert unseal("login", "the-token", record) is None
    assert unseal("refresh", "the-token", {**record, "flight": "flight-2"}) is None
    tampered = record["box"][:-4] + ("AAAA" if record["box"][-4:] != "AAAA" else "BBBB")
    assert unseal("refresh", "the-token", {**record, "box": tampered}) is None
    assert unseal("refresh", "the-token", {**record, "box": "not base64!"}) is None
    assert unseal("refresh", "the-token", {"flight": 1, "box": record["box"]}) is None


@pytest.mark.parametrize(
    "error",
    [
        Unauthorized("Unable to refresh token: provider answered invalid_grant"),
        ProviderError("token endpoint unreachable: ClientConnectorError"),
        GatewayTimeout("slow"),
    ],
)
async def test_waiters_get_the_leaders_error(error: SidecarError) -> None:
    store = MemoryStore()
    calls = 0
    release = asyncio.Event()

    async def work() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await release.wait()
        raise error

    callers = [
        asyncio.create_task(single_flight(store, "refresh", "t", work, lock_seconds=5))
        for _ in range(5)
    ]
    await asyncio.sleep(0.1)
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert calls == 1
    for result in results:
        assert isinstance(result, SidecarError)
        assert (result.status, result.reason) == (error.status, error.reason)
    # Released: the next caller does the work again.
    with pytest.raises(SidecarError):
        await single_flight(store, "refresh", "t", work, lock_seconds=5)
    assert calls == 2


async def test_a_departed_leader_still_finishes_for_its_waiters() -> None:
    store = MemoryStore()
    calls = 0
    release = asyncio.Event()

    async def work() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"id_token": "new"}

    leader = asyncio.create_task(single_flight(store, "refresh", "t", work, lock_seconds=5))
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(single_flight(store, "refresh", "t", work, lock_seconds=5))
    await asyncio.sleep(0.05)
    leader.cancel()  # its client went away mid-refresh
    release.set()
    assert await waiter == {"id_token": "new"}
    assert calls == 1


async def test_waiters_give_up_in_bounded_time() -> None:
    store = MemoryStore()
    taken, _ = await store.acquire_lock("refresh", digest("t"), 30)  # a holder that never ends
    assert taken

    async def work() -> dict[str, Any]:
        raise AssertionError("the lock is held: nobody else may do the work")

    with pytest.raises(GatewayTimeout) as info:
        await single_flight(store, "refresh", "t", work, lock_seconds=0.3)
    assert info.value.status == 504


async def test_work_outliving_its_lock_is_cut_short() -> None:
    store = MemoryStore()
    never = asyncio.Event()

    async def work() -> dict[str, Any]:
        await never.wait()
        return {}

    with pytest.raises(GatewayTimeout):
        await single_flight(store, "refresh", secrets.token_hex(8), work, lock_seconds=0.4)
