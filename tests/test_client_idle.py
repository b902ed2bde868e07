"""`timeouts.client_idle`: a client connection with no request in progress (idle keep-alive, or
a request head that never finishes) is closed; an answer in progress never is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from conftest import admin_session
from support.redis_server import free_port
from support.sidecar import Sidecar, base_config, running_sidecar, serving

IDLE = 1.0
BOUND = IDLE + 4.0  # the close may come up to one keep-alive check later


async def slow_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for _ in range(6):  # 3 s, three times the idle timeout
        await response.write(b"tick\n")
        await asyncio.sleep(0.5)
    await response.write_eof()
    return response


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    async with serving(slow_stream) as upstream:
        config = base_config(
            free_port(),
            free_port(),
            upstream=upstream,
            databases={"db": {}},
            timeouts={"client_idle": IDLE},
        )
        async with running_sidecar(config) as running:
            yield running


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closed the connection (EOF), read while waiting."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while await reader.read(4096):
            pass
    return time.monotonic() - started


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /db/doc HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"GET /db/doc HTT"],
    ids=["nothing", "half a head", "half a request line"],
)
async def test_a_connection_without_a_request_is_closed(sidecar: Sidecar, sent: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    try:
        writer.write(sent)
        await writer.drain()
        assert await closed_within(reader, BOUND) >= IDLE * 0.9
    finally:
        writer.close()


async def test_idle_keep_alive_is_closed_after_an_answer(sidecar: Sidecar) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    try:
        writer.write(b"GET /_health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await closed_within(reader, BOUND)
    finally:
        writer.close()


async def test_an_answer_in_progress_outlives_the_idle_timeout(sidecar: Sidecar) -> None:
    session = await admin_session(sidecar.admin_url, "db", "alice")
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.get(
            f"{sidecar.url}/db/feed", headers={"Cookie": f"SyncGatewaySession={session}"}
        ) as r:
            assert r.status == 200
            assert await r.read() == b"tick\n" * 6  # the whole stream, not cut
        assert time.monotonic() - started > 2 * IDLE
