"""Both logouts against the real OP (npm oidc-provider): RP-initiated logout through its
end_session endpoint and back, and its back-channel logout ending a session, and the websockets
open on it, on two `sidecar run` processes sharing one redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import DB, LoginHarness, browser
from support.op import OPClient, OpenIDProvider, browser_login, browser_logout
from support.redis_server import RedisServer, free_port
from support.sidecar import Upstream, base_config, sidecar_process
from test_logout import _Form
from test_replicas import Replica
from yarl import URL

from sidecar.oidc.provider import parse_metadata

COOKIE = "SyncGatewaySession"


def logout_client(op: OpenIDProvider, *ports: int) -> OPClient:
    """A client whose callbacks, logout return page and back-channel URI are at `ports` (the
    back-channel URI at the first: the provider calls one URI per client)."""
    bases = [f"http://127.0.0.1:{port}/{DB}" for port in ports]
    client = OPClient(
        f"logout-{secrets.token_hex(4)}",
        secrets.token_urlsafe(24),
        tuple(f"{base}/_oidc_callback" for base in bases),
        post_logout_redirect_uris=tuple(f"{base}/_oidc_logout/done" for base in bases),
        backchannel_logout_uri=f"{bases[0]}/_oidc_backchannel_logout",
    )
    op.register_client(client)
    return client


async def csrf_form(http: aiohttp.ClientSession, url: str, rd: str) -> tuple[dict[str, str], str]:
    async with http.get(
        f"{url}/{DB}/_oidc_logout", params={"rd": rd}, headers={"Accept": "text/html"}
    ) as r:
        assert r.status == 200, await r.text()
        form = _Form()
        form.feed(await r.text())
        return form.fields, r.headers["Content-Security-Policy"]


async def test_rp_initiated_logout_through_the_provider_and_back(harness: LoginHarness) -> None:
    client = logout_client(harness.op, harness.port)
    await harness.start({"op": harness.provider(client)})
    async with browser() as http:
        login = await harness.login(http, "alice")
        assert login.status == 200, login.text
        session_id = login.body["session_id"]
        # The ID token kept for id_token_hint is sealed: the store holds no usable token.
        (record,) = await asyncio.to_thread(harness.redis.command, "KEYS", "sidecar:r:logout:*")
        stored = await asyncio.to_thread(harness.redis.command, "GET", record)
        assert login.body["id_token"].encode() not in stored
        assert login.body["id_token"].split(".")[1].encode() not in stored
        fields, csp = await csrf_form(http, harness.url, "/db/after")
        assert f"form-action 'self' {harness.op.issuer}" in csp  # the redirect to the OP
        out = await harness.request(
            http,
            "POST",
            f"{harness.url}/{DB}/_oidc_logout",
            data=fields,
            headers={"Origin": harness.url},
        )
        assert out.status == 302, out.text
        location = URL(out.headers["Location"])
        assert str(location.with_query(None)) == f"{harness.op.issuer}/session/end"
        assert location.query["client_id"] == client.client_id
        assert location.query["id_token_hint"] == login.body["id_token"]
        assert location.query["post_logout_redirect_uri"] == (
            f"{harness.url}/{DB}/_oidc_logout/done"
        )
        assert len(location.query["state"]) >= 32
        assert "Max-Age=0" in (out.cookie(COOKIE) or "")
        # Signed out here already, before the provider is even asked.
        async with aiohttp.ClientSession() as fresh:
            proxied = await harness.get(
                fresh, f"{harness.url}/{DB}/doc", headers={"Cookie": f"{COOKIE}={session_id}"}
            )
        assert proxied.status == 401

        back = await browser_logout(http, location)
        assert str(back.with_query(None)) == f"{harness.url}/{DB}/_oidc_logout/done"
        assert back.query["state"] == location.query["state"]
        done = await harness.get(http, back)
        assert (done.status, done.headers["Location"]) == (302, "/db/after")
        again = await harness.get(http, back)  # the state is single-use
        assert again.status == 200 and "Signed out" in again.text


@pytest.fixture
async def replicas(
    op: OpenIDProvider, fresh_redis: RedisServer, upstream: Upstream
) -> AsyncIterator[tuple[Replica, Replica, OPClient]]:
    a = Replica(free_port(), free_port())
    b = Replica(free_port(), free_port())
    client = logout_client(op, a.port, b.port)
    provider = {
        "issuer": op.issuer,
        "client_id": client.client_id,
        "validation_key": client.client_secret,
        "register": True,
        "user_prefix": "op",
    }

    def config(replica: Replica) -> dict[str, object]:
        return base_config(
            replica.port,
            replica.admin_port,
            upstream=upstream.url,
            session_store=fresh_redis.url,
            databases={DB: {"oidc": {"providers": {"op": provider}}}},
        )

    # sidecar_process waits for readiness with asyncio.run: in a thread, off this event loop.
    with contextlib.ExitStack() as stack:
        for replica in (a, b):
            await asyncio.to_thread(stack.enter_context, sidecar_process(config(replica)))
        yield a, b, client
        await asyncio.to_thread(stack.close)


async def close_code(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> object:
    """The code of the close frame the sidecar sends (1008: the session was revoked)."""
    msg = await ws.receive(timeout=seconds)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    return msg.data


async def test_a_logout_at_the_provider_ends_the_session_on_both_replicas(
    op: OpenIDProvider, replicas: tuple[Replica, Replica, OPClient]
) -> None:
    a, b, client = replicas
    async with browser() as http:
        async with http.get(f"{b.url}/{DB}/_oidc", allow_redirects=False) as r:
            assert r.status == 302
            start = r.headers["Location"]
        callback = await browser_login(http, start, username="zoe")
        async with http.get(callback, allow_redirects=False) as r:
            assert r.status == 200, await r.text()
            session_id = (await r.json())["session_id"]
        cookie = {"Cookie": f"{COOKIE}={session_id}"}
        async with aiohttp.ClientSession() as plain:
            on_a = await plain.ws_connect(f"{a.url}/{DB}/live", headers=cookie)
            on_b = await plain.ws_connect(f"{b.url}/{DB}/live", headers=cookie)
            for ws in (on_a, on_b):
                await ws.send_str("ping")
                assert (await ws.receive_str()) == "echo:ping"
            # The user signs out at the provider (its own end_session page, not the sidecar's):
            # it posts a logout token to replica A's back-channel endpoint.
            end = URL(f"{op.issuer}/session/end").with_query(
                client_id=client.client_id,
                post_logout_redirect_uri=f"{a.url}/{DB}/_oidc_logout/done",
            )
            back = await browser_logout(http, end)
            assert back.port == a.port
            assert await close_code(on_a, 5) == 1008
            assert await close_code(on_b, 5) == 1008
            for replica in (a, b):
                async with plain.get(f"{replica.url}/{DB}/doc", headers=cookie) as r:
                    assert r.status == 401


async def test_the_providers_logout_metadata_is_read(op: OpenIDProvider) -> None:
    async with aiohttp.ClientSession() as http, http.get(op.discovery_url) as r:
        document = await r.json()
    metadata = parse_metadata(document, expected_issuer=op.issuer)
    assert metadata.end_session_endpoint == f"{op.issuer}/session/end"
    assert metadata.backchannel_logout_supported
    assert metadata.backchannel_logout_session_supported
