"""The Sync Gateway session bridge: users and sessions made through Sync Gateway's admin API,
cached, shared by concurrent requests, renewed, revoked; and the headers Sync Gateway then sees.

Sync Gateway itself cannot be installed here (it is not on PyPI, npm or Debian), so these tests
talk to a FAKE Sync Gateway admin + public API written below with aiohttp, on 127.0.0.1: a fake
only where no real local stand-in exists. It follows Sync Gateway's documented and coded
behaviour where the bridge depends on it: a new user needs a password (no
`allow_empty_password`), POST /{db}/_user/ is create-only (409), setting the password of an
existing user ends their sessions, and the public API serves the user whose
`SyncGatewaySession` cookie came in, else 401 (GUEST is switched off, as the bridge needs).

Everything else is real: the bridge's HTTP calls, the sidecar app (end-to-end tests), sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from conftest import admin_session
from multidict import CIMultiDict
from support.redis_server import free_port
from support.sidecar import base_config, running_sidecar
from yarl import URL

import sidecar.keys
from sidecar.config import Secret, SyncGatewayBridge
from sidecar.errors import Forbidden, UpstreamError
from sidecar.identity import Identity
from sidecar.sessions.store import StoreEvent
from sidecar.sgbridge import (
    SYNC_GATEWAY_COOKIE,
    Entry,
    Plan,
    SessionBridge,
    apply,
    fingerprint,
    plan,
    session_id_from,
    strip_set_cookies,
    user_body,
)

SG_DB = "sgdb"  # Sync Gateway's name for the database
DB = "db"  # the sidecar's
TTL = 3600
ALICE = Identity(
    "alice", email="alice@example.com", roles=frozenset({"staff"}), channels=frozenset({"c1"})
)


# --------------------------------------------------------------------------- the fake


@dataclass
class FakeSyncGateway:
    """Sync Gateway's admin API (users, sessions) and public API (who is this?), in memory."""

    db: str = SG_DB
    credentials: tuple[str, str] | None = None  # Basic auth the admin API demands
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (user, expires)
    admin_calls: list[tuple[str, str, Any]] = field(default_factory=list)  # method, path, body
    public_calls: list[dict[str, Any]] = field(default_factory=list)
    fail_status: int | None = None  # every admin call answers this
    admin_delay: float = 0.0
    session_gate: asyncio.Event | None = None  # POST _session waits for it
    session_answer: bytes | None = None  # replaces the POST _session body
    extend_cookie: bool = False  # the public API re-sends the session cookie (as on extension)
    admin_url: str = ""
    public_url: str = ""
    _runners: list[web.AppRunner] = field(default_factory=list)

    def calls(self, method: str | None = None, suffix: str = "") -> list[tuple[str, str, Any]]:
        return [
            c
            for c in self.admin_calls
            if (method is None or c[0] == method) and c[1].endswith(suffix)
        ]

    # -- admin API ------------------------------------------------------------------------

    @web.middleware
    async def _admin_gate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.admin_calls.append((request.method, request.path, body))
        if self.admin_delay:
            await asyncio.sleep(self.admin_delay)
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if request.headers.get("Authorization") != expected:
                return web.json_response({"error": "Unauthorized"}, status=401)
        if self.fail_status is not None:
            return web.json_response({"error": "failing"}, status=self.fail_status)
        if request.match_info.get("db") != self.db:
            return web.json_response({"error": "no such database"}, status=404)
        return await handler(request)

    def _new_user(self, name: str, body: dict[str, Any]) -> web.Response | None:
        if not body.get("password"):  # Sync Gateway: "Empty passwords are not allowed"
            return web.json_response({"reason": "Empty passwords are not allowed"}, status=400)
        self.users[name] = {
            "password": body["password"],
            "email": body.get("email", ""),
            "admin_channels": body.get("admin_channels", []),
            "admin_roles": body.get("admin_roles", []),
        }
        return None

    async def post_user(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body["name"]
        if name in self.users:
            return web.json_response({"reason": "Already exists"}, status=409)
        refused = self._new_user(name, body)
        return refused or web.Response(status=201)

    async def put_user(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.json()
        if name not in self.users:
            refused = self._new_user(name, body)
            return refused or web.Response(status=201)
        user = self.users[name]
        for key in ("email", "admin_channels", "admin_roles"):
            if key in body:
                user[key] = body[key]
        if "password" in body:  # Sync Gateway ends the user's sessions on a password change
            user["password"] = body["password"]
            self._end_sessions(name)
        return web.Response(status=200)

    async def delete_user_sessions(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.users:
            return web.json_response({"reason": "missing"}, status=404)
        self._end_sessions(name)
        return web.json_response({})

    def _end_sessions(self, name: str) -> None:
        for sid in [s for s, (user, _) in self.sessions.items() if user == name]:
            del self.sessions[sid]

    async def post_session(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.session_gate is not None:
            await self.session_gate.wait()
        name = body.get("name")
        if name not in self.users:
            return web.json_response({"reason": "missing"}, status=404)
        if self.session_answer is not None:
            return web.Response(body=self.session_answer, content_type="application/json")
        sid = secrets.token_hex(20)
        self.sessions[sid] = (name, time.time() + int(body.get("ttl", 86400)))
        return web.json_response(
            {
                "session_id": sid,
                "expires": "2030-01-01T00:00:00Z",
                "cookie_name": SYNC_GATEWAY_COOKIE,
            }
        )

    # -- public API -----------------------------------------------------------------------

    async def public(self, request: web.Request) -> web.StreamResponse:
        record: dict[str, Any] = {
            "path": request.path,
            "cookie": request.headers.getall("Cookie", []),
            "authorization": request.headers.getall("Authorization", []),
            "user": None,
        }
        self.public_calls.append(record)
        sid = request.cookies.get(SYNC_GATEWAY_COOKIE)
        known = self.sessions.get(sid or "")
        if known is None or known[1] < time.time():
            return web.json_response(
                {"error": "Unauthorized", "reason": "Login required"}, status=401
            )
        name = known[0]
        record["user"] = name
        user = self.users[name]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_json({"user": name})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
            return ws
        response = web.json_response(
            {"user": name, "roles": user["admin_roles"], "channels": user["admin_channels"]}
        )
        if self.extend_cookie:
            response.set_cookie(SYNC_GATEWAY_COOKIE, sid or "", path=f"/{self.db}")
        return response

    # -- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        admin = web.Application(middlewares=[self._admin_gate])
        admin.router.add_post("/{db}/_user/", self.post_user)
        admin.router.add_put("/{db}/_user/{name}", self.put_user)
        admin.router.add_delete("/{db}/_user/{name}/_session", self.delete_user_sessions)
        admin.router.add_post("/{db}/_session", self.post_session)
        public = web.Application()
        public.router.add_route("*", "/{db}/{tail:.*}", self.public)
        for app, attr in ((admin, "admin_url"), (public, "public_url")):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self._runners.append(runner)
            setattr(self, attr, f"http://127.0.0.1:{port}")

    async def stop_admin(self) -> None:
        await self._runners[0].cleanup()

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


@pytest.fixture
async def sg() -> AsyncIterator[FakeSyncGateway]:
    fake = FakeSyncGateway()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@contextlib.asynccontextmanager
async def bridge_for(
    sg: FakeSyncGateway,
    http: aiohttp.ClientSession,
    *,
    clock: Callable[[], float] = time.time,
    timeout: float = 5.0,
    max_entries: int = 100_000,
    **config: Any,
) -> AsyncIterator[SessionBridge]:
    conf = SyncGatewayBridge(admin_url=sg.admin_url, database=SG_DB, **config)
    bridge = SessionBridge(conf, DB, http, clock=clock, timeout=timeout, max_entries=max_entries)
    try:
        yield bridge
    finally:
        await bridge.close()


async def as_sync_gateway_sees(
    sg: FakeSyncGateway, http: aiohttp.ClientSession, sg_session: str, **incoming: str
) -> tuple[int, Any]:
    """A request to the fake's public API with the headers the bridge prepares."""
    headers: CIMultiDict[str] = CIMultiDict(incoming)
    apply(headers, "SidecarSession", sg_session)
    async with http.get(f"{sg.public_url}/{SG_DB}/doc", headers=headers) as response:
        return response.status, await response.json()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- pure decisions

FP = fingerprint(ALICE)
OTHER_FP = fingerprint(Identity("alice", roles=frozenset({"admin"})))
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("entry", "fp", "now", "sync_user", "expected"),
    [
        (None, FP, NOW, True, Plan(put_user=True, new_session=True)),
        (None, FP, NOW, False, Plan(put_user=False, new_session=True)),
        (Entry("s", NOW + TTL, FP), FP, NOW, True, Plan(False, False)),
        # the last 10 % of the TTL: renewed, user re-synced
        (Entry("s", NOW + 361, FP), FP, NOW, True, Plan(False, False)),
        (Entry("s", NOW + 360, FP), FP, NOW, True, Plan(True, True)),
        (Entry("s", NOW + 360, FP), FP, NOW, False, Plan(False, True)),
        (Entry("s", NOW - 1, FP), FP, NOW, True, Plan(True, True)),
        # a changed identity: the user only; the session stays good
        (Entry("s", NOW + TTL, FP), OTHER_FP, NOW, True, Plan(True, False)),
        (Entry("s", NOW + TTL, FP), OTHER_FP, NOW, False, Plan(False, False)),
        (Entry("s", NOW + 100, FP), OTHER_FP, NOW, True, Plan(True, True)),
    ],
)
def test_plan(entry: Entry | None, fp: bytes, now: float, sync_user: bool, expected: Plan) -> None:
    assert plan(entry, fp, now=now, ttl=TTL, sync_user=sync_user) == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (
            ALICE,
            Identity(
                "alice",
                email="alice@example.com",
                roles=frozenset({"staff"}),
                channels=frozenset({"c1"}),
                via="bearer",
            ),
            True,
        ),
        (
            ALICE,
            Identity(
                "bob",
                email="alice@example.com",
                roles=frozenset({"staff"}),
                channels=frozenset({"c1"}),
            ),
            True,
        ),
        (
            ALICE,
            Identity(
                "alice",
                email="other@example.com",
                roles=frozenset({"staff"}),
                channels=frozenset({"c1"}),
            ),
            False,
        ),
        (
            ALICE,
            Identity(
                "alice",
                email="alice@example.com",
                roles=frozenset({"staff", "x"}),
                channels=frozenset({"c1"}),
            ),
            False,
        ),
        (
            ALICE,
            Identity(
                "alice", email="alice@example.com", roles=frozenset({"staff"}), channels=frozenset()
            ),
            False,
        ),
        # a role and a channel of the same name are not interchangeable
        (Identity("a", roles=frozenset({"x"})), Identity("a", channels=frozenset({"x"})), False),
        (Identity("a", email=None), Identity("a", email=""), False),
        (
            Identity("a", roles=frozenset({"\ud800"})),
            Identity("a", roles=frozenset({"\ud800"})),
            True,
        ),
    ],
)
def test_fingerprint_covers_email_roles_channels(a: Identity, b: Identity, same: bool) -> None:
    assert (fingerprint(a) == fingerprint(b)) is same


@pytest.mark.parametrize(
    ("email", "sent"),
    [
        ("alice@example.com", "alice@example.com"),
        ("a.b+tag@mail.example.co", "a.b+tag@mail.example.co"),
        (None, ""),
        ("", ""),
        ("not-an-address", ""),
        ("ünï@example.com", ""),  # Sync Gateway's rule is ASCII; it would refuse the user
        ("a@b", ""),
        ("a b@example.com", ""),
        ("alice@example.com\r\nX: y", ""),
    ],
)
def test_user_body_email(email: str | None, sent: str) -> None:
    body = user_body(
        Identity("a", email=email, roles=frozenset({"r2", "r1"}), channels=frozenset({"c"}))
    )
    assert body == {"email": sent, "admin_channels": ["c"], "admin_roles": ["r1", "r2"]}
    assert "password" not in body


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b'{"session_id": "0123456789abcdef0123456789abcdef01234567"}', True),
        (b'{"session_id": "abc", "expires": "2030-01-01T00:00:00Z"}', True),
        (b'{"session_id": ""}', False),
        (b'{"session_id": "a;b"}', False),
        (b'{"session_id": "a b"}', False),
        (b'{"session_id": "a\\r\\nSet-Cookie: x=y"}', False),
        (b'{"session_id": "a,b"}', False),
        (b'{"session_id": 42}', False),
        (b'{"session_id": "' + b"a" * 257 + b'"}', False),
        (b"[]", False),
        (b"{}", False),
        (b"not json", False),
        (b"", False),
    ],
)
def test_session_id_from(raw: bytes, ok: bool) -> None:
    if ok:
        assert session_id_from(raw) == json.loads(raw)["session_id"]
    else:
        with pytest.raises(UpstreamError) as exc:
            session_id_from(raw)
        assert exc.value.status == 502


@pytest.mark.parametrize(
    ("incoming", "cookie"),
    [
        ([], "SyncGatewaySession=SG"),
        ([("Cookie", "theme=dark")], "theme=dark; SyncGatewaySession=SG"),
        ([("Cookie", "a=1; b=2")], "a=1; b=2; SyncGatewaySession=SG"),
        # security: a client-chosen Sync Gateway session never survives, in any position
        ([("Cookie", "SyncGatewaySession=stolen")], "SyncGatewaySession=SG"),
        ([("Cookie", "a=1; SyncGatewaySession=stolen; b=2")], "a=1; b=2; SyncGatewaySession=SG"),
        ([("Cookie", " SyncGatewaySession = stolen ;a=1")], "a=1; SyncGatewaySession=SG"),
        (
            [("Cookie", "a=1"), ("Cookie", "SyncGatewaySession=x; b=2")],
            "a=1; b=2; SyncGatewaySession=SG",
        ),
        # the sidecar's own session cookie is not for Sync Gateway either
        ([("Cookie", "SidecarSession=mine; a=1")], "a=1; SyncGatewaySession=SG"),
        # names are case-sensitive (RFC 6265); look-alikes are other cookies
        ([("Cookie", "syncgatewaysession=x")], "syncgatewaysession=x; SyncGatewaySession=SG"),
        ([("Cookie", ";;")], "SyncGatewaySession=SG"),
    ],
)
def test_apply_cookies(incoming: list[tuple[str, str]], cookie: str) -> None:
    headers: CIMultiDict[str] = CIMultiDict(incoming)
    headers.add("Accept", "application/json")
    apply(headers, "SidecarSession", "SG")
    assert headers.getall("Cookie") == [cookie]
    assert headers.getall("Accept") == ["application/json"]


@pytest.mark.parametrize(
    "authorization",
    [["Bearer eyJ.x.y"], ["Basic YWxpY2U6"], ["Bearer a", "Basic b"]],
)
def test_apply_removes_authorization(authorization: list[str]) -> None:
    headers: CIMultiDict[str] = CIMultiDict(("Authorization", v) for v in authorization)
    headers.add("authorization", "lower-case too")
    SessionBridge.apply(headers, "SyncGatewaySession", "SG")
    assert "Authorization" not in headers
    assert headers["Cookie"] == "SyncGatewaySession=SG"


@pytest.mark.parametrize(
    ("set_cookies", "kept", "removed"),
    [
        ([], [], 0),
        (["a=1; Path=/"], ["a=1; Path=/"], 0),
        (["SyncGatewaySession=abc; Path=/db; Expires=x"], [], 1),
        (["a=1", "SyncGatewaySession=abc", "b=2"], ["a=1", "b=2"], 1),
        (["SyncGatewaySession=a", "SyncGatewaySession=b"], [], 2),
        (["syncgatewaysession=a"], ["syncgatewaysession=a"], 0),
    ],
)
def test_strip_set_cookies(set_cookies: list[str], kept: list[str], removed: int) -> None:
    headers: CIMultiDict[str] = CIMultiDict(("Set-Cookie", v) for v in set_cookies)
    headers.add("Content-Type", "application/json")
    assert strip_set_cookies(headers) == removed
    assert headers.getall("Set-Cookie", []) == kept
    assert headers["Content-Type"] == "application/json"


# --------------------------------------------------------------------------- the bridge


async def test_first_request_creates_user_and_session(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    async with bridge_for(sg, http) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
    assert [(m, p) for m, p, _ in sg.admin_calls] == [
        ("POST", f"/{SG_DB}/_user/"),
        ("POST", f"/{SG_DB}/_session"),
    ]
    created = sg.admin_calls[0][2]
    assert created["name"] == "alice"
    assert created["email"] == "alice@example.com"
    assert created["admin_roles"] == ["staff"] and created["admin_channels"] == ["c1"]
    # a new user gets a random password nobody keeps (32 bytes, base64url)
    assert len(created["password"]) >= 43
    assert sg.admin_calls[1][2] == {"name": "alice", "ttl": TTL}
    assert sg.sessions[sid][0] == "alice"
    assert await as_sync_gateway_sees(sg, http, sid) == (
        200,
        {"user": "alice", "roles": ["staff"], "channels": ["c1"]},
    )


async def test_passwords_are_random_per_user(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    async with bridge_for(sg, http) as bridge:
        await bridge.upstream_cookie(Identity("u1"))
        await bridge.upstream_cookie(Identity("u2"))
        assert sg.users["u1"]["password"] != sg.users["u2"]["password"]
        assert not any(
            sg.users["u1"]["password"] in repr(v) for v in vars(bridge).values()
        )  # never kept


async def test_second_request_reuses_the_session(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    async with bridge_for(sg, http) as bridge:
        first = await bridge.upstream_cookie(ALICE)
        calls = len(sg.admin_calls)
        for _ in range(5):
            assert await bridge.upstream_cookie(ALICE) == first
        assert len(sg.admin_calls) == calls


async def test_existing_user_is_updated_without_password(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    """A password on an update would end every session of the user (other replicas' too)."""
    sg.users["alice"] = {
        "password": "set-by-ops",
        "email": "",
        "admin_channels": [],
        "admin_roles": [],
    }
    sg.sessions["other-replica"] = ("alice", time.time() + 600)
    async with bridge_for(sg, http) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
    assert [(m, p) for m, p, _ in sg.admin_calls] == [
        ("POST", f"/{SG_DB}/_user/"),
        ("PUT", f"/{SG_DB}/_user/alice"),
        ("POST", f"/{SG_DB}/_session"),
    ]
    assert sg.admin_calls[1][2] == {
        "email": "alice@example.com",
        "admin_channels": ["c1"],
        "admin_roles": ["staff"],
    }
    assert sg.users["alice"]["password"] == "set-by-ops"
    assert "other-replica" in sg.sessions and sid in sg.sessions


async def test_roles_change_puts_the_user_again_and_keeps_the_session(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    async with bridge_for(sg, http) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
        sg.admin_calls.clear()
        promoted = Identity(
            "alice",
            email="alice@example.com",
            roles=frozenset({"staff", "admin"}),
            channels=frozenset({"c1", "c2"}),
        )
        assert await bridge.upstream_cookie(promoted) == sid
        assert [(m, p) for m, p, _ in sg.admin_calls] == [
            ("POST", f"/{SG_DB}/_user/"),
            ("PUT", f"/{SG_DB}/_user/alice"),
        ]
        assert sg.users["alice"]["admin_roles"] == ["admin", "staff"]
        status, seen = await as_sync_gateway_sees(sg, http, sid)
        assert (status, seen["channels"]) == (200, ["c1", "c2"])
        sg.admin_calls.clear()
        assert await bridge.upstream_cookie(promoted) == sid
        assert sg.admin_calls == []


@pytest.mark.parametrize(
    ("elapsed", "renewed"),
    [(0, False), (TTL * 0.5, False), (TTL * 0.9 - 1, False), (TTL * 0.9, True), (TTL + 5, True)],
)
async def test_near_expiry_gets_a_new_session(
    sg: FakeSyncGateway, http: aiohttp.ClientSession, elapsed: float, renewed: bool
) -> None:
    clock = Clock()
    async with bridge_for(sg, http, clock=clock) as bridge:
        first = await bridge.upstream_cookie(ALICE)
        sg.admin_calls.clear()
        clock.now += elapsed
        second = await bridge.upstream_cookie(ALICE)
        if renewed:
            assert second != first
            assert [(m, p) for m, p, _ in sg.admin_calls] == [
                ("POST", f"/{SG_DB}/_user/"),
                ("PUT", f"/{SG_DB}/_user/alice"),
                ("POST", f"/{SG_DB}/_session"),
            ]
            sg.admin_calls.clear()
            assert await bridge.upstream_cookie(ALICE) == second
        else:
            assert second == first
        assert sg.admin_calls == []


async def test_concurrent_first_requests_share_one_exchange(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    sg.session_gate = asyncio.Event()
    async with bridge_for(sg, http) as bridge:
        waiting = [asyncio.ensure_future(bridge.upstream_cookie(ALICE)) for _ in range(20)]
        await until(lambda: len(sg.calls("POST", "/_session")) == 1)
        await asyncio.sleep(0.05)  # every caller is parked on the one exchange
        sg.session_gate.set()
        ids = await asyncio.gather(*waiting)
    assert len(set(ids)) == 1
    assert len(sg.calls("POST", "/_session")) == 1
    assert len(sg.calls("POST", "/_user/")) == 1
    assert len(sg.sessions) == 1


async def test_a_caller_going_away_does_not_cancel_the_others(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    sg.session_gate = asyncio.Event()
    async with bridge_for(sg, http) as bridge:
        first = asyncio.ensure_future(bridge.upstream_cookie(ALICE))
        second = asyncio.ensure_future(bridge.upstream_cookie(ALICE))
        await until(lambda: len(sg.calls("POST", "/_session")) == 1)
        first.cancel()
        sg.session_gate.set()
        sid = await second
        assert first.cancelled()
        assert await bridge.upstream_cookie(ALICE) == sid  # cached by the shared exchange
    assert len(sg.calls("POST", "/_session")) == 1


async def test_different_users_do_not_share(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    async with bridge_for(sg, http) as bridge:
        a, b = await asyncio.gather(
            bridge.upstream_cookie(Identity("alice")), bridge.upstream_cookie(Identity("bob"))
        )
    assert a != b
    assert (sg.sessions[a][0], sg.sessions[b][0]) == ("alice", "bob")


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("alice smith@example.com", "/sgdb/_user/alice%20smith%40example.com"),
        ("ünï", "/sgdb/_user/%C3%BCn%C3%AF"),
        ("a%2Fb", "/sgdb/_user/a%252Fb"),
        ("op_123", "/sgdb/_user/op_123"),
    ],
)
async def test_user_names_are_quoted(
    sg: FakeSyncGateway, http: aiohttp.ClientSession, name: str, path: str
) -> None:
    sg.users[name] = {"password": "x", "email": "", "admin_channels": [], "admin_roles": []}
    async with bridge_for(sg, http) as bridge:
        sid = await bridge.upstream_cookie(Identity(name))
        bridge.on_store_event(StoreEvent("user", DB, name))
        await until(lambda: sid not in sg.sessions)
    assert sg.sessions == {}
    assert sg.calls("PUT")[0][1] == URL(path, encoded=True).path  # decoded as the server sees it
    assert sg.calls("POST", "/_user/")[0][2]["name"] == name


async def test_guest_is_refused(sg: FakeSyncGateway, http: aiohttp.ClientSession) -> None:
    async with bridge_for(sg, http) as bridge:
        with pytest.raises(Forbidden) as exc:
            await bridge.upstream_cookie(Identity("GUEST"))
    assert exc.value.status == 403
    assert sg.admin_calls == []


async def test_the_http_session_must_have_no_cookie_jar(sg: FakeSyncGateway) -> None:
    async with aiohttp.ClientSession() as with_jar:
        with pytest.raises(ValueError, match="cookie jar"):
            SessionBridge(SyncGatewayBridge(admin_url=sg.admin_url), DB, with_jar)


async def test_database_defaults_to_the_sidecars(http: aiohttp.ClientSession) -> None:
    fake = FakeSyncGateway(db=DB)
    await fake.start()
    try:
        bridge = SessionBridge(SyncGatewayBridge(admin_url=fake.admin_url + "/"), DB, http)
        await bridge.upstream_cookie(ALICE)
        await bridge.close()
        assert fake.calls("POST", "/_session")[0][1] == f"/{DB}/_session"
    finally:
        await fake.stop()


# ---- failures: fail closed


async def _refuse(sg: FakeSyncGateway, case: str) -> None:
    if case == "down":
        await sg.stop_admin()
    elif case == "timeout":
        sg.admin_delay = 1.0
    elif case == "garbage":
        sg.session_answer = b"<html>oops</html>"
    elif case == "header-injection":
        sg.session_answer = b'{"session_id": "abc; Path=/; x=\\r\\n"}'
    elif case == "credentials":
        sg.credentials = ("sync", "right")
    else:
        sg.fail_status = int(case)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("down", "Sync Gateway admin API unreachable"),
        ("timeout", "Sync Gateway admin API timed out"),
        ("500", "Sync Gateway refused to update the user (status 500)"),
        ("503", "Sync Gateway refused to update the user (status 503)"),
        ("400", "Sync Gateway refused to update the user (status 400)"),
        ("credentials", "Sync Gateway's admin API refused the sidecar's credentials (status 401)"),
        ("403", "Sync Gateway's admin API refused the sidecar's credentials (status 403)"),
        ("garbage", "Sync Gateway answered an unusable session"),
        ("header-injection", "Sync Gateway answered an unusable session"),
    ],
)
async def test_admin_api_failure_fails_closed(
    sg: FakeSyncGateway, http: aiohttp.ClientSession, case: str, reason: str
) -> None:
    await _refuse(sg, case)
    async with bridge_for(sg, http, timeout=0.3) as bridge:
        with pytest.raises(UpstreamError) as exc:
            await bridge.upstream_cookie(ALICE)
        assert (exc.value.status, exc.value.reason) == (502, reason)
        assert len(bridge) == 0
    assert sg.public_calls == []


async def test_recovers_after_a_failure(sg: FakeSyncGateway, http: aiohttp.ClientSession) -> None:
    sg.fail_status = 503
    async with bridge_for(sg, http) as bridge:
        with pytest.raises(UpstreamError):
            await bridge.upstream_cookie(ALICE)
        sg.fail_status = None
        sid = await bridge.upstream_cookie(ALICE)
    assert sg.sessions[sid][0] == "alice"


async def test_a_failure_reaches_every_waiting_caller(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    sg.session_gate = asyncio.Event()
    async with bridge_for(sg, http) as bridge:
        waiting = [asyncio.ensure_future(bridge.upstream_cookie(ALICE)) for _ in range(5)]
        await until(lambda: len(sg.calls("POST", "/_session")) == 1)
        sg.session_answer = b"{}"
        sg.session_gate.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) for r in results)
    assert len(sg.calls("POST", "/_session")) == 1


async def test_basic_auth_when_configured(sg: FakeSyncGateway, http: aiohttp.ClientSession) -> None:
    sg.credentials = ("sync", "s3cret")
    async with bridge_for(sg, http, username="sync", password=Secret("s3cret")) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
    assert sg.sessions[sid][0] == "alice"


async def test_without_sync_user_only_sessions_are_made(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    sg.users["alice"] = {"password": "x", "email": "", "admin_channels": ["own"], "admin_roles": []}
    async with bridge_for(sg, http, sync_user=False) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
        assert await bridge.upstream_cookie(Identity("alice", roles=frozenset({"new"}))) == sid
        with pytest.raises(UpstreamError) as exc:
            await bridge.upstream_cookie(Identity("stranger"))
    assert exc.value.reason == "the user does not exist in Sync Gateway"
    assert [(m, p) for m, p, _ in sg.admin_calls] == [
        ("POST", f"/{SG_DB}/_session"),
        ("POST", f"/{SG_DB}/_session"),
    ]
    assert sg.users["alice"]["admin_channels"] == ["own"]


# ---- revocation and change events


async def test_revocation_drops_the_cache_and_ends_sync_gateway_sessions(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    async with bridge_for(sg, http) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
        sg.sessions["made-elsewhere"] = ("alice", time.time() + 600)  # another replica's
        bridge.on_store_event(StoreEvent("user", DB, "alice", revoked=True))
        assert len(bridge) == 0
        await until(lambda: len(sg.calls("DELETE")) == 1)
        assert sg.calls("DELETE")[0][1] == f"/{SG_DB}/_user/alice/_session"
        assert sg.sessions == {}
        assert (await as_sync_gateway_sees(sg, http, sid))[0] == 401
        fresh = await bridge.upstream_cookie(ALICE)  # signed in again: a new session
    assert fresh != sid and sg.sessions[fresh][0] == "alice"


async def test_revocation_of_an_unknown_user_is_quiet(
    sg: FakeSyncGateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with bridge_for(sg, http) as bridge:
        bridge.on_store_event(StoreEvent("user", DB, "nobody"))
        await until(lambda: len(sg.calls("DELETE")) == 1)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_failed_revocation_is_logged(
    sg: FakeSyncGateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    sg.fail_status = 500
    async with bridge_for(sg, http) as bridge:
        bridge.on_store_event(StoreEvent("user", DB, "alice"))
        await until(lambda: len(sg.calls("DELETE")) == 1)
        await until(lambda: any(r.levelname == "ERROR" for r in caplog.records))


@pytest.mark.parametrize(
    ("event", "dropped", "deleted"),
    [
        (StoreEvent("user", DB, "alice", revoked=False), True, False),  # roles changed
        (StoreEvent("user", DB, "alice", revoked=True), True, True),
        (StoreEvent("user", "other-db", "alice"), False, False),
        (StoreEvent("user", DB, "bob"), False, True),
        (StoreEvent("session", DB, "alice", key="k" * 64), False, False),  # one logout
        (StoreEvent("user", DB, None), False, False),
    ],
)
async def test_which_events_matter(
    sg: FakeSyncGateway,
    http: aiohttp.ClientSession,
    event: StoreEvent,
    dropped: bool,
    deleted: bool,
) -> None:
    async with bridge_for(sg, http) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
        bridge.on_store_event(event)
        assert (len(bridge) == 0) is dropped
        if deleted:
            await until(lambda: len(sg.calls("DELETE")) == 1)
        await asyncio.sleep(0.05)
        assert bool(sg.calls("DELETE")) is deleted
        assert (sid in sg.sessions) is not (deleted and event.name == "alice")


async def test_an_exchange_overtaken_by_revocation_is_not_cached(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    sg.session_gate = asyncio.Event()
    async with bridge_for(sg, http) as bridge:
        pending = asyncio.ensure_future(bridge.upstream_cookie(ALICE))
        await until(lambda: len(sg.calls("POST", "/_session")) == 1)
        bridge.on_store_event(StoreEvent("user", DB, "alice", revoked=True))
        await until(lambda: len(sg.calls("DELETE")) == 1)  # ran before the session existed
        sg.session_gate.set()
        sid = await pending  # the request already authenticated still gets its answer
        assert len(bridge) == 0
        # ... and the deletion runs again, so the session it raced does not live on
        await until(lambda: len(sg.calls("DELETE")) == 2)
        assert sid not in sg.sessions


async def test_a_newer_identity_waits_for_an_older_exchange(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    sg.session_gate = asyncio.Event()
    promoted = Identity("alice", roles=frozenset({"admin"}))
    async with bridge_for(sg, http) as bridge:
        old = asyncio.ensure_future(bridge.upstream_cookie(ALICE))
        await until(lambda: len(sg.calls("POST", "/_session")) == 1)
        new = asyncio.ensure_future(bridge.upstream_cookie(promoted))
        await asyncio.sleep(0.05)
        assert len(sg.calls("PUT")) == 0  # no PUT overtakes the first exchange's
        sg.session_gate.set()
        assert await old == await new
    assert sg.users["alice"]["admin_roles"] == ["admin"]


async def test_forget_drops_only_that_session(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    async with bridge_for(sg, http) as bridge:
        sid = await bridge.upstream_cookie(ALICE)
        bridge.forget("alice", "some-other-id")
        assert len(bridge) == 1
        bridge.forget("alice", sid)
        assert len(bridge) == 0
        assert await bridge.upstream_cookie(ALICE) != sid


async def test_the_cache_is_bounded(sg: FakeSyncGateway, http: aiohttp.ClientSession) -> None:
    async with bridge_for(sg, http, max_entries=2) as bridge:
        await bridge.upstream_cookie(Identity("u1"))
        await bridge.upstream_cookie(Identity("u2"))
        await bridge.upstream_cookie(Identity("u1"))  # u1 used last: u2 is the oldest
        await bridge.upstream_cookie(Identity("u3"))
        assert len(bridge) == 2
        sg.admin_calls.clear()
        await bridge.upstream_cookie(Identity("u1"))
        await bridge.upstream_cookie(Identity("u3"))
        assert sg.admin_calls == []
        await bridge.upstream_cookie(Identity("u2"))
        assert len(sg.calls("POST", "/_session")) == 1


async def test_close_cancels_exchanges_in_flight(
    sg: FakeSyncGateway, http: aiohttp.ClientSession
) -> None:
    sg.session_gate = asyncio.Event()
    bridge = SessionBridge(SyncGatewayBridge(admin_url=sg.admin_url, database=SG_DB), DB, http)
    pending = asyncio.ensure_future(bridge.upstream_cookie(ALICE))
    await until(lambda: len(sg.calls("POST", "/_session")) == 1)
    await bridge.close()
    with pytest.raises(asyncio.CancelledError):
        await pending
    bridge.on_store_event(StoreEvent("user", DB, "alice"))  # after close: nothing spawned
    sg.session_gate.set()


# --------------------------------------------------------------------------- end to end

HOOKED = getattr(sidecar.keys, "SG_BRIDGES", None) is not None
needs_hook = pytest.mark.skipif(
    not HOOKED, reason="sidecar.app does not build the Sync Gateway bridge yet (keys.SG_BRIDGES)"
)


@dataclass
class Stack:
    url: str
    admin_url: str
    sg: FakeSyncGateway

    async def login(self, name: str = "alice", **user: Any) -> str:
        return await admin_session(self.admin_url, DB, name, **user)

    async def get(self, path: str, **headers: str) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
            async with client.get(self.url + path, headers=headers) as response:
                return response.status, await response.json(), response


@contextlib.asynccontextmanager
async def stack_with(sg: FakeSyncGateway, **settings: Any) -> AsyncIterator[Stack]:
    config = base_config(
        free_port(),
        free_port(),
        upstream=sg.public_url,
        databases={DB: {"sync_gateway": {"admin_url": sg.admin_url}}},
        **settings,
    )
    async with running_sidecar(config) as running:
        yield Stack(running.url, running.admin_url, sg)


@pytest.fixture
async def e2e() -> AsyncIterator[Stack]:
    fake = FakeSyncGateway(db=DB)  # Sync Gateway serves the path the sidecar forwards
    await fake.start()
    try:
        async with stack_with(fake) as stack:
            yield stack
    finally:
        await fake.stop()


@needs_hook
async def test_e2e_sync_gateway_sees_the_user(e2e: Stack) -> None:
    sid = await e2e.login(admin_roles=["staff"], admin_channels=["c1"])
    cookie = f"theme=dark; SyncGatewaySession={sid}"
    status, body, _ = await e2e.get(f"/{DB}/doc", Cookie=cookie)
    assert (status, body) == (200, {"user": "alice", "roles": ["staff"], "channels": ["c1"]})
    seen = e2e.sg.public_calls[-1]
    (sg_session,) = [s for s, (user, _) in e2e.sg.sessions.items() if user == "alice"]
    assert seen["cookie"] == [f"theme=dark; SyncGatewaySession={sg_session}"]
    assert seen["authorization"] == []
    calls = len(e2e.sg.admin_calls)
    assert (await e2e.get(f"/{DB}/other", Cookie=cookie))[0] == 200
    assert len(e2e.sg.admin_calls) == calls  # the second request reuses the session


@needs_hook
async def test_e2e_sync_gateway_cookie_never_reaches_the_client(e2e: Stack) -> None:
    e2e.sg.extend_cookie = True
    sid = await e2e.login()
    status, _, response = await e2e.get(f"/{DB}/doc", Cookie=f"SyncGatewaySession={sid}")
    assert status == 200
    assert not [c for c in response.headers.getall("Set-Cookie", []) if sid not in c]


@needs_hook
async def test_e2e_roles_change_and_revocation(e2e: Stack) -> None:
    sid = await e2e.login(admin_roles=["staff"])
    cookie = f"SyncGatewaySession={sid}"
    assert (await e2e.get(f"/{DB}/doc", Cookie=cookie))[1]["roles"] == ["staff"]
    async with aiohttp.ClientSession() as client:
        async with client.put(
            f"{e2e.admin_url}/{DB}/_user/alice", json={"admin_roles": ["staff", "admin"]}
        ) as response:
            assert response.status == 200
    status, body, _ = await e2e.get(f"/{DB}/doc", Cookie=cookie)
    assert (status, body["roles"]) == (200, ["admin", "staff"])
    assert e2e.sg.calls("PUT")[-1][2]["admin_roles"] == ["admin", "staff"]

    async with aiohttp.ClientSession() as client:
        async with client.delete(f"{e2e.admin_url}/{DB}/_user/alice/_session") as response:
            assert response.status == 200
    await until(lambda: bool(e2e.sg.calls("DELETE", "/alice/_session")))
    assert not [u for u, _ in e2e.sg.sessions.values() if u == "alice"]
    assert (await e2e.get(f"/{DB}/doc", Cookie=cookie))[0] == 401  # the sidecar's session too


@needs_hook
async def test_e2e_admin_api_down_is_502_and_upstream_untouched(e2e: Stack) -> None:
    sid = await e2e.login()
    await e2e.sg.stop_admin()
    status, body, _ = await e2e.get(f"/{DB}/doc", Cookie=f"SyncGatewaySession={sid}")
    assert (status, body["reason"]) == (502, "Sync Gateway admin API unreachable")
    assert e2e.sg.public_calls == []


@needs_hook
async def test_e2e_upstream_401_forgets_the_session(e2e: Stack) -> None:
    sid = await e2e.login()
    cookie = f"SyncGatewaySession={sid}"
    assert (await e2e.get(f"/{DB}/doc", Cookie=cookie))[0] == 200
    e2e.sg.sessions.clear()  # Sync Gateway lost it (restart, admin action)
    assert (await e2e.get(f"/{DB}/doc", Cookie=cookie))[0] == 401
    assert (await e2e.get(f"/{DB}/doc", Cookie=cookie))[0] == 200  # a new one was made


@needs_hook
async def test_e2e_websocket_as_the_user(e2e: Stack) -> None:
    sid = await e2e.login()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        async with client.ws_connect(
            f"{e2e.url}/{DB}/_blipsync", headers={"Cookie": f"SyncGatewaySession={sid}"}
        ) as ws:
            assert await ws.receive_json(timeout=5) == {"user": "alice"}
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"
    assert e2e.sg.public_calls[-1]["user"] == "alice"


@needs_hook
async def test_e2e_pass_authorization_still_sends_only_the_sync_gateway_session() -> None:
    fake = FakeSyncGateway(db=DB)
    await fake.start()
    try:
        async with stack_with(fake, pass_authorization=True) as stack:
            sid = await stack.login()
            status, body, _ = await stack.get(f"/{DB}/doc", Cookie=f"a=1; SyncGatewaySession={sid}")
            assert (status, body["user"]) == (200, "alice")
            cookie = fake.public_calls[-1]["cookie"]
            assert len(cookie) == 1 and sid not in cookie[0] and cookie[0].startswith("a=1; ")
    finally:
        await fake.stop()
