"""The login-state cookie with several logins pending (tabs signing in at once) and the
cookie paths under a `public_url` path prefix. Real sidecar, real built-in test provider."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import admin_session, raw_http
from support.builtin_provider import DB, answer_for, builtin_sidecar, start_login, state_cookie
from support.redis_server import free_port
from support.sidecar import Upstream, base_config, running_sidecar
from yarl import URL

from sidecar.sessions.cookies import (
    MAX_PENDING_STATES,
    STATE_COOKIE,
    cookie_path,
    holds_state,
    pending_states,
)

A, B, C, D, E = ("a" * 43, "b" * 43, "c" * 43, "d" * 43, "e" * 43)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        (A, [A]),  # one pending login: Sync Gateway's cookie, the state alone
        (f"{A}.{B}", [A, B]),
        (f"{A}.{B}.{C}.{D}.{E}", [A, B, C, D]),  # at most MAX_PENDING_STATES
        (f"{A}.{A}.{B}", [A, B]),
        (f"{A}..{B}.", [A, B]),
        (f"{A}.<script>.{B}", [A, B]),  # nothing that is no state of ours
        (f"{A}.{'x' * 129}", [A]),
        (f"{A} {B}", []),
        ('"' + A + '"', []),
    ],
)
def test_pending_states(value: str | None, expected: list[str]) -> None:
    assert pending_states(value) == expected


@pytest.mark.parametrize(
    ("value", "state", "held"),
    [
        (A, A, True),
        (f"{B}.{A}", A, True),
        (f"{B}.{A}", B, True),
        (f"{B}.{A}", C, False),
        (f"{B}.{A}", f"{B}.{A}", False),  # the whole cookie is no state
        (f"{A}.{B}.{C}.{D}.{E}", E, False),  # forgotten beyond the bound
        (None, A, False),
        (A, "", False),
    ],
)
def test_holds_state(value: str | None, state: str, held: bool) -> None:
    assert holds_state(value, state) is held


@pytest.mark.parametrize(
    ("public_url", "path"),
    [
        (None, "/db"),
        ("https://sync.example.com", "/db"),
        ("https://sync.example.com/", "/db"),
        ("https://sync.example.com/prefix", "/prefix/db"),
        ("https://sync.example.com/prefix/", "/prefix/db"),
        ("https://sync.example.com/a/b", "/a/b/db"),
    ],
)
def test_cookie_path(public_url: str | None, path: str) -> None:
    assert cookie_path(public_url, DB) == path


async def test_one_login_sets_exactly_sync_gateways_cookie() -> None:
    async with builtin_sidecar() as sidecar, aiohttp.ClientSession() as http:
        authorize, cookie = await start_login(http, sidecar, None)
    assert cookie.value == authorize.query["state"]
    assert cookie["path"] == f"/{DB}" and cookie["max-age"] == "300"


async def test_pending_logins_are_kept_newest_first_and_bounded() -> None:
    async with builtin_sidecar() as sidecar, aiohttp.ClientSession() as http:
        value = None
        states: list[str] = []
        logins: dict[str, URL] = {}
        for _ in range(MAX_PENDING_STATES + 1):
            authorize, cookie = await start_login(http, sidecar, value)
            states.insert(0, authorize.query["state"])
            logins[states[0]] = authorize
            value = cookie.value
            assert value == ".".join(states[:MAX_PENDING_STATES])
        assert value is not None
        assert len(value) < 200  # bounded: four 43-character states

        # The oldest login was forgotten: its callback is refused.
        oldest = states[-1]
        async with http.get(
            f"{sidecar.url}/{DB}/_oidc_callback",
            params=await answer_for(http, logins[oldest]),
            headers={"Cookie": f"{STATE_COOKIE}={value}"},
        ) as response:
            assert response.status == 400
            assert (await response.json())["reason"] == "OIDC Auth Failure: State mismatch"

        # One in the middle finishes: only that one leaves the cookie.
        middle = states[1]
        async with http.get(
            f"{sidecar.url}/{DB}/_oidc_callback",
            params=await answer_for(http, logins[middle]),
            headers={"Cookie": f"{STATE_COOKIE}={value}"},
        ) as response:
            assert response.status == 200, await response.text()
            rest = state_cookie(response)
        assert rest.value == ".".join([states[0], *states[2:MAX_PENDING_STATES]])
        assert rest["max-age"] == "300"

        # The last pending one finishing expires the cookie, as with Sync Gateway.
        last = states[0]
        async with http.get(
            f"{sidecar.url}/{DB}/_oidc_callback",
            params=await answer_for(http, logins[last]),
            headers={"Cookie": f"{STATE_COOKIE}={last}"},
        ) as response:
            assert response.status == 200, await response.text()
            gone = state_cookie(response)
        assert gone.value == "" and gone["max-age"] == "0"


async def test_session_cookie_paths_follow_the_public_url_prefix(upstream: Upstream) -> None:
    port, admin_port = free_port(), free_port()
    config = base_config(
        port,
        admin_port,
        upstream=upstream.url,
        public_url=f"http://127.0.0.1:{port}/prefix/",
        databases={DB: {}},
    )
    async with running_sidecar(config) as sidecar:
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        cookie = [("Cookie", f"SyncGatewaySession={session_id}")]
        # POST /db/_session answers with the session cookie; DELETE expires it.
        created = await raw_http(sidecar.port, f"/{DB}/_session", method="POST", headers=cookie)
        deleted = await raw_http(sidecar.port, f"/{DB}/_session", method="DELETE", headers=cookie)
    assert created.status == 200 and deleted.status == 200
    for answer in (created, deleted):
        (set_cookie,) = answer.header("Set-Cookie")
        assert "Path=/prefix/db;" in set_cookie or set_cookie.endswith("Path=/prefix/db")
