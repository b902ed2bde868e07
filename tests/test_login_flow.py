"""The Sync Gateway-compatible login flow end to end: the real sidecar, the real OP (npm
oidc-provider) driven like a browser, the built-in test provider, a real redis-server."""

from __future__ import annotations

import base64
import json
import logging
import time
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from http.cookies import Morsel, SimpleCookie
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from conftest import (
    DB,
    Answer,
    LoginHarness,
    browser,
    builtin_provider,
    forget_refresh_outcome,
)
from support.op import browser_login, get_tokens
from yarl import URL

SESSION_COOKIE = "SyncGatewaySession"
STATE_COOKIE = "sg-oidc-state"


def morsel(answer: Answer, name: str) -> Morsel[str]:
    line = answer.cookie(name)
    assert line is not None, f"no {name} cookie in {answer.set_cookies}"
    jar: SimpleCookie = SimpleCookie()
    jar.load(line)
    return jar[name]


def claims_of(id_token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (the sidecar verified it; the test only reads it)."""
    payload = id_token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def last_header(h: LoginHarness, name: str) -> str | None:
    values = h.upstream.header(-1, name)
    return values[0] if values else None


# --- 1. the flow against the real OP -----------------------------------------------------------


async def test_oidc_redirects_with_the_authorization_request_and_sets_the_state_cookie(
    harness: LoginHarness,
) -> None:
    client = await harness.start_op()
    async with browser() as http:
        answer = await harness.get(http, f"{harness.url}/{DB}/_oidc")
        again = await harness.get(http, f"{harness.url}/{DB}/_oidc")
    assert answer.status == 302
    location = URL(answer.headers["Location"])
    assert str(location.with_query(None)) == harness.op.authorization_endpoint
    query = location.query
    assert sorted(query) == sorted(
        [
            "client_id",
            "redirect_uri",
            "response_type",
            "scope",
            "state",
            "nonce",
            "code_challenge",
            "code_challenge_method",
        ]
    )
    assert query["client_id"] == client.client_id
    assert query["redirect_uri"] == harness.callback()
    assert query["response_type"] == "code"
    assert query["scope"] == "openid email"
    assert len(query["state"]) >= 27  # >= 160 bits of base64url
    assert len(query["nonce"]) >= 27
    assert len(query["code_challenge"]) == 43  # base64url(SHA-256), RFC 7636 4.2
    assert query["code_challenge_method"] == "S256"
    # Every login gets its own state, nonce and PKCE pair.
    other = URL(again.headers["Location"]).query
    for name in ("state", "nonce", "code_challenge"):
        assert other[name] != query[name]

    state = morsel(answer, STATE_COOKIE)
    assert state.value == query["state"]
    assert state["httponly"] is True
    assert state["path"] == f"/{DB}"
    assert state["max-age"] == "300"
    assert not state["secure"]  # plain http here; Secure when the request came over TLS
    assert answer.cookie(SESSION_COOKIE) is None
    assert harness.upstream.requests == []


@pytest.mark.parametrize(
    ("offline", "expected"),
    [
        ("true", {"access_type": "offline", "prompt": "consent"}),
        ("false", {}),
        ("TRUE", {}),  # Sync Gateway compares with exactly "true"
        ("1", {}),
        ("", {}),
    ],
)
async def test_offline_adds_access_type_and_prompt(
    harness: LoginHarness, offline: str, expected: dict[str, str]
) -> None:
    await harness.start_op()
    async with browser() as http:
        for endpoint in ("_oidc", "_oidc_challenge"):
            answer = await harness.get(http, f"{harness.url}/{DB}/{endpoint}?offline={offline}")
            if endpoint == "_oidc":
                url = URL(answer.headers["Location"])
            else:
                url = URL(answer.headers["WWW-Authenticate"].split('"')[1])
            got = {k: url.query[k] for k in ("access_type", "prompt") if k in url.query}
            assert got == expected


async def test_offline_login_completes_at_the_op(harness: LoginHarness) -> None:
    """prompt=consent makes the OP ask again; the flow still ends in tokens and a session."""
    await harness.start_op()
    async with browser() as http:
        first = await harness.login(http, "alice")
        offline = await harness.login(http, "alice", offline="true")
    assert first.status == offline.status == 200, offline.text
    assert offline.body["refresh_token"] and offline.body["session_id"]


async def test_full_flow_gives_tokens_a_session_cookie_and_proxied_access(
    harness: LoginHarness,
) -> None:
    client = await harness.start_op(user_prefix="op", channels_claim="channels")
    async with browser() as http:
        start = await harness.start_login(http)
        callback = await browser_login(http, start, username="alice")
        answer = await harness.get(http, callback)
        assert answer.status == 200, answer.text
        assert answer.headers["Content-Type"].startswith("application/json")
        assert answer.headers["Cache-Control"] == "no-store"
        body = answer.body
        assert sorted(body) == ["id_token", "name", "refresh_token", "session_id"]
        assert body["name"] == "op_alice"
        claims = claims_of(body["id_token"])
        assert claims["iss"] == harness.op.issuer
        assert claims["aud"] == client.client_id
        assert claims["sub"] == "alice"
        assert claims["nonce"] == start.query["nonce"]

        session = morsel(answer, SESSION_COOKIE)
        assert session.value == body["session_id"]
        assert session["path"] == f"/{DB}"
        assert session["httponly"] is True
        expires = parsedate_to_datetime(session["expires"]).timestamp()
        assert abs(expires - (time.time() + 86400)) < 60  # 24 h idle session
        state = morsel(answer, STATE_COOKIE)  # the state cookie is deleted on success
        assert state.value == "" and state["max-age"] == "0"

        # The cookie now authenticates proxied requests...
        proxied = await harness.get(http, f"{harness.url}/{DB}/doc?rev=1")
        assert proxied.status == 200
        assert proxied.body["path"] == "/db/doc?rev=1"
        assert last_header(harness, "X-Forwarded-User") == "op_alice"
        assert last_header(harness, "X-Forwarded-Email") == "alice@example.com"
        assert last_header(harness, "X-Forwarded-Channels") == "news,sports"
        # ... and the sidecar keeps its credential to itself.
        forwarded_cookies = ";".join(harness.upstream.header(-1, "Cookie"))
        assert body["session_id"] not in forwarded_cookies

        # ... and GET /{db}/_session.
        me = await harness.get(http, f"{harness.url}/{DB}/_session")
        assert me.status == 200
        assert me.body == {
            "authentication_handlers": ["default", "cookie"],
            "ok": True,
            "userCtx": {"channels": {"news": 1, "sports": 1}, "name": "op_alice"},
        }

    # The ID token works as a bearer token on its own (no cookie jar here).
    async with aiohttp.ClientSession() as plain:
        bearer = await harness.get(
            plain,
            f"{harness.url}/{DB}/doc",
            headers={"Authorization": f"Bearer {body['id_token']}"},
        )
    assert bearer.status == 200
    assert last_header(harness, "X-Forwarded-User") == "op_alice"
    assert await harness.stored("sessions") == 1


async def test_oidc_challenge_answers_401_with_the_login_url(harness: LoginHarness) -> None:
    client = await harness.start_op()
    async with browser() as http:
        answer = await harness.get(http, f"{harness.url}/{DB}/_oidc_challenge")
        assert answer.status == 401
        assert answer.body == {"error": "Unauthorized", "reason": "Login required"}
        challenge = answer.headers["WWW-Authenticate"]
        assert challenge.startswith('OIDC login="') and challenge.endswith('"')
        login_url = URL(challenge.removeprefix('OIDC login="').removesuffix('"'))
        assert str(login_url.with_query(None)) == harness.op.authorization_endpoint
        assert login_url.query["client_id"] == client.client_id
        assert login_url.query["code_challenge_method"] == "S256"
        assert morsel(answer, STATE_COOKIE).value == login_url.query["state"]

        # Couchbase Lite follows the URL, then calls the callback: a normal login.
        callback = await browser_login(http, login_url, username="alice")
        done = await harness.get(http, callback)
    assert done.status == 200, done.text
    assert done.body["session_id"]


@pytest.mark.parametrize(
    ("secret", "client_method", "provider_method"),
    [
        ("a:b%c+d e f  :%20+%2B", "client_secret_basic", "auto"),
        ("a:b%c+d e f  :%20+%2B", "client_secret_basic", "client_secret_basic"),
        ("p:o%s+t w/ spaces", "client_secret_post", "client_secret_post"),
    ],
)
async def test_client_authentication_methods(
    harness: LoginHarness, secret: str, client_method: str, provider_method: str
) -> None:
    """RFC 6749 2.3.1: the Basic pair is form-encoded first, so `:` `%` `+` and spaces survive."""
    client = harness.client(secret=secret, auth_method=client_method)
    await harness.start(
        {"op": harness.provider(client, token_endpoint_auth_method=provider_method)}
    )
    async with browser() as http:
        answer = await harness.login(http, "alice")
    assert answer.status == 200, answer.text
    assert answer.body["session_id"]


async def test_wrong_client_secret_is_a_provider_error(harness: LoginHarness) -> None:
    """The OP refuses the sidecar's client authentication: our configuration's fault, so a 502
    (not the caller's 401), and no session."""
    client = harness.client()
    await harness.start({"op": harness.provider(client, validation_key="not-the-secret")})
    async with browser() as http:
        answer = await harness.login(http, "alice")
    assert answer.status == 502
    assert "invalid_client" in answer.body["reason"]
    assert answer.cookie(SESSION_COOKIE) is None
    assert await harness.stored("sessions") == 0


async def test_cookie_secure_always_and_a_custom_cookie_name(harness: LoginHarness) -> None:
    """`session.cookie_secure: always` (TLS ends before the sidecar) marks both cookies Secure;
    `session_cookie_name` renames the session cookie, which the admin API reports too."""
    client = harness.client()
    oidc = {"providers": {"op": harness.provider(client)}}
    await harness.start(
        {"op": harness.provider(client)},
        more_databases={DB: {"oidc": oidc, "session_cookie_name": "MySession"}},
        session={"cookie_secure": "always"},
    )
    async with browser() as http:
        start = await harness.get(http, f"{harness.url}/{DB}/_oidc")
        assert morsel(start, STATE_COOKIE)["secure"] is True
        callback = await browser_login(http, start.headers["Location"], username="alice")
        # A Secure cookie never travels over plain http: send it by hand, as a TLS hop would.
        state = callback.query["state"]
        answer = await harness.get(http, callback, headers={"Cookie": f"{STATE_COOKIE}={state}"})
    assert answer.status == 200, answer.text
    assert answer.cookie(SESSION_COOKIE) is None
    session = morsel(answer, "MySession")
    assert session.value == answer.body["session_id"] and session["secure"] is True
    async with aiohttp.ClientSession() as plain:
        proxied = await harness.get(
            plain, f"{harness.url}/{DB}/doc", headers={"Cookie": f"MySession={session.value}"}
        )
        assert proxied.status == 200
        ignored = await harness.get(
            plain,
            f"{harness.url}/{DB}/doc",
            headers={"Cookie": f"{SESSION_COOKIE}={session.value}"},
        )
        assert ignored.status == 401
        info = await harness.get(plain, f"{harness.admin_url}/{DB}/_session/{session.value}")
    assert info.body["cookie_name"] == "MySession"


# --- 2. the reference's behaviour table --------------------------------------------------------


def user_url(h: LoginHarness, name: str) -> URL:
    """The admin URL of a user; names hold `%` and `:`, so the segment is escaped."""
    return URL(f"{h.admin_url}/{DB}/_user/{quote(name, safe='')}", encoded=True)


async def admin_user(h: LoginHarness, name: str) -> Answer:
    async with aiohttp.ClientSession() as http:
        return await h.get(http, user_url(h, name))


@pytest.mark.parametrize(
    ("options", "username", "expected"),
    [
        ({}, "alice", "127.0.0.1%3A{op_port}_alice"),  # issuer host+path, query-escaped
        ({"user_prefix": "op"}, "alice", "op_alice"),
        ({"username_claim": "email"}, "alice", "alice%40example.com"),
        ({"username_claim": "email", "user_prefix": "op"}, "alice", "op_alice%40example.com"),
        ({"username_claim": "employee_number"}, "alice", "80249751"),
        ({"username_claim": "preferred_username"}, "alice", None),  # profile scope not asked
        ({"username_claim": "preferred_username", "scope": ["openid", "profile"]}, "bob", "bob"),
        ({"user_prefix": "op"}, "{bernard}", "op_%7Bbernard%7D"),
    ],
)
async def test_user_names(
    harness: LoginHarness, options: dict[str, Any], username: str, expected: str | None
) -> None:
    await harness.start_op(**options)
    async with browser() as http:
        answer = await harness.login(http, username)
    if expected is None:  # a missing username claim fails the login and creates no one
        assert answer.status == 401
        assert answer.body == {"error": "Unauthorized", "reason": "Invalid login"}
        assert answer.cookie(SESSION_COOKIE) is None
        assert await harness.stored("users") == 0
        return
    name = expected.format(op_port=harness.op.port)
    assert answer.status == 200, answer.text
    assert answer.body["name"] == name
    user = await admin_user(harness, name)
    assert user.status == 200
    assert user.body["jwt_issuer"] == harness.op.issuer


async def test_register_false_refuses_unknown_users_and_admits_known_ones(
    harness: LoginHarness,
) -> None:
    await harness.start_op(register=False, user_prefix="op")
    async with browser() as http:
        refused = await harness.login(http, "alice")
    assert refused.status == 401
    assert refused.body == {"error": "Unauthorized", "reason": "Invalid login"}
    assert refused.cookie(SESSION_COOKIE) is None
    assert (await admin_user(harness, "op_alice")).status == 404
    assert await harness.stored("sessions") == 0

    async with aiohttp.ClientSession() as admin:
        created = await harness.request(
            admin, "PUT", f"{harness.admin_url}/{DB}/_user/op_alice", json={"name": "op_alice"}
        )
    assert created.status == 201
    async with browser() as http:
        admitted = await harness.login(http, "alice")
        assert admitted.status == 200, admitted.text
        assert admitted.body["name"] == "op_alice"
        assert (await harness.get(http, f"{harness.url}/{DB}/doc")).status == 200
    user = await admin_user(harness, "op_alice")
    assert user.body["email"] == "alice@example.com"  # updated from the token on login
    assert user.body["jwt_issuer"] == harness.op.issuer


async def test_roles_and_channels_claims_are_granted_and_cleared_when_missing(
    harness: LoginHarness,
) -> None:
    """Two providers at the same OP name the same user (same prefix); the second one's
    roles/channels claims are absent from the token, so logging in through it clears the
    token-granted grants while the admin-granted ones stay."""
    client = harness.client(providers=(None, "other"))
    await harness.start(
        {
            "main": harness.provider(
                client, user_prefix="op", roles_claim="roles", channels_claim="channels"
            ),
            "other": harness.provider(
                client, user_prefix="op", roles_claim="groups", channels_claim="no_channels"
            ),
        },
        default="main",
    )
    async with browser() as http:
        first = await harness.login(http, "alice")
        assert first.status == 200, first.text
        assert (await harness.get(http, f"{harness.url}/{DB}/doc")).status == 200
    assert last_header(harness, "X-Forwarded-Roles") == "editor"
    assert last_header(harness, "X-Forwarded-Channels") == "news,sports"
    user = (await admin_user(harness, "op_alice")).body
    assert user["jwt_roles"] == ["editor"]
    assert user["jwt_channels"] == ["news", "sports"]
    assert user["admin_roles"] == [] and user["admin_channels"] == []
    assert user["jwt_last_updated"]

    async with aiohttp.ClientSession() as admin:
        put = await harness.request(
            admin,
            "PUT",
            f"{harness.admin_url}/{DB}/_user/op_alice",
            json={"admin_roles": ["staff"], "admin_channels": ["hq"]},
        )
    assert put.status == 200

    async with browser() as http:
        second = await harness.login(http, "alice", provider="other")
        assert second.status == 200, second.text
        assert second.body["name"] == "op_alice"
        assert (await harness.get(http, f"{harness.url}/{DB}/doc")).status == 200
    assert last_header(harness, "X-Forwarded-Roles") == "staff"
    assert last_header(harness, "X-Forwarded-Channels") == "hq"
    user = (await admin_user(harness, "op_alice")).body
    assert user["jwt_roles"] == [] and user["jwt_channels"] == []
    assert user["admin_roles"] == ["staff"] and user["admin_channels"] == ["hq"]
    assert user["roles"] == ["staff"] and user["all_channels"] == ["hq"]


async def test_include_access_adds_the_access_token(harness: LoginHarness) -> None:
    await harness.start_op(include_access=True)
    async with browser() as http:
        answer = await harness.login(http, "alice")
    assert answer.status == 200, answer.text
    assert sorted(answer.body) == [
        "access_token",
        "expires_in",
        "id_token",
        "name",
        "refresh_token",
        "session_id",
        "token_type",
    ]
    assert answer.body["token_type"] == "Bearer"
    assert isinstance(answer.body["expires_in"], int) and answer.body["expires_in"] > 0


async def test_disable_session_gives_tokens_but_no_session(harness: LoginHarness) -> None:
    await harness.start_op(disable_session=True)
    async with browser() as http:
        answer = await harness.login(http, "alice")
        assert answer.status == 200, answer.text
        assert sorted(answer.body) == ["id_token", "name", "refresh_token"]
        assert answer.cookie(SESSION_COOKIE) is None
        assert morsel(answer, STATE_COOKIE)["max-age"] == "0"
        assert (await harness.get(http, f"{harness.url}/{DB}/doc")).status == 401
        bearer = {"Authorization": f"Bearer {answer.body['id_token']}"}
        assert (await harness.get(http, f"{harness.url}/{DB}/doc", headers=bearer)).status == 200
        refreshed = await harness.get(
            http,
            f"{harness.url}/{DB}/_oidc_refresh",
            params={"refresh_token": answer.body["refresh_token"]},
        )
        assert refreshed.status == 200, refreshed.text
        assert sorted(refreshed.body) == ["id_token", "name", "refresh_token"]  # rotated
        assert refreshed.cookie(SESSION_COOKIE) is None
    assert await harness.stored("sessions") == 0


# --- 4. refresh --------------------------------------------------------------------------------


async def test_refresh_gives_a_new_id_token_and_session(harness: LoginHarness) -> None:
    await harness.start_op(user_prefix="op", include_access=False)
    async with browser() as http:
        login = await harness.login(http, "alice")
        assert login.status == 200, login.text
        refresh_token = login.body["refresh_token"]
        refreshed = await harness.get(
            http, f"{harness.url}/{DB}/_oidc_refresh", params={"refresh_token": refresh_token}
        )
        assert refreshed.status == 200, refreshed.text
        # The OP rotates refresh tokens: the answer carries the new one.
        assert sorted(refreshed.body) == ["id_token", "name", "refresh_token", "session_id"]
        assert refreshed.body["refresh_token"] != refresh_token
        assert refreshed.body["name"] == "op_alice"
        assert refreshed.body["session_id"] != login.body["session_id"]
        assert claims_of(refreshed.body["id_token"])["sub"] == "alice"
        cookie = morsel(refreshed, SESSION_COOKIE)
        assert cookie.value == refreshed.body["session_id"] and cookie["path"] == f"/{DB}"
        assert refreshed.headers["Cache-Control"] == "no-store"
        assert (await harness.get(http, f"{harness.url}/{DB}/doc")).status == 200  # new cookie

        # Used again within seconds, the token answers what its refresh answered...
        repeat = await harness.get(
            http, f"{harness.url}/{DB}/_oidc_refresh", params={"refresh_token": refresh_token}
        )
        assert repeat.status == 200, repeat.text
        assert repeat.body["refresh_token"] == refreshed.body["refresh_token"]
        # ...and after that it is dead: the OP rotated it away.
        await forget_refresh_outcome(harness, refresh_token)
        replay = await harness.get(
            http, f"{harness.url}/{DB}/_oidc_refresh", params={"refresh_token": refresh_token}
        )
    assert replay.status == 401
    assert replay.cookie(SESSION_COOKIE) is None
    assert await harness.stored("sessions") == 3


async def test_refresh_with_include_access(harness: LoginHarness) -> None:
    await harness.start_op(include_access=True)
    async with browser() as http:
        login = await harness.login(http, "alice")
        refreshed = await harness.get(
            http,
            f"{harness.url}/{DB}/_oidc_refresh",
            params={"refresh_token": login.body["refresh_token"]},
        )
    assert refreshed.status == 200, refreshed.text
    assert sorted(refreshed.body) == [
        "access_token",
        "expires_in",
        "id_token",
        "name",
        "refresh_token",
        "session_id",
        "token_type",
    ]


# --- 5. several providers ----------------------------------------------------------------------


async def test_default_and_named_providers_and_bearer_tokens_of_each(
    harness: LoginHarness,
) -> None:
    main = harness.client()
    second = harness.client(providers=("second",))
    await harness.start(
        {
            "main": harness.provider(main, user_prefix="main"),
            "second": harness.provider(second, user_prefix="second"),
        },
        default="main",
    )
    async with browser() as http:
        default_url = await harness.start_login(http)
        named_url = await harness.start_login(http, provider="second")
    assert default_url.query["client_id"] == main.client_id
    assert default_url.query["redirect_uri"] == harness.callback()
    assert named_url.query["client_id"] == second.client_id
    assert named_url.query["redirect_uri"] == harness.callback("second")
    assert URL(named_url.query["redirect_uri"]).query["provider"] == "second"

    for provider, client, prefix in ((None, main, "main"), ("second", second, "second")):
        query: dict[str, Any] = {"provider": provider} if provider else {}
        async with browser() as http:
            answer = await harness.login(http, "alice", **query)
            assert answer.status == 200, answer.text
            assert answer.body["name"] == f"{prefix}_alice"
            async with aiohttp.ClientSession() as admin:
                info = await harness.get(
                    admin, f"{harness.admin_url}/{DB}/_session/{answer.body['session_id']}"
                )
            assert info.body["provider"] == (provider or "main")

        # Bearer tokens are matched to their provider by iss + aud.
        tokens = await get_tokens(harness.op, client, "bob")
        async with aiohttp.ClientSession() as plain:
            bearer = await harness.get(
                plain,
                f"{harness.url}/{DB}/doc",
                headers={"Authorization": f"Bearer {tokens['id_token']}"},
            )
        assert bearer.status == 200
        assert last_header(harness, "X-Forwarded-User") == f"{prefix}_bob"

    # A token of a client no provider is configured for matches none.
    stranger = harness.client()
    tokens = await get_tokens(harness.op, stranger, "bob")
    async with aiohttp.ClientSession() as plain:
        refused = await harness.get(
            plain,
            f"{harness.url}/{DB}/doc",
            headers={"Authorization": f"Bearer {tokens['id_token']}"},
        )
    assert refused.status == 401
    assert refused.body == {"error": "Unauthorized", "reason": "Invalid login"}


# --- 6. the built-in test provider -------------------------------------------------------------


class _Form(HTMLParser):
    """The test provider's login form: its action and hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.hidden: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "form":
            self.action = attr.get("action") or ""
        elif tag == "input" and attr.get("type") == "hidden" and attr.get("name"):
            self.hidden[attr["name"] or ""] = attr.get("value") or ""


async def form_login(
    h: LoginHarness, http: aiohttp.ClientSession, username: str, button: str, **query: str
) -> Answer:
    """/_oidc → the test provider's HTML form, submitted like a browser → the callback."""
    authorize = await h.start_login(http, **query)
    page = await h.get(http, authorize)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    form = _Form()
    form.feed(page.text)
    assert form.action == "authenticate"
    fields = {**form.hidden, "username": username, button: "1"}
    posted = await h.request(http, "POST", authorize.join(URL(form.action)), data=fields)
    assert posted.status == 302, posted.text
    return await h.get(http, posted.headers["Location"])


TEST_PROVIDER_ON = {"oidc_test_provider": {"enabled": True}}


async def test_builtin_test_provider_flow(harness: LoginHarness) -> None:
    await harness.start({"test": builtin_provider(harness)}, unsupported=TEST_PROVIDER_ON)
    async with browser() as http:
        authorize = await harness.start_login(http)
        assert str(authorize.with_query(None)) == f"{harness.test_issuer}/authorize"
        answer = await form_login(harness, http, "carol", "authenticated")
        assert answer.status == 200, answer.text
        assert sorted(answer.body) == ["id_token", "name", "refresh_token", "session_id"]
        assert answer.body["name"] == "test_carol"
        claims = claims_of(answer.body["id_token"])
        assert claims["iss"] == harness.test_issuer
        assert claims["aud"] == "sync_gateway"
        assert claims["email"] == "carol@example.com"
        assert (await harness.get(http, f"{harness.url}/{DB}/doc")).status == 200
        assert last_header(harness, "X-Forwarded-User") == "test_carol"

        refreshed = await harness.get(
            http,
            f"{harness.url}/{DB}/_oidc_refresh",
            params={"refresh_token": answer.body["refresh_token"]},
        )
        assert refreshed.status == 200, refreshed.text
        assert refreshed.body["name"] == "test_carol"


async def test_builtin_test_provider_not_authenticated(harness: LoginHarness) -> None:
    await harness.start({"test": builtin_provider(harness)}, unsupported=TEST_PROVIDER_ON)
    async with browser() as http:
        answer = await form_login(harness, http, "carol", "notauthenticated")
    assert answer.status == 401
    assert answer.body == {
        "error": "Unauthorized",
        "reason": "oidc callback received an error: the user did not authenticate",
    }
    assert answer.cookie(SESSION_COOKIE) is None
    assert await harness.stored("sessions") == 0
    assert await harness.stored("users") == 0


async def test_op_and_test_provider_side_by_side(harness: LoginHarness) -> None:
    client = harness.client()
    await harness.start(
        {
            "op": harness.provider(client, user_prefix="op"),
            "test": builtin_provider(harness),
        },
        default="op",
        unsupported=TEST_PROVIDER_ON,
    )
    async with browser() as http:
        via_op = await harness.login(http, "alice")
        assert via_op.status == 200, via_op.text
        assert via_op.body["name"] == "op_alice"
    async with browser() as http:
        via_test = await form_login(harness, http, "alice", "authenticated", provider="test")
        assert via_test.status == 200, via_test.text
        assert via_test.body["name"] == "test_alice"
    # Each provider's ID token is recognised as a bearer token by its iss + aud.
    async with aiohttp.ClientSession() as plain:
        for body, name in ((via_op.body, "op_alice"), (via_test.body, "test_alice")):
            bearer = {"Authorization": f"Bearer {body['id_token']}"}
            assert (
                await harness.get(plain, f"{harness.url}/{DB}/doc", headers=bearer)
            ).status == 200
            assert last_header(harness, "X-Forwarded-User") == name


# --- logs --------------------------------------------------------------------------------------


async def test_tokens_never_reach_the_logs(
    harness: LoginHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await harness.start_op()
    secrets: list[str] = []
    async with browser() as http:
        callback = await harness.authorize(http, "alice")
        secrets += [callback.query["code"], callback.query["state"]]
        answer = await harness.get(http, callback)
        assert answer.status == 200
        secrets += [
            answer.body["id_token"],
            answer.body["refresh_token"],
            answer.body["session_id"],
        ]
        refreshed = await harness.get(
            http,
            f"{harness.url}/{DB}/_oidc_refresh",
            params={"refresh_token": answer.body["refresh_token"]},
        )
        secrets += [
            refreshed.body["id_token"],
            refreshed.body["refresh_token"],
            refreshed.body["session_id"],
        ]
        # Failures log too: a replayed code, a dead refresh token, a bad bearer token.
        assert (await harness.get(http, callback)).status == 400
        await forget_refresh_outcome(harness, answer.body["refresh_token"])
        dead = await harness.get(
            http,
            f"{harness.url}/{DB}/_oidc_refresh",
            params={"refresh_token": answer.body["refresh_token"]},
        )
        assert dead.status == 401
        bearer = {"Authorization": f"Bearer {answer.body['id_token']}x"}
        assert (await harness.get(http, f"{harness.url}/{DB}/doc", headers=bearer)).status == 401
    assert caplog.records, "the sidecar logged nothing: the check below would prove nothing"
    for record in caplog.records:
        text = record.getMessage() + " " + repr(record.__dict__)
        for secret in secrets:
            assert secret not in text, f"{record.name} logged a secret: {record.getMessage()}"
