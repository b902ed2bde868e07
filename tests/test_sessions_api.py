"""`GET|POST|DELETE /{db}/_session` on the public port as Sync Gateway answers them, and the idle
session TTL with its 10% extension rule. Real sidecar, real OP tokens, real redis-server."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from conftest import DB, Answer, LoginHarness
from support.op import OPClient, get_tokens

SESSION_COOKIE = "SyncGatewaySession"
GUEST = {
    "authentication_handlers": ["default", "cookie"],
    "ok": True,
    "userCtx": {"channels": {}, "name": None},
}
ALICE = {
    "authentication_handlers": ["default", "cookie"],
    "ok": True,
    "userCtx": {"channels": {"news": 1, "sports": 1}, "name": "op_alice"},
}


def cookie_of(answer: Answer) -> tuple[str, dict[str, Any]]:
    line = answer.cookie(SESSION_COOKIE)
    assert line is not None, answer.set_cookies
    jar: SimpleCookie = SimpleCookie()
    jar.load(line)
    morsel = jar[SESSION_COOKIE]
    return morsel.value, dict(morsel)


def with_cookie(session_id: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={session_id}"}


async def start(h: LoginHarness, **settings: Any) -> OPClient:
    client = h.client()
    await h.start(
        {"op": h.provider(client, user_prefix="op", channels_claim="channels")}, **settings
    )
    return client


async def id_token(h: LoginHarness, client: OPClient, username: str = "alice") -> str:
    token: str = (await get_tokens(h.op, client, username))["id_token"]
    return token


async def test_post_session_with_a_bearer_token_creates_a_session(harness: LoginHarness) -> None:
    client = await start(harness)
    bearer = {"Authorization": f"Bearer {await id_token(harness, client)}"}
    async with aiohttp.ClientSession() as http:
        # A bearer token alone authenticates but never creates a session.
        assert (await harness.get(http, f"{harness.url}/{DB}/doc", headers=bearer)).status == 200
        me = await harness.get(http, f"{harness.url}/{DB}/_session", headers=bearer)
        assert (me.status, me.body) == (200, ALICE)
        assert me.cookie(SESSION_COOKIE) is None
        assert await harness.stored("sessions") == 0

        bodies: list[dict[str, Any]] = [{"json": {}}, {}]
        for body in bodies:  # `{}` as Couchbase Lite sends it, or no body at all
            answer = await harness.request(
                http, "POST", f"{harness.url}/{DB}/_session", headers=bearer, **body
            )
            assert (answer.status, answer.body) == (200, ALICE)
            session_id, attributes = cookie_of(answer)
            assert attributes["path"] == f"/{DB}"
            assert attributes["httponly"] is True
            expires = parsedate_to_datetime(attributes["expires"]).timestamp()
            assert abs(expires - (time.time() + 86400)) < 60

            # The cookie alone authenticates now.
            proxied = await harness.get(
                http, f"{harness.url}/{DB}/doc", headers=with_cookie(session_id)
            )
            assert proxied.status == 200
            assert harness.upstream.header(-1, "X-Forwarded-User") == ["op_alice"]
            mine = await harness.get(
                http, f"{harness.url}/{DB}/_session", headers=with_cookie(session_id)
            )
            assert (mine.status, mine.body) == (200, ALICE)
    assert await harness.stored("sessions") == 2


POST_REFUSALS: dict[str, tuple[list[tuple[str, str]], str | None, int, str]] = {
    "no credentials": ([], "{}", 401, "Login required"),
    "name and password": (
        [],
        '{"name": "alice", "password": "pw"}',
        401,
        "Invalid login: password authentication is not supported",
    ),
    "name and password with a valid bearer": (
        [("Authorization", "Bearer {token}")],
        '{"name": "op_alice", "password": "pw"}',
        401,
        "Invalid login: password authentication is not supported",
    ),
    "name only": (
        [],
        '{"name": "op_alice"}',
        401,
        "Invalid login: password authentication is not supported",
    ),
    "garbage bearer": ([("Authorization", "Bearer abc.def.ghi")], "{}", 401, "Invalid login"),
    "tampered bearer": ([("Authorization", "Bearer {token}x")], "{}", 401, "Invalid login"),
    "bearer with a space inside": ([("Authorization", "Bearer a b")], "{}", 401, "Invalid login"),
    "basic credentials": (
        [("Authorization", "Basic YWxpY2U6cHc=")],
        "{}",
        401,
        "Invalid login: only Bearer ID tokens are accepted",
    ),
    "two authorization headers": (
        [("Authorization", "Bearer {token}"), ("Authorization", "Bearer {token}")],
        "{}",
        400,
        "multiple Authorization headers",
    ),
    "junk session cookie": ([("Cookie", f"{SESSION_COOKIE}=junk")], "{}", 401, "Session Invalid"),
    "unknown session cookie": (
        [("Cookie", f"{SESSION_COOKIE}={'A' * 43}")],
        "{}",
        401,
        "Session Invalid",
    ),
    "body not JSON": ([("Authorization", "Bearer {token}")], "{", 400, "body is not valid JSON"),
    "body an array": (
        [("Authorization", "Bearer {token}")],
        "[]",
        400,
        "body must be a JSON object",
    ),
    "body a string": (
        [("Authorization", "Bearer {token}")],
        '"x"',
        400,
        "body must be a JSON object",
    ),
}


async def test_post_session_refusals(harness: LoginHarness) -> None:
    client = await start(harness)
    token = await id_token(harness, client)
    async with aiohttp.ClientSession() as http:
        for case, (headers, body, status, reason) in POST_REFUSALS.items():
            answer = await harness.request(
                http,
                "POST",
                f"{harness.url}/{DB}/_session",
                headers=[(k, v.format(token=token)) for k, v in headers],
                data=body,
            )
            assert (answer.status, answer.body) == (
                status,
                {"error": "Unauthorized" if status == 401 else "Bad Request", "reason": reason},
            ), case
            assert answer.cookie(SESSION_COOKIE) is None, case
    assert await harness.stored("sessions") == 0
    assert harness.upstream.requests == []


async def test_get_session(harness: LoginHarness) -> None:
    await start(harness)
    async with aiohttp.ClientSession() as http:
        guest = await harness.get(http, f"{harness.url}/{DB}/_session")
        assert (guest.status, guest.body) == (200, GUEST)
        for value in ("junk", "A" * 43, ""):
            answer = await harness.get(
                http, f"{harness.url}/{DB}/_session", headers=with_cookie(value)
            )
            assert (answer.status, answer.body) == (
                401,
                {"error": "Unauthorized", "reason": "Session Invalid"},
            ), value
        unknown_db = await harness.get(http, f"{harness.url}/nodb/_session")
        assert unknown_db.status == 404
    assert harness.upstream.requests == []


async def test_delete_session_logs_out_everywhere(harness: LoginHarness) -> None:
    client = await start(harness)
    bearer = {"Authorization": f"Bearer {await id_token(harness, client)}"}
    async with aiohttp.ClientSession() as http:
        created = await harness.request(
            http, "POST", f"{harness.url}/{DB}/_session", headers=bearer, json={}
        )
        session_id, _ = cookie_of(created)
        kept = await harness.request(
            http, "POST", f"{harness.url}/{DB}/_session", headers=bearer, json={}
        )
        other_id, _ = cookie_of(kept)
        doc = f"{harness.url}/{DB}/doc"
        assert (await harness.get(http, doc, headers=with_cookie(session_id))).status == 200

        answer = await harness.request(
            http, "DELETE", f"{harness.url}/{DB}/_session", headers=with_cookie(session_id)
        )
        assert answer.status == 200
        value, attributes = cookie_of(answer)
        assert value == ""
        assert attributes["max-age"] == "0"
        assert attributes["path"] == f"/{DB}"
        assert parsedate_to_datetime(attributes["expires"]).timestamp() <= time.time()

        # Gone server-side: the old cookie no longer works, anywhere.
        stale = await harness.get(http, doc, headers=with_cookie(session_id))
        assert (stale.status, stale.body["reason"]) == (401, "Session Invalid")
        admin = await harness.get(http, f"{harness.admin_url}/{DB}/_session/{session_id}")
        assert admin.status == 404
        # The user's other session lives on.
        assert (await harness.get(http, doc, headers=with_cookie(other_id))).status == 200
        assert await harness.stored("sessions") == 1

        again = await harness.request(
            http, "DELETE", f"{harness.url}/{DB}/_session", headers=with_cookie(session_id)
        )
        assert again.status == 200  # unknown session: nothing to delete, cookie expired anyway
        assert cookie_of(again)[0] == ""
        for headers in ({}, bearer):
            none = await harness.request(
                http, "DELETE", f"{harness.url}/{DB}/_session", headers=headers
            )
            assert (none.status, none.body) == (404, {"error": "Not Found", "reason": "no session"})
    assert await harness.stored("sessions") == 1
    assert [r["path_qs"] for r in harness.upstream.requests] == ["/db/doc", "/db/doc"]


@pytest.mark.timeout(60)
async def test_idle_ttl_is_extended_after_ten_percent(harness: LoginHarness) -> None:
    """ttl 60 s: a request in the first 6 s leaves the expiry alone; one after moves it forward
    to a full ttl from then, and the store's own expiry (redis TTL) with it."""
    client = await start(harness, session={"ttl": 60})
    bearer = {"Authorization": f"Bearer {await id_token(harness, client)}"}
    async with aiohttp.ClientSession() as http:
        created = await harness.request(
            http, "POST", f"{harness.url}/{DB}/_session", headers=bearer, json={}
        )
        session_id, attributes = cookie_of(created)
        cookie_expires = parsedate_to_datetime(attributes["expires"]).timestamp()
        assert abs(cookie_expires - (time.time() + 60)) < 5

        async def expires() -> float:
            info = await harness.get(http, f"{harness.admin_url}/{DB}/_session/{session_id}")
            assert info.body["ttl"] == 60
            return datetime.fromisoformat(info.body["expires"]).timestamp()  # RFC 3339

        async def touch() -> Answer:
            answer = await harness.get(
                http, f"{harness.url}/{DB}/doc", headers=with_cookie(session_id)
            )
            assert answer.status == 200
            return answer

        first = await expires()
        await touch()
        assert await expires() == first  # under 10% elapsed: no write

        await asyncio.sleep(6.5)
        extended_at = time.time()
        extending = await touch()
        later = await expires()
        assert later >= first + 5
        assert abs(later - (extended_at + 60)) <= 2
        redis_ttl = await asyncio.to_thread(_session_pttl, harness)
        assert redis_ttl > 57_000
        # Sync Gateway re-sends the cookie with the new Expires when it extends a session
        # (auth/session.go AuthenticateCookie); a browser otherwise drops it at the old one.
        assert extending.cookie(SESSION_COOKIE) is not None
        value, attributes = cookie_of(extending)
        assert value == session_id and attributes["path"] == f"/{DB}"
        assert abs(parsedate_to_datetime(attributes["expires"]).timestamp() - later) <= 2


def _session_pttl(h: LoginHarness) -> int:
    keys = h.redis.command("KEYS", "sidecar:s:*")
    assert len(keys) == 1
    ttl: int = h.redis.command("PTTL", keys[0])
    return ttl
