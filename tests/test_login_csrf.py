"""Login CSRF: a page of another site sends the visitor's browser to the sidecar with the
attacker's own credentials (a refresh token, a code and state) to sign the visitor in as the
attacker. Real sidecar, real built-in test provider."""

from __future__ import annotations

import aiohttp
import pytest
from support.builtin_provider import DB, answer_for, builtin_sidecar, start_login
from support.sidecar import Sidecar
from yarl import URL

from sidecar.browser import is_cross_site
from sidecar.sessions.cookies import STATE_COOKIE

COOKIE = "SyncGatewaySession"
NAVIGATE = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}


async def _attackers_tokens(http: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, str]:
    """The attacker signs in as themselves (an API client: the callback's JSON)."""
    authorize, cookie = await start_login(http, sidecar, None)
    answer = await answer_for(http, authorize, username="mallory")
    async with http.get(
        f"{sidecar.url}/{DB}/_oidc_callback",
        params=answer,
        headers={"Cookie": f"{STATE_COOKIE}={cookie.value}"},
    ) as response:
        assert response.status == 200, await response.text()
        body: dict[str, str] = await response.json()
    return body


APP = "https://app.example.com"  # in the database's cors.origin


@pytest.mark.parametrize(
    ("site", "origin", "cookie_set"),
    [
        (None, None, True),  # Couchbase Lite, curl: as Sync Gateway
        ("same-origin", None, True),
        ("same-site", None, True),
        ("none", None, True),  # typed in the address bar
        ("cross-site", None, False),  # a navigation or no-cors request from another site
        ("CROSS-SITE ", None, False),
        ("cross-site", "https://evil.example", False),  # a CORS request from an unlisted site
        ("cross-site", "null", False),
        ("cross-site", APP, True),  # a CORS request from a listed site: it reads the answer
    ],
)
async def test_refresh_from_another_site_sets_no_session_cookie(
    site: str | None, origin: str | None, cookie_set: bool
) -> None:
    async with (
        builtin_sidecar(cors={"origin": [APP]}) as sidecar,
        aiohttp.ClientSession() as http,
    ):
        tokens = await _attackers_tokens(http, sidecar)
        headers = {**NAVIGATE, "Sec-Fetch-Site": site} if site is not None else {}
        if origin is not None:
            headers |= {"Origin": origin, "Sec-Fetch-Mode": "cors"}
        async with http.get(
            f"{sidecar.url}/{DB}/_oidc_refresh",
            params={"refresh_token": tokens["refresh_token"]},
            headers=headers,
        ) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
            cookies = response.headers.getall("Set-Cookie", [])
    assert body["name"].endswith("_mallory") and body["session_id"]  # the JSON answer stands
    assert any(c.startswith(f"{COOKIE}=") for c in cookies) is cookie_set, cookies


@pytest.mark.parametrize("victim_state", [None, "own"])
async def test_callback_with_the_attackers_code_and_state_is_refused(
    victim_state: str | None,
) -> None:
    """The callback needs no Sec-Fetch-Site rule: its state must be pending in the browser's
    own state cookie, which a cross-site page cannot set."""
    async with builtin_sidecar() as sidecar, aiohttp.ClientSession() as http:
        # The attacker starts a login and stops at the provider's answer (code and state).
        authorize, _ = await start_login(http, sidecar, None)
        attackers = await answer_for(http, authorize, username="mallory")
        headers = {**NAVIGATE, "Sec-Fetch-Site": "cross-site", "Accept": "text/html"}
        if victim_state == "own":  # the visitor has a login of their own under way
            own, cookie = await start_login(http, sidecar, None)
            headers["Cookie"] = f"{STATE_COOKIE}={cookie.value}"
        async with http.get(
            URL(f"{sidecar.url}/{DB}/_oidc_callback").with_query(attackers),
            headers=headers,
            allow_redirects=False,
        ) as response:
            assert response.status == 400
            assert not any(
                c.startswith(f"{COOKIE}=") for c in response.headers.getall("Set-Cookie", [])
            )


@pytest.mark.parametrize(
    ("headers", "cross"),
    [
        ({}, False),
        ({"Sec-Fetch-Site": "cross-site"}, True),
        ({"Sec-Fetch-Site": " Cross-Site"}, True),
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Sec-Fetch-Site": "same-origin"}, False),
        ({"Sec-Fetch-Site": "none"}, False),
        ({"Sec-Fetch-Site": "cross-sitex"}, False),
    ],
)
def test_is_cross_site(headers: dict[str, str], cross: bool) -> None:
    assert is_cross_site(headers) is cross
