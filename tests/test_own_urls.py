"""The URLs the sidecar builds for itself (callback, post-logout return, the test provider's
issuer) name the origin the client addressed — through a trusted proxy as it reports it —
and are never built from an invalid Host: the sidecar's own endpoints check the Host as the
proxied routes do. Raw bytes over a socket to the real sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from conftest import RawAnswer, admin_session, raw_exchange
from support.redis_server import free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar

from sidecar.browser import logout_csrf_token

PUBLIC = "sync.example.com"


@contextlib.asynccontextmanager
async def start(upstream: Upstream, **settings: Any) -> AsyncIterator[Sidecar]:
    port = free_port()
    provider = {
        "issuer": f"http://127.0.0.1:{port}/db/_oidc_testing",
        "client_id": "sync_gateway",
        "validation_key": "secret",
        "register": True,
    }
    if "public_url" in settings:
        settings["public_url"] = settings["public_url"].format(port=port)
    config = base_config(
        port,
        free_port(),
        upstream=upstream.url,
        unsupported={"oidc_test_provider": {"enabled": True}},
        databases={"db": {"oidc": {"providers": {"test": provider}}}},
        **settings,
    )
    async with running_sidecar(config) as sidecar:
        await ready(sidecar)
        yield sidecar


async def ready(sidecar: Sidecar) -> None:
    """Until the test provider's first discovery (from the sidecar itself) has succeeded."""
    async with asyncio.timeout(10), aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{sidecar.admin_url}/_ready") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.05)


async def send(
    sidecar: Sidecar,
    target: str,
    headers: Sequence[bytes] = (),
    *,
    host: bytes | None = None,
    method: bytes = b"GET",
    body: bytes = b"",
) -> RawAnswer:
    host = host if host is not None else f"127.0.0.1:{sidecar.port}".encode()
    lines = [method + b" " + target.encode() + b" HTTP/1.1", b"Host: " + host, *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return await raw_exchange(sidecar.port, b"\r\n".join(lines) + b"\r\n\r\n" + body)


FORWARDED = [b"X-Forwarded-Proto: https", b"X-Forwarded-Host: " + PUBLIC.encode()]


def redirect_uri(answer: RawAnswer) -> str:
    assert answer.status == 302, answer.body
    return parse_qs(urlsplit(answer.header("Location")[0]).query)["redirect_uri"][0]


@pytest.mark.parametrize(
    ("trusted", "headers", "expected"),
    [
        (True, FORWARDED, f"https://{PUBLIC}/db/_oidc_callback"),
        (True, [b"Forwarded: proto=https;host=" + PUBLIC.encode()], f"https://{PUBLIC}"),
        (True, [], "http://127.0.0.1:{port}/db/_oidc_callback"),
        (False, FORWARDED, "http://127.0.0.1:{port}/db/_oidc_callback"),  # claims ignored
    ],
)
async def test_the_callback_url_is_the_clients_view(
    upstream: Upstream, trusted: bool, headers: list[bytes], expected: str
) -> None:
    async with start(upstream, trusted_proxies=["127.0.0.1/32"] if trusted else []) as sidecar:
        uri = redirect_uri(await send(sidecar, "/db/_oidc", headers))
        assert uri.startswith(expected.format(port=sidecar.port))


async def test_the_test_providers_issuer_is_the_clients_view(upstream: Upstream) -> None:
    async with start(upstream, trusted_proxies=["127.0.0.1/32"]) as sidecar:
        path = "/db/_oidc_testing/.well-known/openid-configuration"
        answer = await send(sidecar, path, FORWARDED)
        assert answer.status == 200
        meta = json.loads(answer.body)
        assert meta["issuer"] == f"https://{PUBLIC}/db/_oidc_testing"
        assert meta["authorization_endpoint"].startswith(f"https://{PUBLIC}/db/_oidc_testing/")


async def test_public_url_wins_over_any_host(upstream: Upstream) -> None:
    async with start(
        upstream, public_url="http://127.0.0.1:{port}/", trusted_proxies=["127.0.0.1/32"]
    ) as sidecar:
        uri = redirect_uri(await send(sidecar, "/db/_oidc", FORWARDED))
        assert uri == f"http://127.0.0.1:{sidecar.port}/db/_oidc_callback"


async def test_a_trusted_proxys_invalid_forwarded_host_builds_no_url(upstream: Upstream) -> None:
    async with start(upstream, trusted_proxies=["127.0.0.1/32"]) as sidecar:
        answer = await send(sidecar, "/db/_oidc", [b"X-Forwarded-Host: u@evil.example"])
        assert answer.status == 400
        assert json.loads(answer.body)["reason"] == "invalid Host header"


# Every endpoint of the sidecar's own, not only the proxied routes: (method, target).
OWN_ENDPOINTS = [
    ("GET", "/db/_oidc"),
    ("GET", "/db/_oidc_challenge"),
    ("GET", "/db/_oidc_callback?code=c&state=s"),
    ("GET", "/db/_oidc_logout"),
    ("GET", "/db/_oidc_testing/.well-known/openid-configuration"),
    ("GET", "/db/_session"),
    ("GET", "/_health"),
    ("GET", "/"),  # the catch-all 404
]


BAD_HOSTS = [b"evil.example/x", b"user@evil.example", b"a b", b"<script>", b"host:99999"]


@pytest.mark.parametrize(("method", "target"), OWN_ENDPOINTS)
async def test_invalid_host_is_refused_on_every_own_endpoint(
    upstream: Upstream, method: str, target: str
) -> None:
    async with start(upstream) as sidecar:
        for host in BAD_HOSTS:  # one sidecar per endpoint: each host is its own request
            answer = await send(sidecar, target, host=host, method=method.encode())
            assert answer.status == 400, (host, answer.body)
            assert json.loads(answer.body) == {
                "error": "Bad Request",
                "reason": "invalid Host header",
            }
        assert upstream.requests == []


async def test_the_sign_out_origin_check_sees_the_clients_view(upstream: Upstream) -> None:
    """Behind a TLS ingress the browser's Origin is the public https one: the sign-out POST's
    Origin check compares it with the client's view, not the raw connection's."""
    async with start(upstream, trusted_proxies=["127.0.0.1/32"]) as sidecar:
        session_id = await admin_session(sidecar.admin_url, "db", "carol")
        form = f"csrf={logout_csrf_token(session_id)}".encode()
        headers = [
            *FORWARDED,
            b"Cookie: SyncGatewaySession=" + session_id.encode(),
            b"Origin: https://" + PUBLIC.encode(),
            b"Content-Type: application/x-www-form-urlencoded",
        ]
        answer = await send(sidecar, "/db/_oidc_logout", headers, method=b"POST", body=form)
        assert answer.status == 200, answer.body
        assert b"Signed out" in answer.body
