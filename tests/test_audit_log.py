"""The audit lines (`sidecar.audit`: login, refresh, logout, back-channel logout, revocation) and
the access log's `listener`, on the real sidecar with its built-in test provider."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import KeyServer, admin_session
from support import jwt_factory
from support.redis_server import free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar
from test_observability import config, json_log, lines  # noqa: F401  (json_log: a fixture)
from yarl import URL

from sidecar import keys
from sidecar.browser import logout_csrf_token
from sidecar.oidc.logout import sid_group
from sidecar.oidc.tokens import LOGOUT_EVENT
from sidecar.sessions.models import hash_session_id

AUDIT_KEYS = {"time", "level", "logger", "msg", "event", "user", "provider", "db", "reason"}


@pytest.fixture
async def sidecar(json_log: io.StringIO, upstream: Upstream) -> AsyncIterator[Sidecar]:  # noqa: F811
    async with running_sidecar(config(upstream)) as running:
        await ready(running)
        yield running


async def ready(sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(10):
            while True:
                async with http.get(f"{sidecar.admin_url}/_ready") as r:
                    if r.status == 200:
                        return
                await asyncio.sleep(0.05)


def audits(buffer: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [e for e in lines(buffer) if e.get("logger") == "sidecar.audit" and e["msg"] == event]


async def login(sidecar: Sidecar, http: aiohttp.ClientSession, name: str) -> dict[str, Any]:
    """The built-in test provider's flow, as the README's curl walkthrough does it."""
    async with http.get(f"{sidecar.url}/db/_oidc", allow_redirects=False) as r:
        authorize = URL(r.headers["Location"])
    authenticate = URL(f"{sidecar.url}/db/_oidc_testing/authenticate").with_query(authorize.query)
    async with http.post(
        authenticate,
        data={"username": name, "authenticated": "Login"},
        allow_redirects=False,
    ) as r:
        callback = r.headers["Location"]
    async with http.get(callback, allow_redirects=False) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_login_refresh_and_logout_each_write_one_audit_line(
    sidecar: Sidecar,
    json_log: io.StringIO,  # noqa: F811
) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        body = await login(sidecar, http, "alice")
        async with http.get(
            f"{sidecar.url}/db/_oidc_refresh", params={"refresh_token": body["refresh_token"]}
        ) as r:
            assert r.status == 200
        session_id = body["session_id"]
    async with aiohttp.ClientSession() as http:  # exactly this cookie, not the jar's
        async with http.post(
            f"{sidecar.url}/db/_oidc_logout",
            data={"csrf": logout_csrf_token(session_id)},
            headers={"Cookie": f"SyncGatewaySession={session_id}"},
        ) as r:
            assert r.status == 200
    expected = {"user": body["name"], "provider": "test", "db": "db"}
    assert body["name"].endswith("_alice")
    for event, reason in (("login", "code flow"), ("refresh", "refresh token"), ("logout", "user")):
        (line,) = audits(json_log, event)
        assert line | expected == line, line
        assert (line["event"], line["reason"], line["level"]) == (event, reason, "info")
        assert set(line) == AUDIT_KEYS
    text = json_log.getvalue()
    for secret in (body["id_token"], body["refresh_token"], session_id):
        assert secret not in text


async def test_revocations_write_audit_lines(
    sidecar: Sidecar,
    json_log: io.StringIO,  # noqa: F811
) -> None:
    admin = sidecar.admin_url
    session_id = await admin_session(admin, "db", "bob")
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{admin}/db/_session/{session_id}") as r:
            assert r.status == 200
        await admin_session(admin, "db", "bob")
        async with http.delete(f"{admin}/db/_user/bob/_session") as r:
            assert r.status == 200
        await admin_session(admin, "db", "bob")
        await admin_session(admin, "db", "bob")
        async with http.put(f"{admin}/db/_user/bob", json={"disabled": True}) as r:
            assert r.status == 200  # ends both sessions
        async with http.put(f"{admin}/db/_user/bob", json={"disabled": True}) as r:
            assert r.status == 200  # already disabled: no second line
        async with http.delete(f"{admin}/db/_user/bob") as r:
            assert r.status == 200  # no session left to end
    reasons = [
        (e["user"], e["db"], e["reason"], e.get("sessions")) for e in audits(json_log, "revocation")
    ]
    assert reasons == [
        ("bob", "db", "session deleted (admin)", None),
        ("bob", "db", "sessions revoked (admin)", 1),
        ("bob", "db", "user disabled (admin)", 2),
        ("bob", "db", "user deleted (admin)", 0),
    ]
    assert all(session_id not in str(e) for e in audits(json_log, "revocation"))


async def test_backchannel_logout_writes_an_audit_line(
    json_log: io.StringIO,  # noqa: F811
    upstream: Upstream,
    key_server: KeyServer,
) -> None:
    provider = {"issuer": key_server.issuer, "client_id": "c1", "user_prefix": "ks"}
    settings = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        databases={"db": {"oidc": {"providers": {"ks": provider}}}},
    )
    now = int(time.time())
    claims = {
        "iss": key_server.issuer,
        "aud": "c1",
        "iat": now,
        "jti": uuid.uuid4().hex,
        "sub": "u1",
        "events": {LOGOUT_EVENT: {}},
    }
    token = jwt_factory.mint(key_server.key, claims)
    by_sid = jwt_factory.mint(key_server.key, claims | {"jti": uuid.uuid4().hex, "sid": "S"})
    async with running_sidecar(settings) as sidecar, aiohttp.ClientSession() as http:
        await admin_session(sidecar.admin_url, "db", "ks_u1")
        session_id = await admin_session(sidecar.admin_url, "db", "ks_u2")
        await sidecar.app[keys.STORE].link_sessions(
            "sid", sid_group("db", "ks", "S"), hash_session_id(session_id), 60
        )
        for logout_token in (token, by_sid):
            async with http.post(
                f"{sidecar.url}/db/_oidc_backchannel_logout", data={"logout_token": logout_token}
            ) as r:
                assert r.status == 200, await r.text()
    by_sub_line, by_sid_line = audits(json_log, "backchannel_logout")
    assert by_sub_line | {"provider": "ks", "db": "db", "sessions": 1} == by_sub_line
    assert (by_sub_line["user"], by_sub_line["reason"]) == ("ks_u1", "provider logout (sub)")
    assert by_sid_line | {"provider": "ks", "db": "db", "sessions": 1} == by_sid_line
    assert (by_sid_line["user"], by_sid_line["reason"]) == ("ks_u2", "provider logout (sid)")
    for secret in (token, by_sid, session_id):
        assert secret not in json_log.getvalue()


async def test_access_log_names_the_listener_and_skips_the_sidecars_own_fetches(
    sidecar: Sidecar,
    json_log: io.StringIO,  # noqa: F811
) -> None:
    discovery = "/db/_oidc_testing/.well-known/openid-configuration"
    access = [e for e in lines(json_log) if e.get("logger") == "sidecar.access"]
    # The sidecar discovered its own test provider (it is ready) without access-log lines.
    assert not [e for e in access if e["path"].startswith("/db/_oidc_testing/")]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar.url}{discovery}") as r:
            assert r.status == 200
        # The mark is a per-process secret: a client's guess is logged like any request.
        async with http.get(
            f"{sidecar.url}/db/_oidc_testing/certs", headers={"X-Sidecar-Self-Fetch": "guess"}
        ) as r:
            assert r.status == 200
        async with http.get(f"{sidecar.admin_url}/_health") as r:
            assert r.status == 200
    access = [e for e in lines(json_log) if e.get("logger") == "sidecar.access"]
    by_path = {e["path"]: e["listener"] for e in access}
    assert by_path[discovery] == "public"
    assert by_path["/db/_oidc_testing/certs"] == "public"
    assert by_path["/_health"] == "admin"
