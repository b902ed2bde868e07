"""Hostile and broken login requests: `/_oidc`, `/_oidc_challenge`, `/_oidc_callback` and
`/_oidc_refresh` answer the exact status and reason, and nothing rejected ever creates a session,
sets a session cookie or reaches the upstream. Real sidecar, real OP, real redis-server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import pytest
from aiohttp import web
from conftest import DB, Answer, LoginHarness, browser, forget_refresh_outcome
from support import jwt_factory
from support.jwt_factory import SigningKey
from support.op import OpenIDProvider
from support.redis_server import free_port
from support.sidecar import serving_app
from yarl import URL

SESSION_COOKIE = "SyncGatewaySession"
STATE_COOKIE = "sg-oidc-state"
DB2 = "db2"
PLAIN = "plain"  # a database without OpenID Connect
NO_STATE_COOKIE = "OIDC Auth Failure: No state cookie found for callback"
MISMATCH = "OIDC Auth Failure: State mismatch"
USED = "OIDC Auth Failure: State expired or already used"
NO_CODE = "Code must be present on oidc callback"
NO_PROVIDER = "Unable to identify provider for callback request"


async def start_two_providers(h: LoginHarness) -> tuple[str, str]:
    """`db` with providers main (default) and other, each a client of the OP; `db2` with its
    own provider; `plain` without OpenID Connect. Returns the two client ids."""
    main = h.client()
    other = h.client(providers=("other",))
    await h.start(
        {"main": h.provider(main), "other": h.provider(other)},
        default="main",
        more_databases={
            DB2: {"oidc": {"providers": {"main": h.provider(main)}}},
            PLAIN: {},
        },
    )
    return main.client_id, other.client_id


async def assert_nothing_granted(h: LoginHarness, answer: Answer) -> None:
    assert answer.headers["Content-Type"].startswith("application/json")
    assert set(answer.body) == {"error", "reason"}
    assert answer.cookie(SESSION_COOKIE) is None
    assert await h.stored("sessions") == 0
    assert h.upstream.requests == []


# --- the callback ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What a case can use: a pending login's state for `main`, and other values."""

    state: str
    other_state: str  # a pending login of the provider `other`
    db2_state: str  # a pending login of database db2
    code: Callable[[], str] = field(repr=False)  # a genuine code for main (costs an OP login)


# (query pairs, Cookie header value or None) from the context; expected status and reason.
CallbackCase = tuple[Callable[[Ctx], list[tuple[str, str]]], Callable[[Ctx], str | None], int, str]


def with_cookie(ctx: Ctx) -> str | None:
    return ctx.state


def no_cookie(ctx: Ctx) -> str | None:
    return None


CALLBACK_CASES: dict[str, CallbackCase] = {
    "error with hostile description": (
        lambda c: [
            ("error", "access_denied"),
            ("error_description", '<script>alert("x")</script>\x07\r\nSet-Cookie: a=b é'),
            ("state", c.state),
        ],
        with_cookie,
        401,
        # Markup, quotes, control characters and non-ASCII are dropped (tests/test_login_iss.py).
        "oidc callback received an error: scriptalert(x)/scriptSet-Cookie: a=b",
    ),
    "error without description": (
        lambda c: [("error", "access_denied")],
        no_cookie,
        401,
        "oidc callback received an error: access_denied",
    ),
    "error wins over a code": (
        lambda c: [("error", "server_error"), ("code", "x"), ("state", c.state)],
        with_cookie,
        401,
        "oidc callback received an error: server_error",
    ),
    "no code": (lambda c: [("state", c.state)], with_cookie, 400, NO_CODE),
    "empty code": (lambda c: [("code", ""), ("state", c.state)], with_cookie, 400, NO_CODE),
    "nothing at all": (lambda c: [], no_cookie, 400, NO_CODE),
    "unknown provider": (
        lambda c: [("code", "x"), ("state", c.state), ("provider", "nope")],
        with_cookie,
        400,
        NO_PROVIDER,
    ),
    "no state cookie": (
        lambda c: [("code", "x"), ("state", c.state)],
        no_cookie,
        400,
        NO_STATE_COOKIE,
    ),
    "state mismatch": (
        lambda c: [("code", "x"), ("state", c.state)],
        lambda c: c.other_state,
        400,
        MISMATCH,
    ),
    "no state, cookie present": (lambda c: [("code", "x")], with_cookie, 400, MISMATCH),
    "empty state and cookie": (
        lambda c: [("code", "x"), ("state", "")],
        lambda c: "",
        400,
        MISMATCH,
    ),
    "state of another provider": (
        lambda c: [("code", "x"), ("state", c.other_state)],
        lambda c: c.other_state,
        400,
        USED,
    ),
    "state of another database": (
        lambda c: [("code", "x"), ("state", c.db2_state)],
        lambda c: c.db2_state,
        400,
        USED,
    ),
    "made-up state": (
        lambda c: [("code", "x"), ("state", "A" * 43)],
        lambda c: "A" * 43,
        400,
        USED,
    ),
    "code twice": (
        lambda c: [("code", "x"), ("code", "y"), ("state", c.state)],
        with_cookie,
        400,
        "code given more than once",
    ),
    "state twice": (
        lambda c: [("code", "x"), ("state", c.state), ("state", c.state)],
        with_cookie,
        400,
        "state given more than once",
    ),
    "provider twice": (
        lambda c: [("code", "x"), ("state", c.state), ("provider", "main"), ("provider", "main")],
        with_cookie,
        400,
        NO_PROVIDER,
    ),
    "error twice": (
        lambda c: [("error", "a"), ("error", "b")],
        no_cookie,
        400,
        "error given more than once",
    ),
    "code too long": (
        lambda c: [("code", "c" * 5000), ("state", c.state)],
        with_cookie,
        400,
        "code too long",
    ),
    "garbage code": (
        lambda c: [("code", "garbage"), ("state", c.state)],
        with_cookie,
        401,
        "provider answered invalid_grant: grant request is invalid",
    ),
    # PKCE: the code of one login with the state (and so the verifier) of another.
    "genuine code of another login": (
        lambda c: [("code", c.code()), ("state", c.state)],
        with_cookie,
        401,
        "provider answered invalid_grant: grant request is invalid",
    ),
    "genuine code for the wrong provider": (
        lambda c: [("code", c.code()), ("state", c.other_state), ("provider", "other")],
        lambda c: c.other_state,
        401,
        "provider answered invalid_grant: grant request is invalid",
    ),
}


@pytest.mark.parametrize(("case"), CALLBACK_CASES, ids=list(CALLBACK_CASES))
async def test_callback_refusals(harness: LoginHarness, case: str) -> None:
    make_query, make_cookie, status, reason = CALLBACK_CASES[case]
    await start_two_providers(harness)
    async with browser() as http:
        state = (await harness.start_login(http)).query["state"]
        other_state = (await harness.start_login(http, provider="other")).query["state"]
        db2 = await harness.get(http, f"{harness.url}/{DB2}/_oidc")
        db2_state = URL(db2.headers["Location"]).query["state"]
        # A genuine code the OP issued to main's client, from a login whose state we drop.
        main_code = (await harness.authorize(http, "alice")).query["code"]
    ctx = Ctx(state, other_state, db2_state, lambda: main_code)

    cookie = make_cookie(ctx)
    headers = {"Cookie": f"{STATE_COOKIE}={cookie}"} if cookie is not None else {}
    # The OP advertises RFC 9207 and sends iss: every case carries the genuine one (the iss
    # cases are in tests/test_login_iss.py).
    query = [*make_query(ctx), ("iss", harness.op.issuer)]
    url = URL(f"{harness.url}/{DB}/_oidc_callback").with_query(query)
    async with aiohttp.ClientSession() as plain:  # no jar: the Cookie header is the case's own
        answer = await harness.get(plain, url, headers=headers)
    assert (answer.status, answer.body["reason"]) == (status, reason)
    assert answer.body["error"] == ("Unauthorized" if status == 401 else "Bad Request")
    assert answer.body["reason"].isprintable()
    assert "\\u00e9" in answer.text or "é" not in answer.body["reason"]  # JSON-escaped
    await assert_nothing_granted(harness, answer)


async def test_the_op_refusing_consent_is_a_401(harness: LoginHarness) -> None:
    await harness.start_op()
    async with browser() as http:
        answer = await harness.login(http, "alice", consent=False)
    assert answer.status == 401
    assert answer.body["reason"].startswith("oidc callback received an error: ")
    await assert_nothing_granted(harness, answer)


async def test_a_replayed_callback_is_refused_and_never_reaches_the_op(
    harness: LoginHarness,
) -> None:
    await harness.start_op()
    async with browser() as http:
        callback = await harness.authorize(http, "alice")
        first = await harness.get(http, callback)
        assert first.status == 200, first.text
        # The success answer deleted the state cookie: the browser's replay has none.
        again = await harness.get(http, callback)
    assert (again.status, again.body["reason"]) == (400, NO_STATE_COOKIE)
    # An attacker replaying with the cookie too: the state is single use.
    state = callback.query["state"]
    async with aiohttp.ClientSession() as plain:
        forged = await harness.get(plain, callback, headers={"Cookie": f"{STATE_COOKIE}={state}"})
        assert (forged.status, forged.body["reason"]) == (400, USED)
        assert forged.cookie(SESSION_COOKIE) is None
        # The code was not presented twice: the OP would have revoked the grant (RFC 6749
        # 4.1.2), killing the refresh token issued for it.
        refreshed = await harness.get(
            plain,
            f"{harness.url}/{DB}/_oidc_refresh",
            params={"refresh_token": first.body["refresh_token"]},
        )
    assert refreshed.status == 200, refreshed.text
    assert await harness.stored("sessions") == 2


async def test_unknown_or_plain_database(harness: LoginHarness) -> None:
    await start_two_providers(harness)
    async with aiohttp.ClientSession() as http:
        for db, reason in (("nodb", "no such database 'nodb'"), (PLAIN, None)):
            for endpoint in ("_oidc", "_oidc_challenge", "_oidc_callback", "_oidc_refresh"):
                answer = await harness.get(
                    http, f"{harness.url}/{db}/{endpoint}?code=x&state=y&refresh_token=z"
                )
                assert answer.status == 404, (db, endpoint, answer.text)
                if reason:
                    assert answer.body["reason"] == reason
                await assert_nothing_granted(harness, answer)


async def test_callback_by_post_is_not_the_callback(harness: LoginHarness) -> None:
    """Only GET is routed to the callback; a POST falls to the proxy, which wants a login."""
    await harness.start_op()
    async with browser() as http:
        callback = await harness.authorize(http, "alice")
        answer = await harness.request(http, "POST", callback)
    assert answer.status == 401
    await assert_nothing_granted(harness, answer)


async def test_disable_callback_state_drops_only_the_cookie_check(harness: LoginHarness) -> None:
    """`disable_callback_state` (not recommended): no cookie needed, but the state must still be
    one this sidecar issued, once."""
    await harness.start_op(disable_callback_state=True)
    async with browser() as http:
        callback = await harness.authorize(http, "alice")
    async with aiohttp.ClientSession() as plain:  # a client without the state cookie
        answer = await harness.get(plain, callback)
        assert answer.status == 200, answer.text
        replay = await harness.get(plain, callback)
        assert (replay.status, replay.body["reason"]) == (400, USED)
        made_up = await harness.get(plain, callback.update_query(state="B" * 43))
        assert (made_up.status, made_up.body["reason"]) == (400, USED)
        no_state = await harness.get(plain, callback.without_query_params("state"))
        assert (no_state.status, no_state.body["reason"]) == (400, MISMATCH)
    assert await harness.stored("sessions") == 1


# --- starting a login --------------------------------------------------------------------------


START_CASES: dict[str, tuple[str, int, str]] = {
    "unknown provider": ("provider=nope", 400, "Unable to identify provider"),
    "provider twice": ("provider=main&provider=main", 400, "provider given more than once"),
    "offline twice": ("offline=true&offline=true", 400, "offline given more than once"),
    "no validation_key": (
        "provider=nokey",
        400,
        "provider 'nokey' has no validation_key: the auth code flow is unavailable",
    ),
    "provider unreachable": (
        "provider=dead",
        502,
        "OpenID Provider dead unavailable: discovery document unreachable: ClientConnectorError",
    ),
    "provider too long": ("provider=" + "p" * 5000, 400, "provider too long"),
}


@pytest.mark.parametrize("endpoint", ["_oidc", "_oidc_challenge"])
async def test_start_refusals(harness: LoginHarness, endpoint: str) -> None:
    main = harness.client()
    dead = f"http://127.0.0.1:{free_port()}"
    await harness.start(
        {
            "main": harness.provider(main),
            "nokey": {"issuer": harness.op.issuer, "client_id": "nokey", "register": True},
            "dead": {"issuer": dead, "client_id": "x", "validation_key": "y"},
        },
        default="main",
        wait_ready=False,  # "dead" never will be
    )
    async with aiohttp.ClientSession() as http:
        for case, (query, status, reason) in START_CASES.items():
            answer = await harness.get(
                http, URL(f"{harness.url}/{DB}/{endpoint}?{query}", encoded=True)
            )
            assert (answer.status, answer.body["reason"]) == (status, reason), case
            assert "Location" not in answer.headers and "WWW-Authenticate" not in answer.headers
            assert answer.cookie(STATE_COOKIE) is None, case
            await assert_nothing_granted(harness, answer)
    assert await harness.stored("logins") == 0


async def test_no_default_provider_needs_a_provider_parameter(harness: LoginHarness) -> None:
    one, two = harness.client(providers=("one",)), harness.client(providers=("two",))
    await harness.start({"one": harness.provider(one), "two": harness.provider(two)})
    async with browser() as http:
        answer = await harness.get(http, f"{harness.url}/{DB}/_oidc")
        assert (answer.status, answer.body["reason"]) == (400, "Unable to identify provider")
        await assert_nothing_granted(harness, answer)
        named = await harness.login(http, "alice", provider="two")
    assert named.status == 200, named.text


# --- refresh -----------------------------------------------------------------------------------


REFRESH_CASES: dict[str, tuple[str, int, str]] = {
    "no token": ("", 400, "Refresh token must be present for oidc refresh"),
    "empty token": ("refresh_token=", 400, "Refresh token must be present for oidc refresh"),
    "token twice": ("refresh_token=a&refresh_token=b", 400, "refresh_token given more than once"),
    "token too long": ("refresh_token=" + "t" * 5000, 400, "refresh_token too long"),
    "garbage token": (
        "refresh_token=garbage",
        401,
        "Unable to refresh token: unknown refresh token",
    ),
    "unknown provider": ("refresh_token={token}&provider=nope", 400, "Unable to identify provider"),
    "another provider's token": (
        "refresh_token={token}&provider=other",
        401,
        "Unable to refresh token: unknown refresh token",
    ),
}


async def test_refresh_refusals(harness: LoginHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await start_two_providers(harness)
    async with browser() as http:
        login = await harness.login(http, "alice")
    assert login.status == 200, login.text
    token = login.body["refresh_token"]
    sessions = await harness.stored("sessions")
    async with aiohttp.ClientSession() as plain:
        for case, (query, status, reason) in REFRESH_CASES.items():
            url = URL(f"{harness.url}/{DB}/_oidc_refresh?{query.format(token=token)}", encoded=True)
            answer = await harness.get(plain, url)
            assert (answer.status, answer.body["reason"]) == (status, reason), case
            assert answer.cookie(SESSION_COOKIE) is None, case
        # None of that spent the genuine token, and it is no good for database db2 either.
        wrong_db = await harness.get(
            plain, f"{harness.url}/{DB2}/_oidc_refresh", params={"refresh_token": token}
        )
        assert (wrong_db.status, wrong_db.body["reason"]) == (
            401,
            "Unable to refresh token: unknown refresh token",
        )
        good = await harness.get(
            plain, f"{harness.url}/{DB}/_oidc_refresh", params={"refresh_token": token}
        )
        assert good.status == 200, good.text
        await forget_refresh_outcome(harness, token)
        spent = await harness.get(
            plain, f"{harness.url}/{DB}/_oidc_refresh", params={"refresh_token": token}
        )
        assert spent.status == 401  # rotated away by the OP
        assert spent.body["reason"].startswith("Unable to refresh token: provider answered")
    assert await harness.stored("sessions") == sessions + 1
    assert harness.upstream.requests == []
    for record in caplog.records:
        assert token not in record.getMessage() + repr(record.__dict__)


# --- the provider goes away --------------------------------------------------------------------


async def test_provider_down_at_callback_and_refresh_is_a_502(
    harness: LoginHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with OpenIDProvider() as op2:
        harness.op = op2  # this test's own OP, which it stops halfway
        client = harness.client()
        await harness.start({"op": harness.provider(client)})
        async with browser() as http:
            first = await harness.login(http, "alice")
            assert first.status == 200, first.text
            callback = await harness.authorize(http, "alice")
            await asyncio.to_thread(op2.stop)
            down = await harness.get(http, callback)
            refresh = await harness.get(
                http,
                f"{harness.url}/{DB}/_oidc_refresh",
                params={"refresh_token": first.body["refresh_token"]},
            )
    for answer in (down, refresh):
        assert answer.status == 502
        assert answer.body == {
            "error": "Bad Gateway",
            "reason": "token endpoint unreachable: ClientConnectorError",
        }
        assert answer.cookie(SESSION_COOKIE) is None
    assert await harness.stored("sessions") == 1  # the first login's only
    secrets = [callback.query["code"], first.body["refresh_token"], first.body["id_token"]]
    for record in caplog.records:
        for secret in secrets:
            assert secret not in record.getMessage() + repr(record.__dict__)


# --- a provider that answers what the case says -------------------------------------------------


@dataclass
class ScriptedOP:
    """A minimal provider on 127.0.0.1 whose token endpoint answers what a case scripts, for the
    hostile answers the real OP never gives. Records each token request (headers, form)."""

    key: SigningKey
    port: int = field(default_factory=free_port)
    discovery_overrides: dict[str, Any] = field(default_factory=dict)
    answer: Callable[[ScriptedOP, dict[str, str]], web.StreamResponse] | None = None
    token_requests: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    nonce: str = ""  # the nonce of the login under way (the test sets it)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def id_token(self, client_id: str, **overrides: Any) -> str:
        claims = jwt_factory.claims(
            time.time(), iss=self.issuer, aud=client_id, sub="zed", nonce=self.nonce
        )
        claims.update(overrides)
        return jwt_factory.mint(self.key, {k: v for k, v in claims.items() if v is not None})

    async def _discovery(self, request: web.Request) -> web.Response:
        doc = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/auth",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "id_token_signing_alg_values_supported": [self.key.alg],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            **self.discovery_overrides,
        }
        return web.json_response({k: v for k, v in doc.items() if v is not None})

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(jwt_factory.jwks(self.key))

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append((dict(request.headers), form))
        assert self.answer is not None
        answer = self.answer(self, form)
        if isinstance(answer, _Trickle):
            return await answer.send(request)
        return answer

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedOP]:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/token", self._token)
        async with serving_app(app, self.port):
            yield self


class _Trickle(web.Response):
    """A JSON answer sent chunked, a few bytes at a time with pauses, as a slow link does."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.payload = json.dumps(body).encode()

    async def send(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(self.payload), 100):
            await response.write(self.payload[start : start + 100])
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response


SCRIPTED_CLIENT = "scripted-client"
SCRIPTED_SECRET = "s3cret: with %, + and spaces"
INVALID_GRANT = "provider answered invalid_grant: the code is no good"


def tokens(**body: Any) -> Callable[[ScriptedOP, dict[str, str]], web.StreamResponse]:
    return lambda op, form: web.json_response(body)


def signed(**overrides: Any) -> Callable[[ScriptedOP, dict[str, str]], web.StreamResponse]:
    return lambda op, form: web.json_response(
        {"id_token": op.id_token(SCRIPTED_CLIENT, **overrides), "token_type": "Bearer"}
    )


def bad_id_token(why: str) -> str:
    return f"Invalid ID token from provider: {why}"


# case: (token endpoint answer, expected status, expected reason; None = any "Invalid ID token")
TOKEN_ANSWERS: dict[
    str, tuple[Callable[[ScriptedOP, dict[str, str]], web.StreamResponse], int, str | None]
] = {
    "html error page": (
        lambda op, form: web.Response(status=500, text="<h1>oops</h1>", content_type="text/html"),
        502,
        "token endpoint answered 500 without a JSON object",
    ),
    "redirect": (
        lambda op, form: web.Response(status=302, headers={"Location": "http://127.0.0.1:9/"}),
        502,
        "token endpoint answered 302 without a JSON object",
    ),
    "a JSON array": (
        lambda op, form: web.json_response([1]),
        502,
        "token endpoint answered 200 without a JSON object",
    ),
    "too large": (
        lambda op, form: web.json_response({"pad": "x" * 300_000}),
        502,
        "token endpoint answer too large",
    ),
    "no id_token": (tokens(access_token="a"), 502, "token endpoint answer has no id_token"),
    "id_token a number": (tokens(id_token=5), 502, "token endpoint answer has no id_token"),
    "invalid_grant": (
        lambda op, form: web.json_response(
            {"error": "invalid_grant", "error_description": "the code is no good"}, status=400
        ),
        401,
        INVALID_GRANT,
    ),
    "invalid_client": (
        lambda op, form: web.json_response({"error": "invalid_client"}, status=401),
        502,
        "provider answered invalid_client",
    ),
    "an error with 200": (tokens(error="server_error"), 502, "provider answered server_error"),
    "garbage id_token": (tokens(id_token="garbage"), 401, None),
    "unsigned id_token": (
        lambda op, form: web.json_response(
            {"id_token": jwt_factory.mint_unsigned(jwt_factory.claims(time.time()))}
        ),
        401,
        None,
    ),
    "wrong nonce": (signed(nonce="not-the-nonce"), 401, None),
    "no nonce": (signed(nonce=None), 401, None),
    "wrong audience": (signed(aud="someone-else"), 401, None),
    "wrong issuer": (signed(iss="http://127.0.0.1:9"), 401, None),
    "expired": (signed(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), 401, None),
    "no subject": (signed(sub=None), 401, None),
    "empty subject": (signed(sub=""), 401, None),
}


@pytest.fixture(scope="module")
def scripted_key() -> SigningKey:
    return jwt_factory.make_key("ES256", "scripted-1")


async def scripted_login(h: LoginHarness, op: ScriptedOP) -> tuple[Answer, URL]:
    """Starts a login at the scripted OP and calls the callback with a made-up code."""
    async with browser() as http:
        start = await h.start_login(http)
        op.nonce = start.query["nonce"]
        callback = URL(h.callback()).with_query(code="the-code", state=start.query["state"])
        return await h.get(http, callback), start


@pytest.mark.parametrize("case", TOKEN_ANSWERS, ids=list(TOKEN_ANSWERS))
async def test_hostile_token_endpoint_answers(
    harness: LoginHarness, scripted_key: SigningKey, case: str
) -> None:
    answer_with, status, reason = TOKEN_ANSWERS[case]
    async with ScriptedOP(scripted_key, answer=answer_with).running() as op:
        await harness.start(
            {
                "fake": {
                    "issuer": op.issuer,
                    "client_id": SCRIPTED_CLIENT,
                    "validation_key": SCRIPTED_SECRET,
                    "register": True,
                }
            }
        )
        answer, _ = await scripted_login(harness, op)
    assert answer.status == status, answer.text
    if reason is None:
        assert answer.body["reason"].startswith("Invalid ID token from provider: ") or (
            answer.body["reason"] == "Invalid login"
        ), answer.body
    else:
        assert answer.body["reason"] == reason
    assert len(op.token_requests) == 1  # one code exchange, never retried
    await assert_nothing_granted(harness, answer)
    assert await harness.stored("users") == 0


async def test_code_exchange_request_and_a_good_answer(
    harness: LoginHarness, scripted_key: SigningKey
) -> None:
    """The control case for the table above, and what the sidecar sends: the code, its
    redirect_uri, the PKCE verifier of this login's challenge, and Basic client credentials
    form-encoded first (RFC 6749 2.3.1)."""
    async with ScriptedOP(scripted_key, answer=signed()).running() as op:
        await harness.start(
            {
                "fake": {
                    "issuer": op.issuer,
                    "client_id": SCRIPTED_CLIENT,
                    "validation_key": SCRIPTED_SECRET,
                    "register": True,
                    "user_prefix": "fake",
                }
            }
        )
        answer, start = await scripted_login(harness, op)
    assert answer.status == 200, answer.text
    assert answer.body["name"] == "fake_zed"
    assert sorted(answer.body) == ["id_token", "name", "session_id"]  # the OP sent no refresh
    ((headers, form),) = op.token_requests
    assert form.keys() == {"grant_type", "code", "redirect_uri", "code_verifier"}
    assert form["grant_type"] == "authorization_code"
    assert form["code"] == "the-code"
    assert form["redirect_uri"] == harness.callback() == start.query["redirect_uri"]
    assert pkce_pair_matches(form["code_verifier"], start.query["code_challenge"])
    scheme, _, credentials = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(credentials).decode().partition(":")
    assert (unquote_plus(user), unquote_plus(password)) == (SCRIPTED_CLIENT, SCRIPTED_SECRET)
    assert "+" in password and "%25" in password and "%3A" in password  # encoded, not raw


def pkce_pair_matches(verifier: str, challenge: str) -> bool:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == challenge and (
        43 <= len(verifier) <= 128
    )


async def test_token_answer_arriving_in_pieces(
    harness: LoginHarness, scripted_key: SigningKey
) -> None:
    """The whole answer is read, however it is split on the wire (it used to be cut at the
    first piece and reported as "not JSON": a 502 for a good login on a slow link)."""
    answer_with = lambda op, form: _Trickle(  # noqa: E731
        {"id_token": op.id_token(SCRIPTED_CLIENT), "token_type": "Bearer"}
    )
    async with ScriptedOP(scripted_key, answer=answer_with).running() as op:
        await harness.start(
            {
                "fake": {
                    "issuer": op.issuer,
                    "client_id": SCRIPTED_CLIENT,
                    "validation_key": SCRIPTED_SECRET,
                    "register": True,
                }
            }
        )
        answer, _ = await scripted_login(harness, op)
    assert answer.status == 200, answer.text


async def test_discovery_without_authorization_endpoint(
    harness: LoginHarness, scripted_key: SigningKey
) -> None:
    """Discovery 3 makes authorization_endpoint optional; this flow needs it: a 502, not a 500."""
    op = ScriptedOP(scripted_key, discovery_overrides={"authorization_endpoint": None})
    async with op.running():
        await harness.start(
            {"fake": {"issuer": op.issuer, "client_id": "c", "validation_key": "s"}}
        )
        async with browser() as http:
            for endpoint in ("_oidc", "_oidc_challenge"):
                answer = await harness.get(http, f"{harness.url}/{DB}/{endpoint}")
                assert (answer.status, answer.body["reason"]) == (
                    502,
                    "provider metadata has no authorization_endpoint",
                )
                assert answer.cookie(STATE_COOKIE) is None
    assert await harness.stored("logins") == 0
