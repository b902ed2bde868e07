"""Genuine credentials for the benchmark: an Apache session from a real login, an ID token from the
OP, and a sidecar session from its admin API.
"""

from __future__ import annotations

import aiohttp
from harness import BenchError
from services import DB, Apache, ProxyUnderTest, Sidecar
from yarl import URL

from tests.support.op import OPClient, OpenIDProvider, browser_login, get_tokens

APACHE_SESSION_COOKIE = "mod_auth_openidc_session"
SIDECAR_SESSION_COOKIE = "SyncGatewaySession"


async def apache_session_cookie(apache: Apache, username: str = "alice") -> str:
    """Logs in at Apache like a browser: protected URL → OP login and consent → Apache's
    redirect_uri (code exchange, ID token validation) → the session cookie Apache sets."""
    jar = aiohttp.CookieJar(unsafe=True)  # unsafe: cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        async with session.get(apache.session_url, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status != 302 or not location:
                text = await response.text()
                raise BenchError(
                    f"Apache did not redirect to the OP: {response.status} {text[:300]}"
                )
        callback = await browser_login(
            session, location, username=username, redirect_uri=apache.client.redirect_uri
        )
        async with session.get(callback, allow_redirects=False) as response:
            text = await response.text()
            if response.status != 302:
                raise BenchError(f"Apache's redirect_uri answered {response.status}: {text[:500]}")
        for cookie in jar:
            if cookie.key == APACHE_SESSION_COOKIE:
                return cookie.value
    raise BenchError("Apache set no mod_auth_openidc_session cookie after the login")


async def id_token(op: OpenIDProvider, client: OPClient, username: str = "alice") -> str:
    """A real RS256 ID token from a whole auth code flow at the OP."""
    tokens = await get_tokens(op, client, username)
    token = tokens.get("id_token")
    if not isinstance(token, str):
        raise BenchError(f"the OP returned no id_token: {sorted(tokens)}")
    return token


async def sidecar_sessions(sidecar: Sidecar, users: list[str], ttl: int = 86400) -> list[str]:
    """One session per user, created through the admin API (Sync Gateway's custom auth)."""
    admin = URL(sidecar.admin)
    ids = []
    async with aiohttp.ClientSession() as session:
        for name in users:
            async with session.put(admin / DB / "_user" / name, json={}) as response:
                if response.status not in (200, 201):
                    raise BenchError(f"PUT _user/{name}: {response.status} {await response.text()}")
            async with session.post(
                admin / DB / "_session", json={"name": name, "ttl": ttl}
            ) as response:
                body = await response.json(content_type=None)
                if response.status != 200 or "session_id" not in body:
                    raise BenchError(f"POST _session: {response.status} {body}")
                ids.append(str(body["session_id"]))
    return ids


async def proxy_headers(proxy: ProxyUnderTest, users: list[str]) -> list[dict[str, str]]:
    """Request headers that authenticate at `proxy`: one session cookie per user (none: plain)."""
    if proxy.sidecar is None:
        return [{}]
    ids = await sidecar_sessions(proxy.sidecar, users)
    return [{"Cookie": f"{SIDECAR_SESSION_COOKIE}={session_id}"} for session_id in ids]
