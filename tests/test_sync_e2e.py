"""End to end: real Yjs clients (npm y-websocket) sync a document THROUGH the sidecar in front of
a real Yjs sync server it did not write (npm @y/websocket-server); refusal and revocation too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from support.redis_server import RedisServer, free_port
from support.sidecar import Sidecar, base_config, running_sidecar
from yarl import URL

PEER_DIR = Path(__file__).resolve().parent / "peers" / "yjs"
SERVER_SCRIPT = PEER_DIR / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"
OBSERVER = PEER_DIR / "observe.mjs"  # preloaded into the server: reports upgrades, leaves it as is
CLIENT_SCRIPT = PEER_DIR / "client.mjs"
INSTALLED = (
    SERVER_SCRIPT,
    PEER_DIR / "node_modules" / "y-websocket",
    PEER_DIR / "node_modules" / "ws",
)
DB = "db"
ROOM = "room1"
COOKIE = "SyncGatewaySession"
STEP = 10.0  # the longest any single expected event may take (the suite is bounded by it)
REVOCATION_DEADLINE = 5.0  # "within a few seconds" of the admin DELETE

# client.mjs exit statuses
REFUSED = 3
CLOSED_FOR_GOOD = 4


def node_binary() -> str:
    node = shutil.which("node")
    if node is None or not all(path.exists() for path in INSTALLED):
        raise RuntimeError(
            "node or tests/peers/yjs/node_modules is missing: run `make test` "
            "(its `deps` step installs Node.js and runs `npm ci` in tests/peers/yjs)"
        )
    return node


def matches(event: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(event.get(key) == value for key, value in expected.items())


@dataclass
class NodeProcess:
    """A node script in its own process group that speaks JSON lines on stdin and stdout."""

    name: str
    process: asyncio.subprocess.Process
    stderr: IO[bytes]
    events: list[dict[str, Any]] = field(default_factory=list)  # every event read so far

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def expect(self, timeout: float = STEP, **expected: Any) -> dict[str, Any]:
        """Reads events until one has all of `expected`'s items; fails on timeout or exit."""
        assert self.process.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                line = await asyncio.wait_for(
                    self.process.stdout.readline(), max(deadline - loop.time(), 0)
                )
            except TimeoutError:
                raise AssertionError(
                    self.explain(f"no event like {expected} in {timeout}s")
                ) from None
            if not line:
                await self.process.wait()
                raise AssertionError(
                    self.explain(f"exited ({self.process.returncode}) before {expected}")
                )
            if not line.startswith(b"{"):
                continue  # the server's own banner
            event: dict[str, Any] = json.loads(line)
            self.events.append(event)
            if matches(event, expected):
                return event

    async def exit_status(self, timeout: float = STEP) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(self.explain(f"still running after {timeout}s")) from None

    def saw(self, **expected: Any) -> bool:
        return any(matches(event, expected) for event in self.events)

    def explain(self, problem: str) -> str:
        self.stderr.seek(0)
        err = self.stderr.read()[-3000:].decode(errors="replace")
        return f"{self.name}: {problem}\nevents: {self.events}\nstderr: {err}"

    async def stop(self) -> None:
        """Closes stdin (the scripts exit on EOF), then SIGTERM and SIGKILL to the whole group."""
        process = self.process
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if process.returncode is not None:
                break
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 3)
        if process.stdout is not None:
            await process.stdout.read()  # to EOF, so the pipe transport closes cleanly
        self.stderr.close()


@contextlib.asynccontextmanager
async def node_process(
    name: str, args: list[str], env: dict[str, str] | None = None
) -> AsyncIterator[NodeProcess]:
    stderr = tempfile.TemporaryFile()
    try:
        process = await asyncio.create_subprocess_exec(
            node_binary(),
            *args,
            cwd=PEER_DIR,
            env={**os.environ, **(env or {})},
            stdin=asyncio.subprocess.PIPE,  # held open: EOF tells the script to exit
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # its own process group, killed as a whole
        )
    except BaseException:
        stderr.close()
        raise
    peer = NodeProcess(name, process, stderr)
    try:
        yield peer
    finally:
        await peer.stop()


@dataclass
class SyncStack:
    """redis-server, the Yjs sync server on a free port, and the sidecar in front of it."""

    sidecar: Sidecar
    server: NodeProcess
    exits: contextlib.AsyncExitStack

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.sidecar.port}/{DB}"

    async def session(self, name: str) -> str:
        """A session for `name` through the admin API, as Sync Gateway's custom auth does."""
        async with aiohttp.ClientSession(self.sidecar.admin_url) as http:
            async with http.put(f"/{DB}/_user/{name}", json={}) as response:
                assert response.status in (200, 201), await response.text()
            async with http.post(f"/{DB}/_session", json={"name": name}) as response:
                assert response.status == 200, await response.text()
                session_id: str = (await response.json())["session_id"]
                return session_id

    async def id_token(self, username: str) -> str:
        """A genuine ID token from the built-in test provider (login form, then code exchange)."""
        issuer = f"{self.sidecar.url}/{DB}/_oidc_testing"
        redirect = f"{self.sidecar.url}/{DB}/_oidc_callback"
        login = {
            "client_id": "sync_gateway",
            "redirect_uri": redirect,
            "response_type": "code",
            "scope": "openid email",
            "username": username,
            "tokenttl": "3600",
            "authenticated": "Sign in",
        }
        client_auth = {"Authorization": aiohttp.encode_basic_auth("sync_gateway", "anything")}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{issuer}/authenticate", data=login, allow_redirects=False
            ) as response:
                assert response.status == 302, await response.text()
                code = URL(response.headers["Location"]).query["code"]
            form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect}
            async with http.post(f"{issuer}/token", data=form, headers=client_auth) as response:
                assert response.status == 200, await response.text()
                token: str = (await response.json())["id_token"]
                return token

    async def client(
        self, name: str, *, cookie: str | None = None, bearer: str | None = None
    ) -> NodeProcess:
        """A Yjs client on ROOM through the sidecar, stopped when the test ends."""
        args = [str(CLIENT_SCRIPT), "--url", self.ws_base, "--room", ROOM]
        if cookie is not None:
            args += ["--cookie", cookie]
        if bearer is not None:
            args += ["--bearer", bearer]
        return await self.exits.enter_async_context(node_process(name, args))

    async def cookie_client(self, name: str) -> NodeProcess:
        return await self.client(name, cookie=f"{COOKIE}={await self.session(name)}")

    async def revoke_sessions(self, name: str) -> dict[str, Any]:
        async with aiohttp.ClientSession(self.sidecar.admin_url) as http:
            async with http.delete(f"/{DB}/_user/{name}/_session") as response:
                assert response.status == 200, await response.text()
                body: dict[str, Any] = await response.json()
                return body


def sidecar_config(upstream: str, redis_url: str) -> dict[str, Any]:
    port = free_port()
    return base_config(
        port,
        free_port(),
        upstream=upstream,
        session_store=redis_url,
        unsupported={"oidc_test_provider": {"enabled": True}},
        databases={
            DB: {
                "oidc": {
                    "providers": {
                        "test": {
                            "issuer": f"http://127.0.0.1:{port}/{DB}/_oidc_testing",
                            "client_id": "sync_gateway",
                            "validation_key": "anything",
                            "register": True,
                            "user_prefix": "test",  # ID-token users are test_<sub>
                        }
                    }
                }
            }
        },
    )


@pytest.fixture
async def stack(fresh_redis: RedisServer) -> AsyncIterator[SyncStack]:
    node_binary()  # fail loudly, never skip, when the peer is not installed
    async with contextlib.AsyncExitStack() as exits:
        # PORT=0: the server takes a free port itself; the observer reports which.
        server = await exits.enter_async_context(
            node_process(
                "yjs-server",
                ["--import", OBSERVER.as_uri(), str(SERVER_SCRIPT)],
                {"HOST": "127.0.0.1", "PORT": "0"},
            )
        )
        port = (await server.expect(event="listening"))["port"]
        config = sidecar_config(f"http://127.0.0.1:{port}", fresh_redis.url)
        sidecar = await exits.enter_async_context(running_sidecar(config))
        await wait_ready(sidecar)
        yield SyncStack(sidecar, server, exits)


async def wait_ready(sidecar: Sidecar) -> None:
    """Until `/_ready` says so: the provider's first refresh can only succeed once the sidecar,
    its own issuer here, listens; bearer tokens get 503 before that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP
    async with aiohttp.ClientSession(sidecar.admin_url) as http:
        while True:
            async with http.get("/_ready") as response:
                if response.status == 200:
                    return
                if loop.time() > deadline:
                    raise AssertionError(f"sidecar not ready: {await response.text()}")
            await asyncio.sleep(0.1)


def header(event: dict[str, Any], name: str) -> str | None:
    value: str | None = event["headers"].get(name.lower())  # node lowercases header names
    return value


async def test_two_clients_sync_through_the_sidecar(stack: SyncStack) -> None:
    alice = await stack.cookie_client("alice")  # a session cookie from the admin API
    await alice.expect(event="synced")
    bob = await stack.client("bob", bearer=await stack.id_token("bob"))  # a bearer ID token
    await bob.expect(event="synced")

    await alice.send(op="insert", text="hello from alice")
    await bob.expect(event="text", origin="remote", text="hello from alice")
    await bob.send(op="insert", text=" / hello from bob")
    await alice.expect(event="text", origin="remote", text="hello from alice / hello from bob")

    # What reached the real server: the room path unchanged, who is calling, and no credentials.
    first = await stack.server.expect(event="upgrade")
    second = await stack.server.expect(event="upgrade")
    assert [first["url"], second["url"]] == [f"/{DB}/{ROOM}"] * 2
    assert header(first, "X-Forwarded-User") == "alice"
    assert header(second, "X-Forwarded-User") == "test_bob"
    for upgrade in (first, second):
        assert header(upgrade, "Cookie") is None  # security: the session stays at the sidecar
        assert header(upgrade, "Authorization") is None  # security: so does the ID token


@pytest.mark.parametrize(
    ("credentials", "status"),
    [
        pytest.param({}, 401, id="no-credentials"),
        pytest.param({"cookie": f"{COOKIE}=" + "0" * 40}, 401, id="unknown-session"),
        pytest.param({"cookie": "OtherCookie=abc"}, 401, id="other-cookie"),
        pytest.param({"bearer": "not-a-jwt"}, 401, id="garbage-bearer"),
        pytest.param(
            {"bearer": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9."}, 401, id="unsigned-bearer"
        ),
    ],
)
async def test_upgrade_without_valid_credentials_is_refused(
    stack: SyncStack, credentials: dict[str, str], status: int
) -> None:
    intruder = await stack.client("intruder", **credentials)
    assert await intruder.expect(event="refused") == {"event": "refused", "status": status}
    assert await intruder.exit_status() == REFUSED

    # The server numbers its upgrades: a legitimate client's being the first proves that the
    # refused one never reached it.
    alice = await stack.cookie_client("alice")
    await alice.expect(event="synced")
    upgrade = await stack.server.expect(event="upgrade")
    assert upgrade["id"] == 1
    assert header(upgrade, "X-Forwarded-User") == "alice"


async def test_revoking_sessions_closes_the_live_connection(stack: SyncStack) -> None:
    alice_session = await stack.session("alice")
    alice = await stack.client("alice", cookie=f"{COOKIE}={alice_session}")
    await alice.expect(event="synced")
    alice_upgrade = await stack.server.expect(event="upgrade")
    bob = await stack.cookie_client("bob")
    await bob.expect(event="synced")
    await alice.send(op="insert", text="before")
    await bob.expect(event="text", text="before")

    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await stack.revoke_sessions("alice") == {"ok": True, "revoked": 1}
    closed = await alice.expect(event="closed", timeout=REVOCATION_DEADLINE)
    assert loop.time() - started < REVOCATION_DEADLINE
    assert closed == {"event": "closed", "code": 1008, "reason": "session revoked"}
    assert await alice.exit_status() == CLOSED_FOR_GOOD
    # The sidecar also hangs up its own leg to the server for that connection.
    await stack.server.expect(event="upgrade-closed", id=alice_upgrade["id"])

    # The revoked cookie no longer opens anything; bob, another user, was left connected.
    again = await stack.client("alice-again", cookie=f"{COOKIE}={alice_session}")
    assert await again.expect(event="refused") == {"event": "refused", "status": 401}
    await bob.send(op="insert", text=", after")
    await bob.expect(event="text", origin="local", text="before, after")
    fresh = await stack.cookie_client("alice")  # a new login works
    await fresh.expect(event="text", origin="remote", text="before, after")
    assert not bob.saw(event="connection-close")
