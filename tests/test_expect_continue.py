"""`Expect: 100-continue`: the body is invited only after the caller is authenticated."""

from __future__ import annotations

import asyncio

import pytest
from conftest import admin_session
from support.redis_server import free_port
from support.sidecar import Upstream, base_config, running_sidecar


async def exchange(
    port: int, headers: list[str]
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [
        "PUT /db/doc HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Length: 5",
        "Expect: 100-continue",
        "Connection: close",
        *headers,
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return first, reader, writer


@pytest.mark.parametrize("authenticated", [True, False])
async def test_continue_only_after_authentication(upstream: Upstream, authenticated: bool) -> None:
    port, admin = free_port(), free_port()
    config = base_config(port, admin, upstream=upstream.url, databases={"db": {}})
    async with running_sidecar(config):
        headers = []
        if authenticated:
            sid = await admin_session(f"http://127.0.0.1:{admin}", "db", "ann")
            headers = [f"Cookie: SyncGatewaySession={sid}"]
        first, reader, writer = await exchange(port, headers)
        try:
            if not authenticated:
                assert first.startswith(b"HTTP/1.1 401")
                assert upstream.requests == []
                return
            assert first.startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"hello")
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 5)
            assert rest.startswith(b"HTTP/1.1 200")
            assert len(upstream.requests) == 1
            assert upstream.header(0, "Expect") == []
        finally:
            writer.close()
