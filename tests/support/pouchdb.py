"""A real CouchDB-compatible sync server (express-pouchdb, tests/peers/pouchdb) and a raw HTTP/1.1
reader of its `_changes` feeds that tells a complete chunked body from a cut one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Self

import aiohttp

PEER_DIR = Path(__file__).resolve().parents[1] / "peers" / "pouchdb"
SERVER_SCRIPT = PEER_DIR / "server.cjs"
_DOC_ID = re.compile(rb'"id":"([^"]+)"')


class PouchDBError(RuntimeError):
    pass


@dataclass
class PouchDBServer:
    """express-pouchdb over in-memory PouchDB on 127.0.0.1, as a node process."""

    start_timeout: float = 20.0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        node = shutil.which("node")
        if node is None or not (PEER_DIR / "node_modules" / "express-pouchdb").is_dir():
            # Fail loudly, never skip: the suite must not pass without its real peer.
            raise PouchDBError(
                "node or tests/peers/pouchdb/node_modules is missing: run `make deps`"
            )
        self._log = tempfile.TemporaryFile()
        # stdin stays a pipe: the peer exits when it closes, so a crashed test leaves no orphan.
        self._process = subprocess.Popen(
            [node, str(SERVER_SCRIPT)],
            cwd=PEER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        try:
            self.port = self._read_port(time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self, deadline: float) -> int:
        process = self._process
        assert process is not None and process.stdout is not None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PouchDBError(f"express-pouchdb exited with {process.returncode}")
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                line = process.stdout.readline()
                if line:
                    return int(json.loads(line)["port"])
        raise PouchDBError("express-pouchdb did not start in time")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                process.stdin.close()
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Straight to the server, not through the sidecar (the service's other writers)."""
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + path, json=body) as response,
        ):
            assert response.status < 300, await response.text()
            return await response.json(content_type=None)

    async def put_doc(self, db: str, doc_id: str, **fields: Any) -> None:
        await self.request("PUT", f"/{db}/{doc_id}", fields)


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
    _task: asyncio.Task[None] | None = None

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
    port: int, target: str, headers: dict[str, str], *, timeout: float = 10.0
) -> Feed:
    """GET `target` on 127.0.0.1:`port`; returns once the response head arrived, the body
    keeps being read in the background (Feed.close stops it)."""
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
            if "chunked" not in feed.headers.get("transfer-encoding", ""):
                feed.body += await reader.read()  # only the error answers; not the feeds
                feed.ended.set_result("complete")
                return
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    feed.ended.set_result("complete")
                    return
                feed.body += await reader.readexactly(size)
                await reader.readexactly(2)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not head_read.done():
                head_read.set_exception(exc)
            feed.ended.set_result("cut")
        finally:
            writer.close()

    feed._task = asyncio.create_task(read())
    await asyncio.wait_for(asyncio.shield(head_read), timeout)
    return feed
