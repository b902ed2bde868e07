"""A raw HTTP/1.1 reader of streamed answers (`_changes` feeds, event streams) that tells a
complete chunked body from a cut one, as a client on the wire would; no client library that
could retry or hide how the body ended."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Literal

_DOC_ID = re.compile(rb'"id":"([^"]+)"')


@dataclass
class Feed:
    """One response read through a raw socket, chunk by chunk, as a client sees it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    # How the body ended: "complete" (the terminating 0-chunk arrived) or "cut" (the
    # connection closed or was reset first). Unset while it is still flowing.
    ended: asyncio.Future[Literal["complete", "cut"]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    ended_at: float = 0.0  # time.time() when it ended
    _task: asyncio.Task[None] | None = None

    def _end(self, how: Literal["complete", "cut"]) -> None:
        self.ended_at = time.time()
        self.ended.set_result(how)

    def lines(self) -> int:
        return self.body.count(b"\n")

    def ids(self) -> set[str]:
        """Ids of every change row received so far (complete or partial body)."""
        return {m.decode() for m in _DOC_ID.findall(bytes(self.body))}

    async def wait_for(self, doc_id: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while doc_id not in self.ids():
                if self.ended.done():
                    raise AssertionError(f"feed ended ({self.ended.result()}) before {doc_id}")
                await asyncio.sleep(0.01)

    async def outcome(self, timeout: float = 5.0) -> Literal["complete", "cut"]:
        return await asyncio.wait_for(asyncio.shield(self.ended), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def open_feed(
    port: int,
    target: str,
    headers: dict[str, str],
    *,
    timeout: float = 10.0,
    wait_head: bool = True,
) -> Feed:
    """GET `target` on 127.0.0.1:`port`; returns once the response head arrived (or at once
    without `wait_head`), the body keeps being read in the background (Feed.close stops it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    feed = Feed()
    head_read = asyncio.get_running_loop().create_future()

    async def read() -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").strip().split("\r\n")
            feed.status = int(status_line.split()[1])
            for line in header_lines:
                name, _, value = line.partition(":")
                feed.headers[name.strip().lower()] = value.strip()
            head_read.set_result(None)
            if "chunked" not in feed.headers.get("transfer-encoding", ""):  # error answers
                length = feed.headers.get("content-length")
                if length is None:
                    feed.body += await reader.read()
                else:
                    feed.body += await reader.readexactly(int(length))
                feed._end("complete")
                return
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    feed._end("complete")
                    return
                feed.body += await reader.readexactly(size)
                await reader.readexactly(2)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not head_read.done():
                head_read.set_exception(exc)
            feed._end("cut")
        finally:
            writer.close()

    feed._task = asyncio.create_task(read())
    if wait_head:
        await asyncio.wait_for(asyncio.shield(head_read), timeout)
    else:
        head_read.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
    return feed
