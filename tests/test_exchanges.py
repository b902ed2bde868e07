"""Live exchanges end with their credential: bearer tokens that expire mid-stream, sessions that
reach their expiry, users deleted or disabled; and revocation cuts a stream before or after its
headers. The real sidecar app on real sockets, an aiohttp upstream that streams forever, and
tokens signed by the test's key server (conftest.KeyServer) and verified for real."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from conftest import KeyServer, admin_session
from support.redis_server import RedisServer, free_port
from support.sidecar import Sidecar, base_config, running_sidecar
from support.stream_reader import Feed, open_feed

from sidecar import exchanges, keys
from sidecar.exchanges import PROMOTE_AFTER
from sidecar.sessions.models import User, hash_session_id

CLIENT_ID = "exchanges-client"
COOKIE = "SyncGatewaySession"
TICK = 0.05  # the upstream writes one line this often
BOUND = 5.0  # how long any ending may take before the test gives up (the rule is 1 s)


@dataclass
class ForeverUpstream:
    """Streams a line every TICK until the sidecar goes away (`/db/_stream`), never answers
    (`/db/_silent`), reads an upload to its end (`/db/_upload`), echoes websockets, and answers
    anything else at once."""

    url: str = ""
    started: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # a stream's connection ended

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/_ws"):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
            self.gone.set()
            return ws
        if request.path.endswith("/_upload"):
            self.started.set()
            try:
                async for _ in request.content.iter_any():
                    pass
            finally:  # the sidecar closed the connection mid-body
                self.gone.set()
            return web.json_response({"ok": True})
        if request.path.endswith("/_silent"):
            self.started.set()
            try:
                await asyncio.Event().wait()
            finally:  # cancelled when the sidecar closes the connection (handler_cancellation)
                self.gone.set()
        if not request.path.endswith("/_stream"):
            return web.json_response({"ok": True})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        self.started.set()
        n = 0
        try:
            while True:
                await response.write(b'{"n":%d}\n' % n)
                n += 1
                await asyncio.sleep(TICK)
        except (ConnectionError, asyncio.CancelledError):
            self.gone.set()
            raise


@dataclass
class Env:
    sidecar: Sidecar
    upstream: ForeverUpstream
    ks: KeyServer
    http: aiohttp.ClientSession
    feeds: list[Feed] = field(default_factory=list)

    def token(self, sub: str, exp: float) -> str:
        return self.ks.token(CLIENT_ID, sub=sub, exp=exp)

    async def stream(self, path: str = "/db/_stream", **headers: str) -> Feed:
        silent = path.endswith("/_silent")
        feed = await open_feed(self.sidecar.port, path, headers, wait_head=not silent)
        self.feeds.append(feed)
        if silent:
            await asyncio.wait_for(self.upstream.started.wait(), BOUND)
        else:
            assert feed.status == 200, bytes(feed.body)
            await wait_lines(feed, 1)
        return feed

    async def admin(self, method: str, path: str, body: Any = None) -> int:
        async with self.http.request(method, self.sidecar.admin_url + path, json=body) as r:
            return r.status

    async def session(self, name: str, ttl: float) -> str:
        """A session whose lifetime is below what the admin API allows (a minute)."""
        store = self.sidecar.app[keys.STORE]
        user = User(db="db", name=name)
        await store.put_user(user)
        session_id, _ = await store.create_session(user, ttl=ttl, provider=None, now=time.time())
        return session_id


@pytest.fixture(params=[0, 1], ids=["leeway-0", "leeway-1"])
def leeway(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@contextlib.asynccontextmanager
async def start_env(
    key_server: KeyServer, *, skew: int = 0, session_store: str | None = None
) -> AsyncIterator[Env]:
    upstream = ForeverUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    upstream.url = f"http://127.0.0.1:{port}"
    provider = {"issuer": key_server.issuer, "client_id": CLIENT_ID, "register": True}
    config = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        clock_skew_seconds=skew,
        session_store=session_store,
        databases={"db": {"oidc": {"providers": {"ks": {**provider, "user_prefix": "ks"}}}}},
    )
    try:
        async with running_sidecar(config) as sidecar, aiohttp.ClientSession() as http:
            env = Env(sidecar, upstream, key_server, http)
            try:
                yield env
            finally:
                for feed in env.feeds:
                    await feed.close()
    finally:
        await runner.cleanup()


@pytest.fixture
async def env(key_server: KeyServer, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    skew = request.getfixturevalue("leeway") if "leeway" in request.fixturenames else 0
    async with start_env(key_server, skew=skew) as value:
        yield value


async def wait_lines(feed: Feed, count: int) -> None:
    target = feed.lines() + count
    async with asyncio.timeout(BOUND):
        while feed.lines() < target:
            assert not feed.ended.done(), "the stream ended"
            await asyncio.sleep(TICK / 2)


async def assert_cut(env: Env, stream: Feed) -> None:
    assert await stream.outcome(BOUND) == "cut"
    await asyncio.wait_for(env.upstream.gone.wait(), BOUND)  # the upstream request closed too
    async with asyncio.timeout(BOUND):  # and the exchange is no longer tracked
        while len(env.sidecar.app[keys.EXCHANGES]):
            await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- credential ends


async def test_bearer_stream_ends_when_its_token_expires(env: Env, leeway: int) -> None:
    exp = time.time() + 1.5
    stream = await env.stream(Authorization=f"Bearer {env.token('alice', exp)}")
    await assert_cut(env, stream)
    # Never before the token stops validating (exp + clock-skew leeway); timers may fire a
    # clock tick early, hence the small margin.
    assert stream.ended_at >= exp + leeway - 0.05
    assert stream.lines() > 1


async def test_bearer_websocket_is_closed_when_its_token_expires(env: Env) -> None:
    exp = time.time() + 1.5
    headers = {"Authorization": f"Bearer {env.token('alice', exp)}"}
    async with env.http.ws_connect(env.sidecar.url + "/db/_ws", headers=headers) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=BOUND)).data == "echo:hi"
        msg = await ws.receive(timeout=exp - time.time() + BOUND)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "credential expired")
        assert time.time() >= exp - 0.05
    await asyncio.wait_for(env.upstream.gone.wait(), BOUND)


async def test_session_stream_ends_when_its_session_expires(env: Env) -> None:
    started = time.time()  # the session expires a second after this, or later if extended
    session_id = await env.session(f"u{secrets.token_hex(4)}", ttl=1)
    stream = await env.stream(Cookie=f"{COOKIE}={session_id}")
    await assert_cut(env, stream)
    assert stream.ended_at >= started + 1 - 0.05


async def test_session_stream_lives_on_while_other_requests_extend_the_session(env: Env) -> None:
    """The expiry seen when the stream started is only a first guess: the store is asked
    again then, and an extended session keeps its stream."""
    session_id = await env.session(f"u{secrets.token_hex(4)}", ttl=2)
    cookie = {"Cookie": f"{COOKIE}={session_id}"}
    stream = await env.stream(**cookie)
    for _ in range(9):  # 2.25 s of activity, past the first expiry
        async with env.http.get(env.sidecar.url + "/db/doc", headers=cookie) as r:
            assert r.status == 200
        await asyncio.sleep(0.25)
    await wait_lines(stream, 2)  # still flowing
    await assert_cut(env, stream)  # and ended once the activity stops


# --------------------------------------------------------------------------- revocation


@pytest.mark.parametrize("age", ["young", "promoted"])  # before or after the first second
@pytest.mark.parametrize("how", ["delete-user", "disable-user"])
async def test_bearer_stream_of_a_deleted_or_disabled_user_ends(
    env: Env, age: str, how: str
) -> None:
    login = f"u{secrets.token_hex(4)}"
    stream = await env.stream(Authorization=f"Bearer {env.token(login, time.time() + 300)}")
    if age == "promoted":
        await asyncio.sleep(PROMOTE_AFTER * 1.5)
    if how == "delete-user":
        assert await env.admin("DELETE", f"/db/_user/ks_{login}") == 200
    else:
        assert await env.admin("PUT", f"/db/_user/ks_{login}", {"disabled": True}) == 200
    await assert_cut(env, stream)


async def test_a_role_change_keeps_the_stream(env: Env) -> None:
    name = f"u{secrets.token_hex(4)}"
    session_id = await admin_session(env.sidecar.admin_url, "db", name)
    stream = await env.stream(Cookie=f"{COOKIE}={session_id}")
    assert await env.admin("PUT", f"/db/_user/{name}", {"admin_roles": ["new"]}) == 200
    await asyncio.sleep(PROMOTE_AFTER * 1.2)  # the same after promotion
    assert await env.admin("PUT", f"/db/_user/{name}", {"admin_channels": ["x"]}) == 200
    await wait_lines(stream, 3)
    assert not stream.ended.done()


async def test_revocation_cuts_a_request_still_waiting_for_its_answer(env: Env) -> None:
    """A long-poll the upstream has not answered yet: no status line ever reaches the client,
    and the upstream request is cancelled."""
    name = f"u{secrets.token_hex(4)}"
    session_id = await admin_session(env.sidecar.admin_url, "db", name)
    stream = await env.stream("/db/_silent", Cookie=f"{COOKIE}={session_id}")
    assert await env.admin("DELETE", f"/db/_session/{session_id}") == 200
    await assert_cut(env, stream)
    assert stream.lines() == 0


async def test_short_requests_leave_nothing_tracked(env: Env) -> None:
    name = f"u{secrets.token_hex(4)}"
    cookie = {"Cookie": f"{COOKIE}={await admin_session(env.sidecar.admin_url, 'db', name)}"}
    exchanges = env.sidecar.app[keys.EXCHANGES]
    for _ in range(20):
        async with env.http.get(env.sidecar.url + "/db/doc", headers=cookie) as r:
            assert r.status == 200
    assert len(exchanges) == 0
    stream = await env.stream(**cookie)
    assert len(exchanges) == 1
    await asyncio.sleep(PROMOTE_AFTER * 1.5)
    assert len(exchanges) == 1  # promoted: indexed by user and session now
    assert await env.admin("DELETE", f"/db/_user/{name}/_session") == 200
    await assert_cut(env, stream)


async def test_a_revocation_missed_during_an_event_feed_gap_ends_the_stream_after_it(
    key_server: KeyServer, redis_server_session: RedisServer
) -> None:
    """While a replica's pub/sub subscription is down it hears no revocation; once it is back,
    every live exchange is checked against the store."""
    async with start_env(key_server, session_store=redis_server_session.url) as env:
        name = f"u{secrets.token_hex(4)}"
        session_id = await admin_session(env.sidecar.admin_url, "db", name)
        other = await admin_session(env.sidecar.admin_url, "db", f"u{secrets.token_hex(4)}")
        stream = await env.stream(Cookie=f"{COOKIE}={session_id}")
        bystander = await env.stream(Cookie=f"{COOKIE}={other}")
        redis = aioredis.Redis.from_url(redis_server_session.url)
        try:
            # A revocation that published nothing, as one lost in the gap would look here.
            assert await redis.delete(f"sidecar:s:{hash_session_id(session_id)}") == 1
            await wait_lines(stream, 2)  # unheard: it flows on
            await redis.client_kill_filter(_type="pubsub")  # the gap
        finally:
            await redis.aclose()
        assert await stream.outcome(BOUND) == "cut"
        await wait_lines(bystander, 2)  # still valid: still flowing


async def test_revocation_cuts_a_slow_upload(env: Env) -> None:
    """An upload still trickling in: the client's connection is cut (no status line) and the
    upstream sees its request body end short."""
    name = f"u{secrets.token_hex(4)}"
    session_id = await admin_session(env.sidecar.admin_url, "db", name)
    reader, writer = await asyncio.open_connection("127.0.0.1", env.sidecar.port)
    head = (
        f"POST /db/_upload HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {COOKIE}={session_id}\r\n"
        "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(head.encode())

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(TICK)

    sender = asyncio.create_task(trickle())
    try:
        await asyncio.wait_for(env.upstream.started.wait(), BOUND)
        assert await env.admin("DELETE", f"/db/_user/{name}/_session") == 200
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), BOUND) == b""  # cut, no answer
        await asyncio.wait_for(env.upstream.gone.wait(), BOUND)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()


async def test_streams_end_when_this_replica_cannot_hear_revocations(
    key_server: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: with its event feed down (Redis gone or cut off), a replica would not hear
    a revocation made elsewhere, so after FEED_LOSS_GRACE it ends its live streams (and every
    stream that grows old while the feed stays down); new requests get 503 meanwhile."""
    monkeypatch.setattr(exchanges, "FEED_LOSS_GRACE", 1.0)
    async with RedisServer() as redis, start_env(key_server, session_store=redis.url) as env:
        session_id = await admin_session(env.sidecar.admin_url, "db", f"u{secrets.token_hex(4)}")
        stream = await env.stream(Cookie=f"{COOKIE}={session_id}")
        await wait_lines(stream, 2)
        await redis.astop()  # the feed goes down; the stream itself needs no Redis
        assert await stream.outcome(BOUND + 5) == "cut"
        async with env.http.get(
            f"{env.sidecar.url}/db/doc", headers={"Cookie": f"{COOKIE}={session_id}"}
        ) as r:
            assert r.status == 503  # fail closed: never a pass without the store
