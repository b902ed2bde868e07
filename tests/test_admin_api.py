"""The admin API (private port): users and sessions as Sync Gateway's admin REST API offers them,
their effect on the public port, and that the public port never exposes it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from conftest import DB, Answer, LoginHarness, browser
from yarl import URL

SESSION_COOKIE = "SyncGatewaySession"


class Admin:
    """Calls to the admin port of the harness's sidecar."""

    def __init__(self, h: LoginHarness, http: aiohttp.ClientSession) -> None:
        self.h, self.http = h, http

    def url(self, *segments: str) -> URL:
        path = "/".join(quote(s, safe="") for s in segments)
        return URL(f"{self.h.admin_url}/{DB}/{path}", encoded=True)

    async def call(self, method: str, *segments: str, **kwargs: Any) -> Answer:
        return await self.h.request(self.http, method, self.url(*segments), **kwargs)

    async def put_user(self, user: str, **fields: Any) -> Answer:
        return await self.call("PUT", "_user", user, json=fields)

    async def user(self, name: str) -> Answer:
        return await self.call("GET", "_user", name)

    async def session(self, name: str, **extra: Any) -> str:
        answer = await self.call("POST", "_session", json={"name": name, **extra})
        assert answer.status == 200, answer.text
        session_id: str = answer.body["session_id"]
        return session_id


async def public(
    h: LoginHarness, session_id: str, path: str = "doc", method: str = "GET"
) -> Answer:
    async with aiohttp.ClientSession() as http:
        return await h.request(
            http,
            method,
            f"{h.url}/{DB}/{path}",
            headers={"Cookie": f"{SESSION_COOKIE}={session_id}"},
        )


@pytest.fixture
async def admin(harness: LoginHarness) -> AsyncIterator[Admin]:
    await harness.start_op(user_prefix="op")
    async with aiohttp.ClientSession() as http:
        yield Admin(harness, http)


# --- users -------------------------------------------------------------------------------------


async def test_user_put_get_delete(harness: LoginHarness, admin: Admin) -> None:
    name = "127.0.0.1%3A80_alice"  # names the OIDC flow derives hold % and :
    created = await admin.put_user(
        name,
        name=name,
        email="alice@example.com",
        admin_channels=["b", "a", "a"],
        admin_roles=["r"],
    )
    assert (created.status, created.body) == (201, {})
    got = await admin.user(name)
    assert got.status == 200
    assert got.body == {
        "name": name,
        "email": "alice@example.com",
        "admin_channels": ["a", "b"],
        "admin_roles": ["r"],
        "all_channels": ["a", "b"],
        "roles": ["r"],
        "disabled": False,
        "jwt_issuer": None,
        "jwt_roles": [],
        "jwt_channels": [],
        "jwt_last_updated": None,
    }
    # PUT replaces: what is not given is cleared; read-only fields are accepted and ignored.
    updated = await admin.put_user(name, admin_roles=["s"], jwt_roles=["x"], roles=["y"])
    assert (updated.status, updated.body) == (200, {})
    got = (await admin.user(name)).body
    assert (got["email"], got["admin_channels"], got["admin_roles"]) == (None, [], ["s"])
    assert (got["jwt_roles"], got["roles"]) == ([], ["s"])

    deleted = await admin.call("DELETE", "_user", name)
    assert (deleted.status, deleted.body) == (200, {"ok": True})
    assert (await admin.user(name)).status == 404
    again = await admin.call("DELETE", "_user", name)
    assert (again.status, again.body) == (404, {"error": "Not Found", "reason": "missing"})
    assert await harness.stored("users") == 0


async def test_oidc_user_shows_jwt_fields(harness: LoginHarness, admin: Admin) -> None:
    """The read-only jwt_* fields, with jwt_last_updated as RFC 3339 (Go's time.Time)."""
    async with browser() as http:
        assert (await harness.login(http, "alice")).status == 200
    got = (await admin.user("op_alice")).body
    assert got["jwt_issuer"] == harness.op.issuer
    assert got["email"] == "alice@example.com"
    updated = datetime.fromisoformat(got["jwt_last_updated"]).timestamp()
    assert got["jwt_last_updated"].endswith("Z") and abs(updated - time.time()) < 30


PUT_REFUSALS: dict[str, tuple[bytes | Any, str]] = {
    "not JSON": (b"{", "body is not valid JSON"),
    "an array": (b"[]", "body must be a JSON object"),
    "a string": (b'"u"', "body must be a JSON object"),
    "channels a string": (
        {"admin_channels": "a"},
        "admin_channels must be a list of non-empty strings",
    ),
    "channels numbers": (
        {"admin_channels": [1]},
        "admin_channels must be a list of non-empty strings",
    ),
    "channels empty string": (
        {"admin_channels": [""]},
        "admin_channels must be a list of non-empty strings",
    ),
    "channels an object": (
        {"admin_channels": {"a": 1}},
        "admin_channels must be a list of non-empty strings",
    ),
    "roles a string": ({"admin_roles": "r"}, "admin_roles must be a list of non-empty strings"),
    "roles with null": ({"admin_roles": [None]}, "admin_roles must be a list of non-empty strings"),
    "disabled a string": ({"disabled": "yes"}, "disabled must be true or false"),
    "disabled a number": ({"disabled": 1}, "disabled must be true or false"),
    "disabled null": ({"disabled": None}, "disabled must be true or false"),
    "email a number": ({"email": 5}, "email must be a valid address"),
    "email no at": ({"email": "nope"}, "email must be a valid address"),
    "another name": ({"name": "mallory"}, "name in body does not match the URL"),
    "name a number": ({"name": 5}, "name in body does not match the URL"),
    "a password": (
        {"password": "pw"},
        "passwords are not supported: users log in with OpenID Connect",
    ),
    "an unknown field": ({"admin_channel": ["a"]}, "unknown field(s): admin_channel"),
    "too large": (b'{"email": "' + b"a" * 70_000 + b'@x.org"}', "body too large"),
}


async def test_user_field_validation(harness: LoginHarness, admin: Admin) -> None:
    for case, (body, reason) in PUT_REFUSALS.items():
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        answer = await admin.call("PUT", "_user", "vic", **kwargs)
        assert (answer.status, answer.body) == (400, {"error": "Bad Request", "reason": reason}), (
            case
        )
    assert (await admin.user("vic")).status == 404  # nothing refused created the user
    # Nulls and an empty body are fine: nothing granted.
    assert (
        await admin.put_user("vic", admin_channels=None, admin_roles=None, email=None)
    ).status == 201
    assert (await admin.call("PUT", "_user", "wes", data=b"")).status == 201
    unknown_db = await harness.request(
        admin.http, "PUT", f"{harness.admin_url}/nodb/_user/vic", json={}
    )
    assert unknown_db.status == 404


# --- sessions ----------------------------------------------------------------------------------


async def test_admin_sessions(harness: LoginHarness, admin: Admin) -> None:
    await admin.put_user("bob", admin_roles=["r2", "r1"], admin_channels=["c"], email="b@x.org")
    answer = await admin.call("POST", "_session", json={"name": "bob"})
    assert answer.status == 200
    assert sorted(answer.body) == ["cookie_name", "expires", "session_id"]
    assert answer.body["cookie_name"] == SESSION_COOKIE
    expires = datetime.fromisoformat(answer.body["expires"]).timestamp()  # RFC 3339
    assert abs(expires - (time.time() + 86400)) < 30
    session_id = answer.body["session_id"]

    proxied = await public(harness, session_id)
    assert proxied.status == 200
    up = harness.upstream
    assert up.header(-1, "X-Forwarded-User") == ["bob"]
    assert up.header(-1, "X-Forwarded-Email") == ["b@x.org"]
    assert up.header(-1, "X-Forwarded-Roles") == ["r1,r2"]
    assert up.header(-1, "X-Forwarded-Channels") == ["c"]

    info = await admin.call("GET", "_session", session_id)
    assert info.status == 200
    assert info.body == {
        # Sync Gateway's body, as the public GET /{db}/_session answers it...
        "authentication_handlers": ["default", "cookie"],
        "ok": True,
        "userCtx": {"channels": {"c": 1}, "name": "bob"},
        # ...and ours beside it.
        "name": "bob",
        "expires": answer.body["expires"],
        "ttl": 86400,
        "cookie_name": SESSION_COOKIE,
        "provider": None,
    }
    short = await admin.call("POST", "_session", json={"name": "bob", "ttl": 120})
    short_expires = datetime.fromisoformat(short.body["expires"]).timestamp()
    assert abs(short_expires - (time.time() + 120)) < 30

    # The grants follow the user while the session lives.
    await admin.put_user("bob", admin_roles=["r3"], admin_channels=[])
    assert (await public(harness, session_id)).status == 200
    assert up.header(-1, "X-Forwarded-Roles") == ["r3"]
    assert up.header(-1, "X-Forwarded-Channels") == []
    assert up.header(-1, "X-Forwarded-Email") == []

    deleted = await admin.call("DELETE", "_session", session_id)
    assert (deleted.status, deleted.body) == (200, {"ok": True})
    assert (await public(harness, session_id)).status == 401
    assert (await admin.call("GET", "_session", session_id)).status == 404
    assert (await admin.call("DELETE", "_session", session_id)).status == 404
    for junk in ("junk", "A" * 43, "%00"):
        assert (await admin.call("GET", "_session", junk)).status == 404, junk
        assert (await admin.call("DELETE", "_session", junk)).status == 404, junk
    assert (await public(harness, short.body["session_id"])).status == 200


SESSION_REFUSALS: dict[str, tuple[bytes | Any, int, str]] = {
    "no name": ({}, 400, "name is required"),
    "empty name": ({"name": ""}, 400, "name is required"),
    "name a number": ({"name": 5}, 400, "name is required"),
    "ttl too short": (
        {"name": "bob", "ttl": 59},
        400,
        "ttl must be whole seconds between 60 and 31536000",
    ),
    "ttl too long": (
        {"name": "bob", "ttl": 31536001},
        400,
        "ttl must be whole seconds between 60 and 31536000",
    ),
    "ttl a string": (
        {"name": "bob", "ttl": "60"},
        400,
        "ttl must be whole seconds between 60 and 31536000",
    ),
    "ttl a bool": (
        {"name": "bob", "ttl": True},
        400,
        "ttl must be whole seconds between 60 and 31536000",
    ),
    "ttl a fraction": (
        {"name": "bob", "ttl": 60.5},
        400,
        "ttl must be whole seconds between 60 and 31536000",
    ),
    "ttl negative": (
        {"name": "bob", "ttl": -1},
        400,
        "ttl must be whole seconds between 60 and 31536000",
    ),
    "unknown user": ({"name": "ghost"}, 404, "no such user 'ghost'"),
    "disabled user": ({"name": "dis"}, 400, "user 'dis' is disabled"),
    "not JSON": (b"name=bob", 400, "body is not valid JSON"),
    "an array": (b'["bob"]', 400, "body must be a JSON object"),
}


async def test_admin_session_refusals(harness: LoginHarness, admin: Admin) -> None:
    await admin.put_user("bob")
    await admin.put_user("dis", disabled=True)
    for case, (body, status, reason) in SESSION_REFUSALS.items():
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        answer = await admin.call("POST", "_session", **kwargs)
        assert (answer.status, answer.body["reason"]) == (status, reason), case
    assert await harness.stored("sessions") == 0


async def test_revoke_all_sessions_of_a_user(harness: LoginHarness, admin: Admin) -> None:
    await admin.put_user("op_alice")
    await admin.put_user("carol")
    via_admin = [await admin.session("op_alice"), await admin.session("op_alice")]
    async with browser() as http:
        login = await harness.login(http, "alice")  # a third, through the OIDC flow
    assert login.body["name"] == "op_alice"
    alice_sessions = [*via_admin, login.body["session_id"]]
    carol = await admin.session("carol")
    for session_id in (*alice_sessions, carol):
        assert (await public(harness, session_id)).status == 200

    revoked = await admin.call("DELETE", "_user", "op_alice", "_session")
    assert (revoked.status, revoked.body) == (200, {"ok": True, "revoked": 3})
    for session_id in alice_sessions:
        answer = await public(harness, session_id)
        assert answer.status == 401
    assert (await public(harness, carol)).status == 200  # other users are untouched
    assert (await admin.user("op_alice")).status == 200  # the user stays; only sessions go
    missing = await admin.call("DELETE", "_user", "ghost", "_session")
    assert missing.status == 404


async def test_disabled_user_is_locked_out_everywhere(harness: LoginHarness, admin: Admin) -> None:
    async with browser() as http:
        login = await harness.login(http, "alice")
    assert login.status == 200
    other = await admin.session("op_alice")
    bearer = {"Authorization": f"Bearer {login.body['id_token']}"}
    async with aiohttp.ClientSession() as http:
        assert (await harness.get(http, f"{harness.url}/{DB}/doc", headers=bearer)).status == 200

    assert (await admin.put_user("op_alice", disabled=True)).status == 200
    assert (await admin.user("op_alice")).body["disabled"] is True
    for session_id in (login.body["session_id"], other):
        assert (await public(harness, session_id)).status == 401
    async with aiohttp.ClientSession() as http:
        refused = await harness.get(http, f"{harness.url}/{DB}/doc", headers=bearer)
        assert (refused.status, refused.body["reason"]) == (401, "Invalid login")
        post = await harness.request(
            http, "POST", f"{harness.url}/{DB}/_session", headers=bearer, json={}
        )
        assert post.status == 401 and post.cookie(SESSION_COOKIE) is None
        refresh = await harness.get(
            http,
            f"{harness.url}/{DB}/_oidc_refresh",
            params={"refresh_token": login.body["refresh_token"]},
        )
        assert refresh.status == 401 and refresh.cookie(SESSION_COOKIE) is None
    async with browser() as http:
        again = await harness.login(http, "alice")
    assert (again.status, again.body["reason"]) == (401, "Invalid login")
    assert (await admin.call("POST", "_session", json={"name": "op_alice"})).status == 400
    assert await harness.stored("sessions") == 0

    # Enabled again: new logins work, the old sessions stay dead.
    assert (await admin.put_user("op_alice")).status == 200
    async with browser() as http:
        assert (await harness.login(http, "alice")).status == 200
    assert (await public(harness, other)).status == 401


async def test_deleted_user_sessions_stop_working(harness: LoginHarness, admin: Admin) -> None:
    await admin.put_user("bob")
    session_id = await admin.session("bob")
    assert (await public(harness, session_id)).status == 200
    assert (await admin.call("DELETE", "_user", "bob")).status == 200
    assert (await public(harness, session_id)).status == 401
    assert await harness.stored("sessions") == 0


# --- the public port does not expose any of it --------------------------------------------------


PUBLIC_PROBES: list[tuple[str, str, Any]] = [
    ("PUT", "_user/mallory", {"name": "mallory", "admin_roles": ["admin"]}),
    ("GET", "_user/bob", None),
    ("DELETE", "_user/bob", None),
    ("DELETE", "_user/bob/_session", None),
    ("POST", "_session", {"name": "bob", "ttl": 600}),
    ("GET", "_session/{session}", None),
    ("DELETE", "_session/{session}", None),
]


async def test_public_port_does_not_expose_the_admin_api(
    harness: LoginHarness, admin: Admin
) -> None:
    await admin.put_user("bob")
    await admin.put_user("eve")
    bob = await admin.session("bob")
    eve = await admin.session("eve")
    async with aiohttp.ClientSession() as http:
        for method, path, body in PUBLIC_PROBES:
            url = f"{harness.url}/{DB}/" + path.format(session=bob)
            anonymous = await harness.request(http, method, url, json=body)
            assert anonymous.status == 401, (method, path, anonymous.text)
        assert harness.upstream.requests == []
        # Even a logged-in caller only reaches the upstream (which has its own admin rules);
        # the sidecar's users and sessions are untouched.
        for method, path, body in PUBLIC_PROBES:
            if path == "_session":
                continue  # POST /{db}/_session is the public login endpoint: see below
            url = f"{harness.url}/{DB}/" + path.format(session=bob)
            answer = await harness.request(
                http, method, url, json=body, headers={"Cookie": f"{SESSION_COOKIE}={eve}"}
            )
            assert answer.body.get("path") == f"/{DB}/" + path.format(session=bob), answer.text
        login_attempt = await harness.request(
            http,
            "POST",
            f"{harness.url}/{DB}/_session",
            json={"name": "bob", "ttl": 600},
            headers={"Cookie": f"{SESSION_COOKIE}={eve}"},
        )
        assert login_attempt.status == 401 and login_attempt.cookie(SESSION_COOKIE) is None
    assert (await admin.user("mallory")).status == 404
    assert (await admin.user("bob")).status == 200
    assert (await public(harness, bob)).status == 200
    assert await harness.stored("sessions") == 2
    # ... and the admin port proxies nothing.
    reached = len(harness.upstream.requests)
    not_proxied = await admin.call("GET", "doc")
    assert not_proxied.status == 404
    assert len(harness.upstream.requests) == reached


# --- text from the caller is quoted without markup ------------------------------------------------

HOSTILE_NAMES: dict[str, tuple[str, str]] = {
    "script": ('<script>alert("x")</script>', "'scriptalert(x)/script'"),
    "quotes": ("o'brien\"", "'obrien'"),
    "CRLF": ("a\r\nSet-Cookie: x=y", "'aSet-Cookie: x=y'"),
    "unicode": ("\u00e9l\u00e8ve\u202e", "'lve'"),
    "very long": ("n" * 500, "'" + "n" * 64 + "...'"),
}


@pytest.mark.parametrize("case", HOSTILE_NAMES, ids=list(HOSTILE_NAMES))
async def test_admin_reasons_never_reflect_markup(
    harness: LoginHarness, admin: Admin, case: str
) -> None:
    name, quoted = HOSTILE_NAMES[case]
    unknown = await admin.call("POST", "_session", json={"name": name})
    assert (unknown.status, unknown.body["reason"]) == (404, f"no such user {quoted}")
    field = await admin.call("PUT", "_user", "vic", json={name: 1})
    assert (field.status, field.body["reason"]) == (400, f"unknown field(s): {quoted[1:-1]}")
    db = await harness.request(
        admin.http, "GET", URL(f"{harness.admin_url}/{quote(name, safe='')}/_user/x", encoded=True)
    )
    assert (db.status, db.body["reason"]) == (404, f"no such database {quoted}")
    for answer in (unknown, field, db):
        assert not set(answer.text) & set("<>\r\n"), case
