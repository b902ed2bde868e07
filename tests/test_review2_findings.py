"""Findings of the second review, kept as regression tests once fixed."""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict
from test_upstream_h1 import RawConn, pool, raw  # noqa: F401 (fixtures)

from sidecar.upstream_h1 import H1Pool


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
    ids=["gzip", "chunked-then-gzip", "gzip-then-chunked"],
)
async def test_upstream_transfer_coding_other_than_chunked_is_refused(
    raw,  # noqa: F811
    pool: H1Pool,  # noqa: F811
    response: bytes,
) -> None:
    async def answer_and_close(conn: RawConn) -> None:
        await conn.request()
        conn.writer.write(response)
        await conn.writer.drain()
        conn.writer.close()

    upstream = await raw(answer_and_close)
    with pytest.raises((aiohttp.ClientError, OSError)):
        r = await pool.request("GET", upstream.url, CIMultiDict(), None)
        await r.read()
