"""Bounded body reads: whole bodies even when split across packets, refused past the limit."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from support.redis_server import free_port
from support.sidecar import Upstream, base_config, running_sidecar

from sidecar.streams import read_bounded


def stream_of(*chunks: bytes) -> aiohttp.StreamReader:
    protocol = BaseProtocol(asyncio.get_running_loop())
    reader = aiohttp.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize(
    ("chunks", "limit", "expected"),
    [
        ((b"",), 10, b""),
        ((b"ab", b"cd"), 4, b"abcd"),
        ((b"ab", b"cde"), 4, None),
        ((b"x" * 70_000,), 100_000, b"x" * 70_000),
    ],
)
async def test_read_bounded(chunks: tuple[bytes, ...], limit: int, expected: bytes | None) -> None:
    assert await read_bounded(stream_of(*chunks), limit) == expected


async def test_admin_body_split_across_packets_is_read_whole(upstream: Upstream) -> None:
    admin = free_port()
    config = base_config(free_port(), admin, upstream=upstream.url, databases={"db": {}})
    body = json.dumps({"email": "split@example.com", "admin_roles": ["r"]}).encode()
    async with running_sidecar(config):
        reader, writer = await asyncio.open_connection("127.0.0.1", admin)
        head = (
            f"PUT /db/_user/split HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head + body[:10])
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is already reading: the rest comes later
        writer.write(body[10:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{admin}/db/_user/split") as r:
                assert (await r.json())["email"] == "split@example.com"
