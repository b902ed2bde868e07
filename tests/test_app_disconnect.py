"""A client that goes away mid-request releases its upstream connection (the real app's runner
cancels the handler; no watcher task per request)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from conftest import admin_session
from support.redis_server import free_port
from support.sidecar import base_config, running_sidecar, serving


class LongPoll:
    def __init__(self) -> None:
        self.url = ""
        self.started = asyncio.Event()
        self.released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.started.set()
        for _ in range(200):  # a _changes feed that has nothing to say for 20 s
            transport = request.transport
            if transport is None or transport.is_closing():
                self.released.set()
                break
            await asyncio.sleep(0.1)
        return web.json_response({"results": []})


@pytest.fixture
async def long_poll() -> AsyncIterator[LongPoll]:
    upstream = LongPoll()
    async with serving(upstream.handle) as url:
        upstream.url = url
        yield upstream


async def test_client_leaving_a_long_poll_closes_the_upstream_connection(
    long_poll: LongPoll,
) -> None:
    port, admin = free_port(), free_port()
    config = base_config(port, admin, upstream=long_poll.url, databases={"db": {}})
    async with running_sidecar(config):
        sid = await admin_session(f"http://127.0.0.1:{admin}", "db", "ann")
        async with aiohttp.ClientSession() as http:
            request = asyncio.ensure_future(
                http.get(
                    f"http://127.0.0.1:{port}/db/_changes?feed=longpoll",
                    headers={"Cookie": f"SyncGatewaySession={sid}"},
                )
            )
            await asyncio.wait_for(long_poll.started.wait(), 5)
            request.cancel()  # the client gives up and closes its connection
        await asyncio.wait_for(long_poll.released.wait(), 5)
