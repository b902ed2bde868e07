"""A real CouchDB-compatible sync server (express-pouchdb, tests/peers/pouchdb) on 127.0.0.1, and
a real PouchDB client replicating from it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Self

import aiohttp

from .processes import stop_peer

PEER_DIR = Path(__file__).resolve().parents[1] / "peers" / "pouchdb"
SERVER_SCRIPT = PEER_DIR / "server.cjs"
CLIENT_SCRIPT = PEER_DIR / "client.cjs"


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
        log, self._log = self._log, None
        stop_peer(process, log)

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


class PouchDBClient:
    """A real PouchDB (node, tests/peers/pouchdb/client.cjs) following a remote database live,
    by pull replication into memory or by its changes feed; its events arrive as JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.events: list[dict[str, Any]] = []

    async def _next(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            raise PouchDBError(f"the PouchDB client exited; events so far: {self.events}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    async def expect(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next event named `event` (others are kept in `events`)."""
        async with asyncio.timeout(timeout):
            while True:
                got = await self._next()
                if got["event"] == event:
                    return got

    def received(self) -> set[str]:
        return {i for e in self.events if e["event"] == "change" for i in e["ids"]}

    async def wait_for(self, doc_id: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while doc_id not in self.received():
                await self._next()

    async def ids(self) -> set[str]:
        """Every document id in the client's local database now."""
        assert self._process.stdin is not None
        self._process.stdin.write(b'{"cmd":"ids"}\n')
        await self._process.stdin.drain()
        return set((await self.expect("ids"))["ids"])


@contextlib.asynccontextmanager
async def pouchdb_client(
    remote_url: str, cookie: str, mode: Literal["replicate", "changes"], since: str = "now"
) -> AsyncIterator[PouchDBClient]:
    node = shutil.which("node")
    if node is None or not (PEER_DIR / "node_modules" / "pouchdb-replication").is_dir():
        raise PouchDBError("node or tests/peers/pouchdb/node_modules is missing: run `make deps`")
    process = await asyncio.create_subprocess_exec(
        node,
        str(CLIENT_SCRIPT),
        remote_url,
        cookie,
        mode,
        since,
        cwd=PEER_DIR,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield PouchDBClient(process)
    finally:
        if process.stdin is not None:
            process.stdin.close()  # the client exits when stdin closes
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()
