"""Sign-out: `/{db}/_oidc_logout` (page, CSRF, Origin, return targets) and the back-channel
logout endpoint's hostile-token table, on the real sidecar with a key server whose keys the
test holds (tokens are signed for real), a real redis-server and a real upstream."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest
from conftest import Answer, KeyServer, admin_session, read_answer
from support import jwt_factory
from support.redis_server import RedisServer, free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar

from sidecar import keys
from sidecar.browser import logout_csrf_token, safe_return_target
from sidecar.oidc.logout import open_hint, seal_hint, sid_group
from sidecar.oidc.tokens import (
    LOGOUT_EVENT,
    LOGOUT_TOKEN_MAX_AGE,
    TokenError,
    check_logout_claims,
    check_logout_header,
)
from sidecar.sessions.models import hash_session_id

DB = "db"
CLIENT_ID = "sidecar-logout"
COOKIE = "SyncGatewaySession"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
APP_ORIGIN = "https://app.example.com"


@dataclass
class Env:
    sidecar: Sidecar
    keys: KeyServer

    @property
    def url(self) -> str:
        return self.sidecar.url

    @property
    def backchannel(self) -> str:
        return f"{self.url}/{DB}/_oidc_backchannel_logout"


@pytest.fixture
async def env(
    key_server: KeyServer, fresh_redis: RedisServer, upstream: Upstream
) -> AsyncIterator[Env]:
    provider = {
        "issuer": key_server.issuer,
        "client_id": CLIENT_ID,
        "register": True,
        "user_prefix": "ks",
    }
    config = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        session_store=fresh_redis.url,
        databases={
            DB: {
                "oidc": {"providers": {"ks": provider}},
                "allowed_redirect_origins": [APP_ORIGIN],
            }
        },
    )
    async with running_sidecar(config) as sidecar:
        yield Env(sidecar, key_server)


async def proxied_status(env: Env, session_id: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{env.url}/{DB}/doc", headers={"Cookie": f"{COOKIE}={session_id}"}
        ) as r:
            return r.status


async def sign_out(
    env: Env, session_id: str, *, csrf: str | None = None, rd: str | None = None, **headers: str
) -> Answer:
    """The sign-out form POSTed with this session's cookie (and CSRF token, unless given)."""
    form = {"csrf": csrf if csrf is not None else logout_csrf_token(session_id)}
    if rd is not None:
        form["rd"] = rd
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{env.url}/{DB}/_oidc_logout",
            data=form,
            headers={"Cookie": f"{COOKIE}={session_id}", **headers},
            allow_redirects=False,
        ) as r:
            return await read_answer(r)


# --- back-channel logout ---------------------------------------------------------------------


def logout_claims(env: Env, **overrides: Any) -> dict[str, Any]:
    """A valid logout token claim set (Back-Channel Logout 1.0 2.4); None removes a claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": env.keys.issuer,
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sub": "alice",
        "sid": "op-session-1",
        "events": {LOGOUT_EVENT: {}},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def logout_token(env: Env, *, header: dict[str, Any] | None = None, **overrides: Any) -> str:
    key = env.keys.key
    head = jwt_factory.header_for(key, **({"typ": "logout+jwt"} | (header or {})))
    return jwt_factory.mint(key, logout_claims(env, **overrides), header=head)


async def post_backchannel(
    env: Env, data: Any, *, headers: dict[str, str] | None = None, query: str = ""
) -> tuple[int, dict[str, Any] | None, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            env.backchannel + query, data=data, headers=headers if headers is not None else FORM
        ) as r:
            body = await r.json(content_type=None) if r.status != 200 else None
            return r.status, body, r.headers


def hostile(env: Env, case: str) -> tuple[Any, dict[str, str]]:
    """(body, headers) of each hostile request."""
    key = env.keys.key
    now = int(time.time())
    token = {
        "bad signature": lambda: logout_token(env)[:-8] + "AAAAAAAA",
        "ES256 header on the RSA key": lambda: jwt_factory.mint(
            jwt_factory.make_key("ES256", key.kid),
            logout_claims(env),
            header=jwt_factory.header_for(key, alg="ES256", typ="logout+jwt"),
        ),
        "alg none": lambda: jwt_factory.mint_unsigned(
            logout_claims(env), {"alg": "none", "typ": "logout+jwt"}
        ),
        "alg HS256": lambda: jwt_factory.mint_hs256(
            b"secret", logout_claims(env), {"alg": "HS256", "typ": "logout+jwt"}
        ),
        "wrong iss": lambda: logout_token(env, iss="https://evil.example.com"),
        "wrong aud": lambda: logout_token(env, aud="someone-else"),
        "untrusted extra aud": lambda: logout_token(env, aud=[CLIENT_ID, "other"]),
        "missing events": lambda: logout_token(env, events=None),
        "events without the logout event": lambda: logout_token(
            env, events={"http://schemas.openid.net/event/other": {}}
        ),
        "logout event not an object": lambda: logout_token(env, events={LOGOUT_EVENT: "yes"}),
        "nonce present": lambda: logout_token(env, nonce="n-1"),
        "missing sid and sub": lambda: logout_token(env, sid=None, sub=None),
        "empty sid and no sub": lambda: logout_token(env, sid="", sub=None),
        "missing jti": lambda: logout_token(env, jti=None),
        "wrong typ": lambda: logout_token(env, header={"typ": "at+jwt"}),
        "typ secevent+jwt": lambda: logout_token(env, header={"typ": "secevent+jwt"}),
        "iat far in the past": lambda: logout_token(env, iat=now - 3600, exp=None),
        "iat in the future": lambda: logout_token(env, iat=now + 3600),
        "missing iat": lambda: logout_token(env, iat=None),
        "expired": lambda: logout_token(env, iat=now - 200, exp=now - 100),
        "an ID token": lambda: env.keys.token(CLIENT_ID),
        "jku header": lambda: logout_token(env, header={"jku": "https://evil.example.com/k"}),
        "garbage": lambda: "not.a.jwt",
    }
    if case in token:
        return {"logout_token": token[case]()}, FORM
    valid = logout_token(env)
    return {
        "missing logout_token": ({"other": "x"}, FORM),
        "empty logout_token": ({"logout_token": ""}, FORM),
        "two logout_tokens": (
            aiohttp.FormData([("logout_token", valid), ("logout_token", valid)]),
            FORM,
        ),
        "JSON body": (json.dumps({"logout_token": valid}), {"Content-Type": "application/json"}),
        "no content type": (f"logout_token={valid}".encode(), {}),
        "malformed form": (b"logout_token=%ZZ%\xff", FORM),
    }[case]


HOSTILE_CASES = [
    "bad signature",
    "ES256 header on the RSA key",
    "alg none",
    "alg HS256",
    "wrong iss",
    "wrong aud",
    "untrusted extra aud",
    "missing events",
    "events without the logout event",
    "logout event not an object",
    "nonce present",
    "missing sid and sub",
    "empty sid and no sub",
    "missing jti",
    "wrong typ",
    "typ secevent+jwt",
    "iat far in the past",
    "iat in the future",
    "missing iat",
    "expired",
    "an ID token",
    "jku header",
    "garbage",
    "missing logout_token",
    "empty logout_token",
    "two logout_tokens",
    "JSON body",
    "no content type",
    "malformed form",
]


@pytest.mark.parametrize("case", HOSTILE_CASES)
async def test_hostile_logout_tokens_are_refused_with_400(env: Env, case: str) -> None:
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_alice")
    store = env.sidecar.app[keys.STORE]
    await store.link_sessions(
        "sid", sid_group(DB, "ks", "op-session-1"), hash_session_id(session_id), 60
    )
    data, headers = hostile(env, case)
    status, body, answer_headers = await post_backchannel(env, data, headers=headers)
    assert status == 400, (case, body)
    assert body is not None and body["error"] == "invalid_request"
    assert answer_headers["Cache-Control"] == "no-store"
    assert await proxied_status(env, session_id) == 200  # nothing was ended


async def test_a_replayed_jti_is_refused(env: Env) -> None:
    token = logout_token(env)
    assert (await post_backchannel(env, {"logout_token": token}))[0] == 200
    status, body, _ = await post_backchannel(env, {"logout_token": token})
    assert status == 400 and body is not None
    assert "replayed" in body["error_description"]


@pytest.mark.parametrize("typ", [None, "logout+jwt", "application/logout+jwt", "JWT"])
async def test_accepted_token_types(env: Env, typ: str | None) -> None:
    token = logout_token(env, header={"typ": typ})
    assert (await post_backchannel(env, {"logout_token": token}))[0] == 200


async def test_sid_ends_only_the_sessions_of_that_provider_session(env: Env) -> None:
    store = env.sidecar.app[keys.STORE]
    first = await admin_session(env.sidecar.admin_url, DB, "ks_alice")
    second = await admin_session(env.sidecar.admin_url, DB, "ks_alice")
    await store.link_sessions("sid", sid_group(DB, "ks", "S1"), hash_session_id(first), 60)
    await store.link_sessions("sid", sid_group(DB, "ks", "S2"), hash_session_id(second), 60)
    status, _, headers = await post_backchannel(env, {"logout_token": logout_token(env, sid="S1")})
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert await proxied_status(env, first) == 401
    assert await proxied_status(env, second) == 200


async def test_sub_alone_ends_every_session_of_the_user(env: Env) -> None:
    first = await admin_session(env.sidecar.admin_url, DB, "ks_alice")
    second = await admin_session(env.sidecar.admin_url, DB, "ks_alice")
    other = await admin_session(env.sidecar.admin_url, DB, "ks_bob")
    token = logout_token(env, sid=None, sub="alice")
    assert (await post_backchannel(env, {"logout_token": token}))[0] == 200
    assert await proxied_status(env, first) == 401
    assert await proxied_status(env, second) == 401
    assert await proxied_status(env, other) == 200


async def test_unknown_provider_is_a_400(env: Env) -> None:
    status, body, _ = await post_backchannel(
        env, {"logout_token": logout_token(env)}, query="?provider=nope"
    )
    assert status == 400 and body is not None and body["error"] == "invalid_request"


# --- browser sign-out ------------------------------------------------------------------------


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.action: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "form":
            self.action = attr.get("action")
        if tag == "input" and attr.get("name"):
            self.fields[str(attr["name"])] = attr.get("value") or ""


PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def assert_page_headers(headers: Any) -> None:
    for name, value in PAGE_HEADERS.items():
        assert headers[name] == value, name
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert headers["Content-Type"].startswith("text/html")


async def test_confirmation_page_then_sign_out(env: Env) -> None:
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_<carol>")
    cookie = {"Cookie": f"{COOKIE}={session_id}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{env.url}/{DB}/_oidc_logout", params={"rd": "/db/after?x=1"}, headers=cookie
        ) as r:
            assert r.status == 200
            assert_page_headers(r.headers)
            page = await r.text()
        assert "ks_&lt;carol&gt;" in page and "<carol>" not in page  # escaped
        assert session_id not in page
        form = _Form()
        form.feed(page)
        assert form.action == "_oidc_logout"
        assert form.fields == {"csrf": logout_csrf_token(session_id), "rd": "/db/after?x=1"}
        # A GET alone signs nobody out.
        assert await proxied_status(env, session_id) == 200
        async with http.post(
            f"{env.url}/{DB}/_oidc_logout",
            data=form.fields,
            headers=cookie | {"Origin": env.url},
            allow_redirects=False,
        ) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/db/after?x=1"
            expired = [c for c in r.headers.getall("Set-Cookie") if c.startswith(COOKIE)]
            assert expired and "Max-Age=0" in expired[0]
    assert await proxied_status(env, session_id) == 401


async def test_sign_out_without_return_target_shows_a_page(env: Env) -> None:
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_dave")
    answer = await sign_out(env, session_id)
    assert answer.status == 200
    assert_page_headers(answer.headers)
    assert "Signed out" in answer.text
    assert await proxied_status(env, session_id) == 401


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no csrf", 403),
        ("wrong csrf", 403),
        ("csrf of another session", 403),
        ("two csrf fields", 400),
        ("cross-origin Origin", 403),
        ("Origin null", 403),
        ("Sec-Fetch-Site cross-site", 403),
        ("Sec-Fetch-Site same-site", 403),
        ("Origin null, Sec-Fetch-Site cross-site", 403),
        ("Origin evil, Sec-Fetch-Site same-origin", 403),
        ("Origin null, Sec-Fetch-Site same-origin, no csrf", 403),
    ],
)
async def test_forged_sign_outs_are_refused(env: Env, case: str, status: int) -> None:
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_erin")
    good = logout_csrf_token(session_id)
    data: Any = {"csrf": good}
    headers = {"Cookie": f"{COOKIE}={session_id}", "Accept": "application/json"}
    if case == "no csrf":
        data = {}
    elif case == "wrong csrf":
        data = {"csrf": "0" * 64}
    elif case == "csrf of another session":
        data = {"csrf": logout_csrf_token("x" * 43)}
    elif case == "two csrf fields":
        data = aiohttp.FormData([("csrf", good), ("csrf", good)])
    elif case == "cross-origin Origin":
        headers["Origin"] = "https://evil.example.com"
    elif case == "Origin null":
        headers["Origin"] = "null"
    elif case.startswith("Origin "):
        origin, site, *rest = case.removeprefix("Origin ").split(", ")
        headers["Origin"] = "null" if origin == "null" else "https://evil.example.com"
        headers["Sec-Fetch-Site"] = site.rpartition(" ")[2]
        if rest:
            data = {}
    else:
        headers["Sec-Fetch-Site"] = case.rpartition(" ")[2]
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{env.url}/{DB}/_oidc_logout", data=data, headers=headers, allow_redirects=False
        ) as r:
            assert r.status == status
            body = await r.json()
            assert set(body) == {"error", "reason"}
            assert not r.headers.getall("Set-Cookie", [])
    assert await proxied_status(env, session_id) == 200  # still signed in


async def test_a_browsers_own_form_post_with_origin_null(env: Env) -> None:
    """What Chromium sends from our no-referrer confirmation page: `Origin: null` with
    `Sec-Fetch-Site: same-origin` (Fetch Metadata vouches it is this site's own form)."""
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_ivy")
    headers = {"Origin": "null", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}
    answer = await sign_out(env, session_id, **headers)
    assert answer.status == 200
    assert "Signed out" in answer.text
    assert await proxied_status(env, session_id) == 401


async def test_a_refusal_is_a_page_for_browsers(env: Env) -> None:
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_fay")
    # A form submission is a navigation (sidecar.browser.is_page_load).
    answer = await sign_out(env, session_id, csrf="nope", **{"Sec-Fetch-Mode": "navigate"})
    assert answer.status == 403
    assert_page_headers(answer.headers)
    assert "CSRF" in answer.text


@pytest.mark.parametrize("cookie", [None, "x" * 43, "junk"])
async def test_sign_out_without_a_session_is_idempotent(env: Env, cookie: str | None) -> None:
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    data = {"csrf": logout_csrf_token(cookie)} if cookie else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{env.url}/{DB}/_oidc_logout", data=data, headers=headers) as r:
            assert r.status == 200
            assert "Signed out" in await r.text()
            expires = [c for c in r.headers.getall("Set-Cookie", []) if c.startswith(COOKIE)]
            assert bool(expires) == bool(cookie)
        async with http.get(f"{env.url}/{DB}/_oidc_logout", headers=headers) as r:
            assert r.status == 200
            assert "Signed out" in await r.text()


@pytest.mark.parametrize(
    "rd",
    [
        "//evil.example.com",
        "https://evil.example.com/",
        "/\\evil.example.com",
        "\\\\evil.example.com",
        "javascript:alert(1)",
        "/db/ok\r\nSet-Cookie: x=1",
        "/db/ok\tx",
        " /db/ok",
        "http:/evil.example.com",
        "",
    ],
)
async def test_hostile_return_targets_fall_back_to_the_page(env: Env, rd: str) -> None:
    assert safe_return_target(rd) is None
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_gus")
    answer = await sign_out(env, session_id, rd=rd)
    assert answer.status == 200
    assert "Location" not in answer.headers
    assert await proxied_status(env, session_id) == 401


@pytest.mark.parametrize(
    ("rd", "location"),
    [
        ("/db/after", "/db/after"),
        (f"{APP_ORIGIN}/signed-out?x=1", f"{APP_ORIGIN}/signed-out?x=1"),  # listed origin
        ("https://app.example.com.evil.example.com/", None),
        ("https://evil.example.com/", None),
        ("/%2f%2fevil.example.com", None),  # the sign-in rule decodes, the old one did not
        ("/db/%2e%2e/admin", None),
    ],
)
async def test_return_targets_follow_the_sign_in_rule(
    env: Env, rd: str, location: str | None
) -> None:
    session_id = await admin_session(env.sidecar.admin_url, DB, "ks_hal")
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{env.url}/{DB}/_oidc_logout",
            params={"rd": rd},
            headers={"Cookie": f"{COOKIE}={session_id}"},
        ) as r:
            form = _Form()
            form.feed(await r.text())
            assert form.fields.get("rd") == location
            # Browsers apply form-action to the POST's redirect too: it must allow the target.
            expected = (
                f"form-action 'self' {APP_ORIGIN};"
                if location and APP_ORIGIN in location
                else "form-action 'self';"
            )
            assert expected in r.headers["Content-Security-Policy"]
    answer = await sign_out(env, session_id, rd=rd)
    assert answer.status == (302 if location else 200)
    assert answer.headers.get("Location") == location


async def test_done_page_with_an_unknown_state(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{env.url}/{DB}/_oidc_logout/done", params={"state": "unknown"}) as r:
            assert r.status == 200
            assert_page_headers(r.headers)


# --- the pure rules ----------------------------------------------------------------------------

NOW = 1_900_000_000
LEEWAY = 60


def pure_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "https://op",
        "aud": "c",
        "iat": NOW,
        "jti": "j",
        "sid": "s",
        "events": {LOGOUT_EVENT: {}},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({}, None),
        ({"iat": NOW - LOGOUT_TOKEN_MAX_AGE - LEEWAY}, None),  # the oldest accepted
        ({"iat": NOW - LOGOUT_TOKEN_MAX_AGE - LEEWAY - 1}, "iat"),
        ({"iat": NOW + LEEWAY}, None),
        ({"iat": NOW + LEEWAY + 1}, "iat"),
        ({"iat": "now"}, "iat"),
        ({"iat": True}, "iat"),
        ({"exp": NOW - LEEWAY}, "expired"),
        ({"exp": NOW - LEEWAY + 1}, None),
        ({"nbf": NOW + LEEWAY + 1}, "not_yet_valid"),
        ({"sid": None, "sub": "u"}, None),
        ({"sid": 5}, "sid"),
        ({"sub": ""}, "sub"),
        ({"sub": "x" * 256}, "sub"),
        ({"jti": ""}, "jti"),
        ({"jti": "x" * 256}, "jti"),
        ({"events": [LOGOUT_EVENT]}, "events"),
        ({"events": {LOGOUT_EVENT: {}, "other": {}}}, None),  # other events may ride along
        ({"nonce": None, "aud": ["c"]}, None),
        ({"nonce": ""}, "nonce"),  # present at all is refused
        ({"iss": "https://op/"}, "issuer"),
    ],
)
def test_logout_claim_rules(overrides: dict[str, Any], code: str | None) -> None:
    claims = pure_claims(**overrides)
    if code is None:
        check_logout_claims(claims, issuer="https://op", client_id="c", now=NOW, leeway=LEEWAY)
        return
    with pytest.raises(TokenError) as caught:
        check_logout_claims(claims, issuer="https://op", client_id="c", now=NOW, leeway=LEEWAY)
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("typ", "ok"),
    [
        (None, True),
        ("logout+jwt", True),
        ("application/logout+jwt", True),
        ("Logout+JWT", True),
        ("JWT", True),
        ("at+jwt", False),
        ("secevent+jwt", False),
        ("id_token", False),
        ("", False),
    ],
)
def test_logout_token_types(typ: str | None, ok: bool) -> None:
    header = {"alg": "RS256", "kid": "k"} | ({"typ": typ} if typ is not None else {})
    if ok:
        check_logout_header(header, ["RS256"])
    else:
        with pytest.raises(TokenError):
            check_logout_header(header, ["RS256"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/db/page", "/db/page"),
        ("/db/page?a=1&b=%2F#frag", "/db/page?a=1&b=%2F#frag"),
        ("/", "/"),
        (None, None),
        ("db/page", None),
        ("/" + "a" * 2048, None),
        ("/caf\u00e9", None),
    ],
)
def test_return_targets(raw: str | None, expected: str | None) -> None:
    assert safe_return_target(raw) == expected


def test_the_id_token_hint_opens_only_with_its_session_id() -> None:
    sealed = seal_hint("a" * 43, "header.payload.signature")
    assert "payload" not in sealed
    assert open_hint("a" * 43, sealed) == "header.payload.signature"
    assert open_hint("b" * 43, sealed) is None
    assert open_hint("a" * 43, sealed[:-4] + "AAAA") is None
    for junk in (None, 5, "", "%%%", "AAAA"):
        assert open_hint("a" * 43, junk) is None
