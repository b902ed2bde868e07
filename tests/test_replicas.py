"""Two `sidecar run` processes sharing one redis-server behave as one sidecar: sessions, logouts,
revocations and half-finished logins move between them. Real processes, real OP, real redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from conftest import DB, Answer, browser, read_answer
from support.op import OPClient, OpenIDProvider, browser_login
from support.redis_server import RedisServer, free_port
from support.sidecar import Replica, base_config, sidecar_process
from yarl import URL

SESSION_COOKIE = "SyncGatewaySession"
STATE_COOKIE = "sg-oidc-state"
PROPAGATION_SECONDS = 1.0


@pytest.fixture(scope="module")
def replicas(op: OpenIDProvider) -> Iterator[tuple[Replica, Replica]]:
    """Replicas A and B: one config (but their own ports), one redis, one OP client."""
    a = Replica(free_port(), free_port())
    b = Replica(free_port(), free_port())
    client = OPClient(
        f"replicas-{secrets.token_hex(4)}",
        secrets.token_urlsafe(24),
        (a.callback(DB), b.callback(DB)),
    )
    op.register_client(client)
    provider = {
        "issuer": op.issuer,
        "client_id": client.client_id,
        "validation_key": client.client_secret,
        "register": True,
        "user_prefix": "op",
    }
    with RedisServer() as redis:

        def config(replica: Replica) -> dict[str, Any]:
            return base_config(
                replica.port,
                replica.admin_port,
                demo_upstream=True,  # the built-in echo upstream: no test server to share
                session_store=redis.url,
                databases={DB: {"oidc": {"providers": {"op": provider}}}},
            )

        with sidecar_process(config(a)), sidecar_process(config(b)):
            yield a, b


async def get(http: aiohttp.ClientSession, url: str | URL, **kwargs: Any) -> Answer:
    async with http.get(url, allow_redirects=False, **kwargs) as response:
        return await read_answer(response)


async def request(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    async with http.request(method, url, allow_redirects=False, **kwargs) as response:
        return await read_answer(response)


async def authorize(http: aiohttp.ClientSession, replica: Replica, username: str) -> URL:
    """Starts a login at `replica` and walks the OP's pages; the callback URL, not requested."""
    start = await get(http, f"{replica.url}/{DB}/_oidc")
    assert start.status == 302, start.text
    return await browser_login(http, start.headers["Location"], username=username)


async def login(http: aiohttp.ClientSession, replica: Replica, username: str) -> Answer:
    answer = await get(http, await authorize(http, replica, username))
    assert answer.status == 200, answer.text
    return answer


def cookie(session_id: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={session_id}"}


async def proxied(replica: Replica, session_id: str) -> Answer:
    async with aiohttp.ClientSession() as http:
        return await get(http, f"{replica.url}/{DB}/doc", headers=cookie(session_id))


async def rejected_within(replica: Replica, session_id: str, seconds: float) -> float:
    """Polls until the replica refuses the session; how long that took (fails past `seconds`)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        answer = await proxied(replica, session_id)
        elapsed = loop.time() - started
        if answer.status == 401:
            return elapsed
        assert answer.status == 200, answer.text
        assert elapsed < seconds, f"{replica.url} still accepts the session after {elapsed:.2f}s"
        await asyncio.sleep(0.05)


async def test_a_session_made_on_a_works_on_b(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    async with browser() as http:
        answer = await login(http, a, "alice")
        # The browser's cookie jar sends the cookie to B too (cookies ignore ports).
        on_b = await get(http, f"{b.url}/{DB}/doc")
        me_on_b = await get(http, f"{b.url}/{DB}/_session")
    assert on_b.status == 200, on_b.text
    assert on_b.body["headers"]["X-Forwarded-User"] == "op_alice"
    assert me_on_b.body["userCtx"]["name"] == "op_alice"
    session_id = answer.body["session_id"]
    async with aiohttp.ClientSession() as admin:
        info = await get(admin, f"{b.admin_url}/{DB}/_session/{session_id}")
    assert info.status == 200 and info.body["name"] == "op_alice"


async def test_logout_on_a_is_refused_by_b_within_a_second(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with browser() as http:
        session_id = (await login(http, a, "bob")).body["session_id"]
    for replica in (a, b):  # both replicas have the session in their local caches now
        assert (await proxied(replica, session_id)).status == 200
    async with aiohttp.ClientSession() as http:
        logout = await request(http, "DELETE", f"{a.url}/{DB}/_session", headers=cookie(session_id))
    assert logout.status == 200
    assert (await proxied(a, session_id)).status == 401  # at once where it happened
    await rejected_within(b, session_id, PROPAGATION_SECONDS)


async def test_admin_revoke_on_b_is_refused_by_a_within_a_second(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with browser() as http:
        first = (await login(http, a, "carol")).body["session_id"]
    async with browser() as http:
        second = (await login(http, b, "carol")).body["session_id"]
    for replica in (a, b):
        for session_id in (first, second):
            assert (await proxied(replica, session_id)).status == 200
    async with aiohttp.ClientSession() as admin:
        revoked = await request(admin, "DELETE", f"{b.admin_url}/{DB}/_user/op_carol/_session")
    assert (revoked.status, revoked.body) == (200, {"ok": True, "revoked": 2})
    for session_id in (first, second):
        await rejected_within(a, session_id, PROPAGATION_SECONDS)
        assert (await proxied(b, session_id)).status == 401


async def test_admin_disable_on_a_is_refused_by_b_within_a_second(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    async with browser() as http:
        session_id = (await login(http, b, "dave")).body["session_id"]
    assert (await proxied(b, session_id)).status == 200
    async with aiohttp.ClientSession() as admin:
        disabled = await request(
            admin, "PUT", f"{a.admin_url}/{DB}/_user/op_dave", json={"disabled": True}
        )
    assert disabled.status == 200
    await rejected_within(b, session_id, PROPAGATION_SECONDS)


async def test_a_login_started_on_a_completes_on_b_once(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    async with browser() as http:
        callback = await authorize(http, a, "erin")
        assert callback.port == a.port
        # The load balancer sends the provider's redirect back to the other replica.
        on_b = await get(http, callback.with_port(b.port))
        assert on_b.status == 200, on_b.text
        assert on_b.body["name"] == "op_erin"
        assert (await get(http, f"{a.url}/{DB}/doc")).status == 200
    # The state was spent on B: A refuses the same callback, even with the state cookie.
    state = callback.query["state"]
    async with aiohttp.ClientSession() as http:
        replay = await get(http, callback, headers={"Cookie": f"{STATE_COOKIE}={state}"})
    assert (replay.status, replay.body["reason"]) == (
        400,
        "OIDC Auth Failure: State expired or already used",
    )
    assert replay.cookie(SESSION_COOKIE) is None


async def test_refresh_on_the_other_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    async with browser() as http:
        answer = await login(http, a, "fay")
        refreshed = await get(
            http,
            f"{b.url}/{DB}/_oidc_refresh",
            params={"refresh_token": answer.body["refresh_token"]},
        )
    assert refreshed.status == 200, refreshed.text
    assert refreshed.body["name"] == "op_fay"
    assert (await proxied(a, refreshed.body["session_id"])).status == 200
