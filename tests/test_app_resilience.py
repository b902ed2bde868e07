"""The sidecar when its dependencies fail: Redis stopped or hung, the provider down at start,
the upstream down, slow or broken. It fails closed (503/502/504 JSON, never 200 or 500),
stays alive, and recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import KeyServer, admin_session
from support.redis_server import RedisServer, free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar, serving

COOKIE = "SyncGatewaySession"
FORGED = "resilience-client"


async def call(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None, json: Any = None
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers=headers, json=json) as response:
            body = await response.read()
            is_json = response.content_type == "application/json"
            return response.status, (await response.json()) if is_json and body else None


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.05
) -> float:
    """Waits until `probe()` is true; returns how long it took."""
    started = time.monotonic()
    while not await probe():
        assert time.monotonic() - started < within, f"not within {within}s"
        await asyncio.sleep(interval)
    return time.monotonic() - started


def unavailable(body: Any) -> bool:
    return bool(body == {"error": "Service Unavailable", "reason": "session store unavailable"})


# --------------------------------------------------------------------------- Redis


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@contextlib.asynccontextmanager
async def redis_sidecar(
    redis: RedisServer, upstream: Upstream, ks: KeyServer, cache_seconds: float
) -> AsyncIterator[Sidecar]:
    provider = {"issuer": ks.issuer, "client_id": FORGED, "register": True, "user_prefix": "ks"}
    config = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        session_store=redis.url,
        session={"local_cache_seconds": cache_seconds},
        databases={"db": {"oidc": {"providers": {"ks": provider}}}},
    )
    async with running_sidecar(config) as sidecar:
        yield sidecar


@pytest.mark.parametrize("cache_seconds", [0.0, 30.0])
async def test_redis_stopped_fails_closed_and_restart_recovers(
    redis: RedisServer,
    upstream: Upstream,
    key_server: KeyServer,
    cache_seconds: float,
) -> None:
    async with redis_sidecar(redis, upstream, key_server, cache_seconds) as sidecar:
        session = await admin_session(sidecar.admin_url, "db", "carol")
        cookie = {"Cookie": f"{COOKIE}={session}"}
        doc = sidecar.url + "/db/doc"
        assert (await call(doc, headers=cookie))[0] == 200
        bearer = {"Authorization": f"Bearer {key_server.token(FORGED)}"}
        assert (await call(doc, headers=bearer))[0] == 200
        seen = len(upstream.requests)

        await redis.astop()
        statuses: list[int] = []

        async def refused() -> bool:
            status, body = await call(doc, headers=cookie)
            statuses.append(status)
            return status == 503 and unavailable(body)

        # Without a cache: refused at once. With one: only until the lost invalidation feed is
        # noticed (the cache must not outlive it), which takes milliseconds.
        await eventually(refused, within=0.01 if cache_seconds == 0 else 2.0)
        assert set(statuses) <= {200, 503}
        if cache_seconds == 0:
            assert statuses == [503]
        for _ in range(3):
            status, body = await call(doc, headers=cookie)
            assert (status, unavailable(body)) == (503, True)
        status, body = await call(doc, headers=bearer)  # the token is fine; the user store is not
        assert (status, unavailable(body)) == (503, True)
        assert len(upstream.requests) == seen + statuses.count(200)

        for base in (sidecar.url, sidecar.admin_url):
            status, body = await call(base + "/_ready")
            assert (status, body["session_store"], body["ready"]) == (503, "unavailable", False)
            assert await call(base + "/_health") == (200, {"status": "ok"})
        status, body = await call(sidecar.admin_url + "/db/_user/dave", method="PUT", json={})
        assert (status, unavailable(body)) == (503, True)

        await redis.astart()  # same port, empty: this server keeps nothing on disk

        async def ready() -> bool:
            return (await call(sidecar.url + "/_ready"))[0] == 200

        await eventually(ready, within=5.0)
        assert (await call(doc, headers=cookie))[0] == 401  # its session died with the data
        fresh = await admin_session(sidecar.admin_url, "db", "carol")
        assert (await call(doc, headers={"Cookie": f"{COOKIE}={fresh}"}))[0] == 200
        assert (await call(doc, headers=bearer))[0] == 200  # re-registered


async def test_hung_redis_fails_fast_then_recovers(
    redis: RedisServer, upstream: Upstream, key_server: KeyServer
) -> None:
    async with redis_sidecar(redis, upstream, key_server, cache_seconds=0) as sidecar:
        session = await admin_session(sidecar.admin_url, "db", "carol")
        cookie = {"Cookie": f"{COOKIE}={session}"}
        doc = sidecar.url + "/db/doc"
        assert (await call(doc, headers=cookie))[0] == 200
        redis.pause()  # accepts connections, answers nothing
        try:
            started = time.monotonic()
            status, body = await call(doc, headers=cookie)
            assert (status, unavailable(body)) == (503, True)
            assert time.monotonic() - started < 5  # bounded by the store's 2 s socket timeout
        finally:
            redis.resume()

        async def served() -> bool:
            return (await call(doc, headers=cookie))[0] == 200

        await eventually(served, within=5.0)  # same session: the data survived the hang
        assert len(upstream.requests) == 2


# --------------------------------------------------------------------------- the provider


async def test_provider_down_at_start_recovers_by_itself(upstream: Upstream) -> None:
    ks = KeyServer()  # its port stays closed until the sidecar runs
    provider = {"issuer": ks.issuer, "client_id": FORGED, "register": True, "user_prefix": "ks"}
    config = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        databases={"db": {"oidc": {"providers": {"ks": provider}}}},
    )
    async with running_sidecar(config) as sidecar:
        doc = sidecar.url + "/db/doc"
        status, body = await call(sidecar.url + "/_ready")
        assert status == 503
        assert body["providers"] == {"db/ks": "unavailable"}
        assert body["session_store"] == "ok"
        assert (await call(sidecar.url + "/_health"))[0] == 200

        status, body = await call(doc, headers={"Authorization": f"Bearer {ks.token(FORGED)}"})
        assert status == 503
        assert body["error"] == "Service Unavailable"
        assert body["reason"].startswith("identity provider unavailable")
        # Cheap checks need no provider: garbage is still a 401, not a 503.
        assert (await call(doc, headers={"Authorization": "Bearer x.y.z"}))[0] == 401
        # Sessions need no provider at all.
        session = await admin_session(sidecar.admin_url, "db", "carol")
        assert (await call(doc, headers={"Cookie": f"{COOKIE}={session}"}))[0] == 200
        assert len(upstream.requests) == 1

        async with ks:  # the provider comes up on the configured port

            async def ready() -> bool:
                return (await call(sidecar.url + "/_ready"))[0] == 200

            await eventually(ready, within=10.0)  # the refresher's own retry, no request needed
            token = {"Authorization": f"Bearer {ks.token(FORGED)}"}
            assert (await call(doc, headers=token))[0] == 200

        # Down again: tokens verifiable with the cached keys still pass; readiness holds.
        token = {"Authorization": f"Bearer {ks.token(FORGED, sub='other')}"}
        assert (await call(doc, headers=token))[0] == 200
        assert (await call(sidecar.url + "/_ready"))[0] == 200


# --------------------------------------------------------------------------- the upstream


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.json_response({})


@contextlib.asynccontextmanager
async def slow_upstream() -> AsyncIterator[str]:
    async with serving(_slow) as url:
        yield url


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[str]:
    """Reads the request head, writes `answer` (maybe nothing), hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


# (database, status, reason)
UPSTREAM_FAILURES = [
    ("down", 502, "upstream unavailable: connection refused"),
    ("slow", 504, "upstream did not answer in time"),
    ("hangup", 502, "upstream unavailable: connection closed"),
    ("garbage", 502, "upstream unavailable: invalid response"),
]


@pytest.fixture
async def failing() -> AsyncIterator[Sidecar]:
    async with (
        slow_upstream() as slow,
        raw_upstream(b"") as hangup,
        raw_upstream(b"NOT HTTP AT ALL\r\n\r\n") as garbage,
    ):
        config = base_config(
            free_port(),
            free_port(),
            timeouts={"upstream_read": 0.5, "upstream_connect": 2},
            databases={
                "down": {"upstream": f"http://127.0.0.1:{free_port()}"},
                "slow": {"upstream": slow},
                "hangup": {"upstream": hangup},
                "garbage": {"upstream": garbage},
            },
        )
        async with running_sidecar(config) as sidecar:
            yield sidecar


@pytest.mark.parametrize(("db", "status", "reason"), UPSTREAM_FAILURES)
async def test_upstream_failures_are_json_errors(
    failing: Sidecar, db: str, status: int, reason: str
) -> None:
    session = await admin_session(failing.admin_url, db, "carol")
    started = time.monotonic()
    got, body = await call(failing.url + f"/{db}/doc", headers={"Cookie": f"{COOKIE}={session}"})
    assert (got, body["reason"]) == (status, reason)
    assert set(body) == {"error", "reason"}
    assert time.monotonic() - started < 3  # the read timeout (0.5 s) bounds the slow one
    assert (await call(failing.url + "/_health"))[0] == 200


@pytest.mark.parametrize(("db", "status"), [("down", 502), ("slow", 504)])
async def test_websocket_to_a_failing_upstream(failing: Sidecar, db: str, status: int) -> None:
    session = await admin_session(failing.admin_url, db, "carol")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                failing.url + f"/{db}/_ws", headers={"Cookie": f"{COOKIE}={session}"}
            )
    assert refused.value.status == status
