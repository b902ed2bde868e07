"""Findings of the outside review (branch wip/review): each test is something a person or an
attacker saw from outside with real processes, written as the behaviour the README or the
issues promise. They are strict xfails: they fail today, and the suite turns red as soon as one
is fixed (then remove its marker).

Everything here is real: the sidecar's own apps on 127.0.0.1, a raw asyncio upstream writing
exact bytes (no server library would produce these answers), headless chromium when installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from conftest import admin_session, raw_http
from support.builtin_provider import until_ready
from support.chromium import Chromium, executable
from support.redis_server import free_port
from support.sidecar import ROOT, Sidecar, Upstream, base_config, running_sidecar
from test_observability import json_log  # noqa: F401  (a fixture)
from test_proxy import _answering

DB = "db"


def _csrf(session_id: str) -> str:
    return hashlib.sha256(f"logout-csrf:{session_id}".encode()).hexdigest()


@asynccontextmanager
async def _sidecar(upstream_url: str, **settings: Any) -> AsyncIterator[Sidecar]:
    config = base_config(
        free_port(), free_port(), upstream=upstream_url, databases={DB: {}}, **settings
    )
    async with running_sidecar(config) as sidecar:
        yield sidecar


# --- 1. Browser sign-out is refused in a real browser ------------------------------------------


async def test_logout_form_posted_by_a_browser_from_the_sidecars_own_page(
    upstream: Upstream,
) -> None:
    async with _sidecar(upstream.url) as sidecar:
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        answer = await raw_http(
            sidecar.port,
            f"/{DB}/_oidc_logout",
            method="POST",
            headers=[
                ("Cookie", f"SyncGatewaySession={session_id}"),
                ("Content-Type", "application/x-www-form-urlencoded"),
                # What chromium sends for the form of a page served with
                # Referrer-Policy: no-referrer (Fetch: the request origin serialises as null).
                ("Origin", "null"),
                ("Sec-Fetch-Site", "same-origin"),
                ("Sec-Fetch-Mode", "navigate"),
            ],
            body=f"csrf={_csrf(session_id)}".encode(),
        )
        assert answer.status != 403, answer.body
        gone = await raw_http(
            sidecar.port, f"/{DB}/doc", headers=[("Cookie", f"SyncGatewaySession={session_id}")]
        )
        assert gone.status == 401


@pytest.mark.skipif(executable() is None, reason="chromium is not installed (make deps)")
async def test_sign_out_in_chromium() -> None:
    port, admin_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}/{DB}/_oidc_testing"
    provider = {
        "issuer": issuer,
        "client_id": "sync_gateway",
        "validation_key": "any",
        "register": True,
        "user_prefix": "test",
    }
    config = base_config(
        port,
        admin_port,
        demo_upstream=True,
        unsupported={"oidc_test_provider": {"enabled": True}},
        databases={DB: {"oidc": {"default_provider": "test", "providers": {"test": provider}}}},
    )
    base = f"http://127.0.0.1:{port}"
    async with (
        running_sidecar(config) as sidecar,
        Chromium.launch() as chrome,
        chrome.page("review-sign-out") as page,
    ):
        await until_ready(sidecar)
        await page.goto(f"{base}/{DB}/page")
        await page.fill("#username", "alice")
        await page.click_text("button", "Sign in")
        await page.wait_for_url(lambda url: url == f"{base}/{DB}/page")
        await page.goto(f"{base}/{DB}/_oidc_logout")
        await page.click_text("button", "Sign out")
        deadline = time.monotonic() + 10
        title = "Sign out?"
        while title == "Sign out?" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                title = str(await page.evaluate("document.title"))
            except Exception:  # mid-navigation
                continue
        assert title == "Signed out", await page.text()


# --- 2. Session ids in the admin listener's access log ------------------------------------------


async def test_admin_session_paths_never_log_the_session_id(
    upstream: Upstream,
    json_log: io.StringIO,  # noqa: F811
) -> None:
    async with _sidecar(upstream.url) as sidecar, aiohttp.ClientSession() as http:
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        async with http.get(f"{sidecar.admin_url}/{DB}/_session/{session_id}") as response:
            assert response.status == 200
        async with http.delete(f"{sidecar.admin_url}/{DB}/_session/{session_id}") as response:
            assert response.status == 200
    assert session_id not in json_log.getvalue()


# --- 3-5. The h1 upstream transport (the default) against answers of a raw upstream -----------


@asynccontextmanager
async def _raw_upstream(response: bytes) -> AsyncIterator[str]:
    """test_proxy's scripted raw upstream, its URL only."""
    async with _answering(response) as (url, _):
        yield url


async def _through_sidecar(response: bytes) -> Any:
    async with _raw_upstream(response) as url, _sidecar(url) as sidecar:
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        return await raw_http(
            sidecar.port, f"/{DB}/doc", headers=[("Cookie", f"SyncGatewaySession={session_id}")]
        )


async def test_upstream_reason_phrase_with_a_control_character_is_a_502() -> None:
    try:
        answer = await _through_sidecar(b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok")
    except (IndexError, ValueError):  # nothing came back: no status line to parse
        pytest.fail("the client got no answer at all")
    assert answer.status == 502


async def test_upstream_trailers_never_become_response_headers() -> None:
    answer = await _through_sidecar(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Trailer: t\r\nSet-Cookie: planted=1\r\n\r\n"
    )
    assert answer.status == 200
    assert answer.header("X-Trailer") == []
    # The sidecar's own session cookie may be set; the upstream's trailer never is.
    assert not any("planted" in cookie for cookie in answer.header("Set-Cookie"))


async def test_upstream_header_bytes_reach_the_client_unchanged() -> None:
    async with (
        _raw_upstream(
            b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nok"
        ) as url,
        _sidecar(url) as sidecar,
    ):
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(
            f"GET /{DB}/doc HTTP/1.1\r\nHost: x\r\nCookie: SyncGatewaySession={session_id}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert b"\r\nX-Name: caf\xc3\xa9\r\n" in data, data[:200]


# --- 6. Sign-out behind a trusted proxy ----------------------------------------------------------


async def test_logout_origin_through_a_trusted_proxy(upstream: Upstream) -> None:
    async with _sidecar(upstream.url, trusted_proxies=["127.0.0.1/32"]) as sidecar:
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        forwarded = [
            ("Cookie", f"SyncGatewaySession={session_id}"),
            ("X-Forwarded-Host", "sync.example.com"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("Origin", "https://sync.example.com"),
        ]
        # The Origin policy of POST /{db}/_session accepts this origin as the sidecar's own...
        session = await raw_http(sidecar.port, f"/{DB}/_session", method="POST", headers=forwarded)
        assert session.status == 200, session.body
        # ...and so should the sign-out.
        answer = await raw_http(
            sidecar.port,
            f"/{DB}/_oidc_logout",
            method="POST",
            headers=[
                *forwarded,
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Sec-Fetch-Site", "same-origin"),
            ],
            body=f"csrf={_csrf(session_id)}".encode(),
        )
        assert answer.status != 403, answer.body


# --- 7. Sign-out's return target is checked more loosely than the login's ----------------------


@pytest.mark.parametrize("rd", ["/%2F%2Fevil.example", "/%5Cevil.example", "/%09/evil.example"])
async def test_logout_rd_follows_the_return_target_rules(upstream: Upstream, rd: str) -> None:
    from sidecar.browser import safe_return_target

    assert safe_return_target(rd) is None  # the login refuses it
    async with _sidecar(upstream.url) as sidecar:
        answer = await raw_http(
            sidecar.port,
            f"/{DB}/_oidc_logout",
            method="POST",
            headers=[("Content-Type", "application/x-www-form-urlencoded")],
            body=f"rd={rd.replace('%', '%25')}".encode(),
        )
    assert answer.status == 200 and not answer.header("Location"), answer.header("Location")


# --- 8. The command line a newcomer meets --------------------------------------------------------


def _cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_bare_command_prints_help() -> None:
    result = _cli()
    # documented: the help on stdout, exit 2 (no command is a usage error)
    assert result.returncode == 2 and "usage:" in result.stdout, result.stderr


def test_port_in_use_is_one_clear_line(tmp_path: Any) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = base_config(port, free_port(), upstream="http://127.0.0.1:9", databases={DB: {}})
        path = tmp_path / "sidecar.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        result = _cli("run", "--config", str(path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert str(port) in result.stderr


# --- 9. aiohttp's own 400 quotes the request's bytes back (HttpOnly bypass) ---------------------


async def test_oversized_cookie_header_is_not_quoted_back(upstream: Upstream) -> None:
    async with _sidecar(upstream.url) as sidecar:
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        # What a browser sends once a script set many path=/ cookies: the session cookie
        # (Path=/db, longer path) first, the padding after it.
        padding = "; ".join(f"pad{i}={'x' * 1000}" for i in range(40))
        answer = await raw_http(
            sidecar.port,
            f"/{DB}/anything",
            headers=[("Cookie", f"SyncGatewaySession={session_id}; {padding}")],
        )
    assert answer.status in (400, 431)
    assert session_id.encode() not in answer.body, answer.body
    assert json.loads(answer.body)["error"]


# --- 10. Two tabs signing in at once -------------------------------------------------------------


async def test_two_tabs_signing_in_at_once_both_land() -> None:
    port, admin_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}/{DB}/_oidc_testing"
    provider = {
        "issuer": issuer,
        "client_id": "sync_gateway",
        "validation_key": "any",
        "register": True,
    }
    config = base_config(
        port,
        admin_port,
        demo_upstream=True,
        unsupported={"oidc_test_provider": {"enabled": True}},
        databases={DB: {"oidc": {"default_provider": "test", "providers": {"test": provider}}}},
    )
    base = f"http://127.0.0.1:{port}"
    page = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
    async with (
        running_sidecar(config) as sidecar,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        await until_ready(sidecar)
        callbacks = []
        for tab in ("tab1", "tab2"):  # both logins start before either comes back
            async with http.get(
                f"{base}/{DB}/_oidc?rd=/{DB}/{tab}", headers=page, allow_redirects=False
            ) as response:
                authorize = response.headers["Location"]
            async with http.post(
                f"{base}/{DB}/_oidc_testing/authenticate?{authorize.split('?', 1)[1]}",
                data={"username": "alice", "authenticated": "1"},
                allow_redirects=False,
            ) as response:
                callbacks.append(response.headers["Location"])
        for tab, callback in zip(("tab1", "tab2"), callbacks, strict=True):
            async with http.get(callback, headers=page, allow_redirects=False) as response:
                assert response.status == 302, await response.text()
                landing = response.headers["Location"]  # the did-the-cookie-stick hop
            async with http.get(
                f"{base}{landing}", headers=page, allow_redirects=False
            ) as response:
                assert response.status == 302, await response.text()
                assert response.headers["Location"].endswith(f"/{DB}/{tab}")


# --- 11. public_url with a path prefix -------------------------------------------------------------


async def test_cookie_path_follows_the_public_url_prefix(upstream: Upstream) -> None:
    async with _sidecar(upstream.url, public_url="https://sync.example.com/prefix") as sidecar:
        session_id = await admin_session(sidecar.admin_url, DB, "alice")
        # A session younger than 2 s gets its cookie sent again on a proxied answer.
        answer = await raw_http(
            sidecar.port, f"/{DB}/doc", headers=[("Cookie", f"SyncGatewaySession={session_id}")]
        )
    cookies = answer.header("Set-Cookie")
    assert cookies and "Path=/prefix/db" in cookies[0], cookies
