"""Findings of the second review (see the review report), pinned as strict xfails: each test
states the expected behaviour and fails today; when a fix lands, the xfail turns into an error
and the marker is removed."""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict
from test_upstream_h1 import RawConn, pool, raw  # noqa: F401 (fixtures)

from sidecar.upstream_h1 import H1Pool


@pytest.mark.xfail(
    strict=True,
    reason="review2 #3: a transfer coding other than chunked in an upstream answer is dropped "
    "and its coded bytes relayed as complete content; expected: invalid answer",
)
@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nabc",
    ],
    ids=["gzip"],
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
