"""A real sidecar whose database `db` signs in with the built-in test provider, and the
steps of a login through it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
from yarl import URL

from sidecar.sessions.cookies import STATE_COOKIE
from support.redis_server import free_port
from support.sidecar import Sidecar, base_config, running_sidecar

DB = "db"


async def until_ready(sidecar: Sidecar) -> None:
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{sidecar.admin_url}/_ready") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("sidecar not ready")


@asynccontextmanager
async def builtin_sidecar(
    callback_url: str | None = None, cors: dict[str, Any] | None = None, **settings: Any
) -> AsyncIterator[Sidecar]:
    """The sidecar (`settings` added to its config); `callback_url`: the provider's; `cors`:
    the database's cors block."""
    port = free_port()
    provider = {
        "issuer": f"http://127.0.0.1:{port}/{DB}/_oidc_testing",
        "client_id": "sync_gateway",
        "validation_key": "any",
        "register": True,
    }
    if callback_url is not None:
        provider["callback_url"] = callback_url
    config = base_config(
        port,
        free_port(),
        demo_upstream=True,
        unsupported={"oidc_test_provider": {"enabled": True}},
        databases={
            DB: {
                "oidc": {"default_provider": "test", "providers": {"test": provider}},
                "cors": cors or {},
            }
        },
        **settings,
    )
    async with running_sidecar(config) as sidecar:
        await until_ready(sidecar)
        yield sidecar


def state_cookie(response: aiohttp.ClientResponse) -> Any:
    jar: SimpleCookie = SimpleCookie()
    for value in response.headers.getall("Set-Cookie", []):
        jar.load(value)
    return jar.get(STATE_COOKIE)


async def start_login(http: aiohttp.ClientSession, sidecar: Sidecar, cookie: str | None) -> Any:
    """GET /db/_oidc as an API client carrying `cookie` as the state cookie; returns the
    authorization URL and the state cookie set."""
    headers = {"Cookie": f"{STATE_COOKIE}={cookie}"} if cookie else {}
    async with http.get(
        f"{sidecar.url}/{DB}/_oidc", headers=headers, allow_redirects=False
    ) as response:
        assert response.status == 302
        return URL(response.headers["Location"]), state_cookie(response)


async def answer_for(
    http: aiohttp.ClientSession, authorize: URL, username: str = "alice"
) -> dict[str, str]:
    """The test provider's answer to the login of `authorize`: code, state and iss."""
    form = {**authorize.query, "username": username, "authenticated": "1"}
    async with http.post(
        authorize.with_query(None).with_name("authenticate"), data=form, allow_redirects=False
    ) as response:
        assert response.status == 302, await response.text()
        return dict(URL(response.headers["Location"]).query)
