"""The login flow's edges: RFC 9207 `iss` in the authorization response, provider and client
text quoted without markup, and `Referrer-Policy: no-referrer` on every `_oidc*` answer.
Real sidecar, the real OP (oidc-provider sends `iss` and advertises it), real redis-server."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import DB, Answer, LoginHarness, browser
from support.redis_server import free_port
from support.sidecar import serving_app
from yarl import URL

from sidecar.errors import ProviderError, outside_text
from sidecar.oidc.provider import parse_metadata
from sidecar.oidc.routes import ISS_MISMATCH, ISS_MISSING

SESSION_COOKIE = "SyncGatewaySession"
STATE_COOKIE = "sg-oidc-state"
TEST_PROVIDER_ON = {"oidc_test_provider": {"enabled": True}}


async def assert_nothing_granted(h: LoginHarness, answer: Answer) -> None:
    assert answer.headers["Content-Type"].startswith("application/json")
    assert set(answer.body) == {"error", "reason"}
    assert answer.cookie(SESSION_COOKIE) is None
    assert await h.stored("sessions") == 0
    assert h.upstream.requests == []


# --- RFC 9207: iss in the authorization response -------------------------------------------------


def test_parse_metadata_reads_the_iss_flag() -> None:
    base = {"issuer": "https://op", "jwks_uri": "https://op/jwks"}
    flag = "authorization_response_iss_parameter_supported"
    assert getattr(parse_metadata(base, expected_issuer="https://op"), flag) is False
    for value, expected in ((True, True), (False, False)):
        meta = parse_metadata(base | {flag: value}, expected_issuer="https://op")
        assert getattr(meta, flag) is expected
    # Fail closed: a flag that turns a check on is never guessed from a non-boolean.
    for bad in ("true", 1, None, [True]):
        with pytest.raises(ProviderError, match=f"{flag} is not a boolean"):
            parse_metadata(base | {flag: bad}, expected_issuer="https://op")


# (how the genuine iss becomes the case's; None: drop it) → expected status, reason
ISS_CASES: dict[str, tuple[Any, int, str]] = {
    "missing (the OP advertises it)": (lambda iss: None, 400, ISS_MISSING),
    "empty": (lambda iss: [""], 400, ISS_MISMATCH),
    "another issuer": (lambda iss: ["https://attacker.example"], 400, ISS_MISMATCH),
    "trailing slash": (lambda iss: [iss + "/"], 400, ISS_MISMATCH),
    "other case": (lambda iss: [iss.upper()], 400, ISS_MISMATCH),
    "percent-encoded once more": (lambda iss: [iss.replace(":", "%3A")], 400, ISS_MISMATCH),
    "with a path": (lambda iss: [iss + "/other"], 400, ISS_MISMATCH),
    "markup": (lambda iss: ['<script>alert("x")</script>'], 400, ISS_MISMATCH),
    "given twice": (lambda iss: [iss, iss], 400, "iss given more than once"),
    "too long": (lambda iss: [iss + "x" * 5000], 400, "iss too long"),
}


async def test_a_refused_iss_redeems_no_code(harness: LoginHarness) -> None:
    """Each refused response is followed by its genuine one, which succeeds: the refused one did
    not spend the code (the OP's codes are single use; a second redemption is invalid_grant and
    revokes the grant) nor the state."""
    await harness.start_op()
    for case, (make, status, reason) in ISS_CASES.items():
        async with browser() as http:
            callback = await harness.authorize(http, "alice")
            assert callback.query["iss"] == harness.op.issuer  # the OP sends it (RFC 9207)
            values = make(callback.query["iss"])
            query = [(k, v) for k, v in callback.query.items() if k != "iss"]
            query += [("iss", v) for v in values or ()]
            refused = await harness.get(http, callback.with_query(query))
            assert (refused.status, refused.body["reason"]) == (status, reason), case
            assert refused.headers["Referrer-Policy"] == "no-referrer"
            await assert_nothing_granted(harness, refused)
            assert await harness.stored("logins") == 1, case  # the state is still pending
            genuine = await harness.get(http, callback)
            assert genuine.status == 200, (case, genuine.text)
        async with aiohttp.ClientSession() as plain:  # then drop the session for the next case
            deleted = await harness.request(
                plain,
                "DELETE",
                f"{harness.url}/{DB}/_session",
                headers={"Cookie": f"{SESSION_COOKIE}={genuine.body['session_id']}"},
            )
            assert deleted.status == 200
    assert harness.upstream.requests == []  # no refused response reached the upstream


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hidden: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "input" and attr.get("type") == "hidden" and attr.get("name"):
            self.hidden[attr["name"] or ""] = attr.get("value") or ""


async def builtin_callback(
    h: LoginHarness, http: aiohttp.ClientSession, button: str = "authenticated"
) -> URL:
    """The built-in provider's redirect back (not followed)."""
    authorize = await h.start_login(http)
    page = await h.get(http, authorize)
    form = _Form()
    form.feed(page.text)
    fields = {**form.hidden, "username": "carol", button: "1"}
    posted = await h.request(http, "POST", authorize.join(URL("authenticate")), data=fields)
    assert posted.status == 302, posted.text
    return URL(posted.headers["Location"])


async def test_the_builtin_provider_sends_iss_and_the_callback_requires_it(
    harness: LoginHarness,
) -> None:
    provider = {
        "issuer": harness.test_issuer,
        "client_id": "sync_gateway",
        "validation_key": "any",
        "register": True,
    }
    await harness.start({"test": provider}, unsupported=TEST_PROVIDER_ON)
    async with aiohttp.ClientSession() as http:
        discovery = await harness.get(
            http, f"{harness.test_issuer}/.well-known/openid-configuration"
        )
        assert discovery.body["authorization_response_iss_parameter_supported"] is True
    async with browser() as http:
        callback = await builtin_callback(harness, http)
        assert callback.query["iss"] == harness.test_issuer
        missing = await harness.get(http, callback.without_query_params("iss"))
        assert (missing.status, missing.body["reason"]) == (400, ISS_MISSING)
        wrong = await harness.get(http, callback.update_query(iss=harness.op.issuer))
        assert (wrong.status, wrong.body["reason"]) == (400, ISS_MISMATCH)
        await assert_nothing_granted(harness, wrong)
        assert (await harness.get(http, callback)).status == 200
        # The error answer carries iss too (RFC 9207 2).
        refused = await builtin_callback(harness, http, "notauthenticated")
        assert refused.query["iss"] == harness.test_issuer
        assert refused.query["error"] == "invalid_request"


@dataclass
class MetadataWithout:
    """Serves the OP's discovery document minus some members (a provider that does not know
    RFC 9207); the sidecar reads it through `discovery_url`, everything else is the real OP."""

    source: str
    drop: tuple[str, ...]
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/openid-configuration"

    async def handle(self, request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as http, http.get(self.source) as response:
            doc = await response.json()
        return web.json_response({k: v for k, v in doc.items() if k not in self.drop})


@contextlib.asynccontextmanager
async def serving(meta: MetadataWithout) -> AsyncIterator[MetadataWithout]:
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", meta.handle)
    async with serving_app(app, meta.port):
        yield meta


async def test_without_the_flag_iss_is_optional_but_checked_when_present(
    harness: LoginHarness,
) -> None:
    drop = ("authorization_response_iss_parameter_supported",)
    async with serving(MetadataWithout(harness.op.discovery_url, drop)) as meta:
        await harness.start_op(discovery_url=meta.url)
        async with browser() as http:
            callback = await harness.authorize(http, "alice")
            wrong = await harness.get(http, callback.update_query(iss="https://elsewhere"))
            assert (wrong.status, wrong.body["reason"]) == (400, ISS_MISMATCH)
            absent = await harness.get(http, callback.without_query_params("iss"))
            assert absent.status == 200, absent.text


# --- provider and client text is quoted without markup ------------------------------------------

LONG = "a" * 300
# text → what a reason quotes of it
OUTSIDE_TEXT: dict[str, tuple[str, str]] = {
    "plain": ("the user cancelled", "the user cancelled"),
    "script": ('<script>alert("x")</script>', "scriptalert(x)/script"),
    "attribute breakout": ("\" onmouseover='x' a=\"", "onmouseover=x a="),
    "entities": ("&lt;b&gt; &amp;", "lt;bgt; amp;"),
    "backslash and backquote": ("a\\b`c`", "abc"),
    "CRLF header injection": ("x\r\nSet-Cookie: a=b\r\n", "xSet-Cookie: a=b"),
    "other controls": ("a\x00b\x07c\x1bd\x7fe\tf", "abcdef"),
    "unicode": ("caf\u00e9 \u202eevil \u200b\ufeff\U0001f600", "caf evil"),
    "only markup": ("<>&\"'", ""),
    "very long": (LONG, "a" * 200 + "..."),
}


@pytest.mark.parametrize("case", OUTSIDE_TEXT, ids=list(OUTSIDE_TEXT))
def test_outside_text(case: str) -> None:
    text, expected = OUTSIDE_TEXT[case]
    assert outside_text(text) == expected


@pytest.mark.parametrize("case", OUTSIDE_TEXT, ids=list(OUTSIDE_TEXT))
async def test_callback_error_text_is_never_reflected_with_markup(
    harness: LoginHarness, case: str
) -> None:
    text, expected = OUTSIDE_TEXT[case]
    await harness.start_op()
    async with aiohttp.ClientSession() as http:
        url = URL(f"{harness.url}/{DB}/_oidc_callback").with_query(
            error="access_denied", error_description=text, provider=text[:100] or "x"
        )
        answer = await harness.get(http, url)
    assert answer.status == 401
    assert (
        answer.body["reason"] == f"oidc callback received an error: {expected or 'access_denied'}"
    )
    assert not set(answer.text) & set("<>")
    await assert_nothing_granted(harness, answer)
    # The metric's provider label is a configured name or "-", never the caller's text.
    async with aiohttp.ClientSession() as http:
        metrics = await harness.get(http, f"{harness.admin_url}/_metrics")
    assert 'sidecar_logins_total{kind="login",provider="-",result="provider_error"} 1.0' in (
        metrics.text
    ), [line for line in metrics.text.splitlines() if "logins" in line]


@dataclass
class HostileTokenEndpoint:
    """A provider whose token endpoint answers a chosen OAuth error body. A fake: no real
    provider can be made to answer markup in its error; discovery and JWKS are genuine shapes."""

    answer: tuple[int, Any] = (400, {})
    port: int = field(default_factory=free_port)
    token_requests: int = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/auth",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
            }
        )

    async def jwks(self, request: web.Request) -> web.Response:
        from conftest import default_signing_keys
        from support import jwt_factory

        return web.json_response(jwt_factory.jwks(*default_signing_keys()))

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        status, body = self.answer
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")


@contextlib.asynccontextmanager
async def hostile_provider() -> AsyncIterator[HostileTokenEndpoint]:
    server = HostileTokenEndpoint()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", server.discovery)
    app.router.add_get("/jwks", server.jwks)
    app.router.add_post("/token", server.token)
    async with serving_app(app, server.port):
        yield server


# token endpoint answer → expected status and reason
TOKEN_ERRORS: dict[str, tuple[tuple[int, Any], int, str]] = {
    "markup code": (
        (400, {"error": "<script>alert(1)</script>"}),
        502,
        "provider answered scriptalert(1)/script",
    ),
    "markup description": (
        (400, {"error": "invalid_grant", "error_description": '<img src=x onerror="alert(1)">'}),
        401,
        "provider answered invalid_grant: img src=x onerror=alert(1)",
    ),
    "CRLF": (
        (400, {"error": "invalid_client\r\nX-A: b", "error_description": "a\r\nSet-Cookie: x"}),
        502,
        "provider answered invalid_clientX-A: b: aSet-Cookie: x",
    ),
    "quotes": (
        (400, {"error": "server_error", "error_description": 'it\'s "broken"'}),
        502,
        "provider answered server_error: its broken",
    ),
    "unicode": (
        (400, {"error": "access_denied", "error_description": "refus\u00e9 \u202e\U0001f600"}),
        401,
        "provider answered access_denied: refus",
    ),
    "very long": (
        (400, {"error": "x" * 100, "error_description": "d" * 1000}),
        502,
        f"provider answered {'x' * 64}...: {'d' * 200}...",
    ),
    "nothing left of the code": ((400, {"error": "<>"}), 502, "provider answered invalid_response"),
    "code not a string": ((400, {"error": 7}), 502, "provider answered invalid_response"),
}


async def test_token_endpoint_error_text_is_never_reflected_with_markup(
    harness: LoginHarness,
) -> None:
    async with hostile_provider() as provider:
        config = {"issuer": provider.issuer, "client_id": "c", "validation_key": "s"}
        await harness.start({"hostile": config})
        for case, (answer, status, reason) in TOKEN_ERRORS.items():
            provider.answer = answer
            async with browser() as http:
                state = (await harness.start_login(http)).query["state"]
                url = URL(f"{harness.url}/{DB}/_oidc_callback").with_query(code="c", state=state)
                refused = await harness.get(http, url)
            assert (refused.status, refused.body["reason"]) == (status, reason), case
            assert not set(refused.text) & set("<>"), case
            await assert_nothing_granted(harness, refused)
        assert provider.token_requests == len(TOKEN_ERRORS)


# --- Referrer-Policy ----------------------------------------------------------------------------


async def test_every_oidc_answer_has_referrer_policy_no_referrer(harness: LoginHarness) -> None:
    client = harness.client()
    builtin = {"issuer": harness.test_issuer, "client_id": "sg", "validation_key": "any"}
    await harness.start(
        {"op": harness.provider(client), "test": builtin},
        default="op",
        unsupported=TEST_PROVIDER_ON,
    )
    seen: list[tuple[str, int]] = []

    def check(what: str, answer: Answer) -> None:
        assert answer.headers.get("Referrer-Policy") == "no-referrer", (what, answer.status)
        seen.append((what, answer.status))

    base, testing = f"{harness.url}/{DB}", harness.test_issuer
    async with browser() as http:
        for path in (
            "_oidc",
            "_oidc?provider=nope",
            "_oidc_challenge",
            "_oidc_callback",
            "_oidc_callback?error=access_denied",
            "_oidc_callback?code=x&state=y",
            "_oidc_refresh",
            "_oidc_refresh?refresh_token=unknown",
        ):
            check(path, await harness.get(http, URL(f"{base}/{path}", encoded=True)))
        check("unknown db", await harness.get(http, f"{harness.url}/nodb/_oidc"))
        callback = await harness.authorize(http, "alice")
        login = await harness.get(http, callback)
        check("callback", login)
        refreshed = await harness.get(
            http, f"{base}/_oidc_refresh", params={"refresh_token": login.body["refresh_token"]}
        )
        check("refresh", refreshed)
        for path in (".well-known/openid-configuration", "certs", "authorize", "token"):
            check(path, await harness.get(http, f"{testing}/{path}"))
        check("token POST", await harness.request(http, "POST", f"{testing}/token", data={}))
        authorize = await harness.start_login(http, provider="test")
        check("authorize page", await harness.get(http, authorize))
        posted = await harness.request(
            http,
            "POST",
            authorize.join(URL("authenticate")),
            data={**dict(authorize.query), "username": "carol", "authenticated": "1"},
        )
        check("authenticate", posted)
    statuses = {status for _, status in seen}
    assert statuses >= {200, 302, 400, 401, 404, 405}, seen


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        ([("<script>", "a"), ("<script>", "b")], "parameter 'script' repeated"),
        ([("a\r\nb", "x" * 5000)], "parameter 'ab' is too long"),
        ([("k" * 100 + "<", "x" * 5000)], "parameter '" + "k" * 64 + "...' is too long"),
        ([('"\u00e9', object())], "parameter '' is not text"),
    ],
)
def test_builtin_provider_quotes_parameter_names_plainly(pairs: Any, reason: str) -> None:
    from sidecar.oidc.test_provider import _Refused, single_valued

    with pytest.raises(_Refused) as refused:
        single_valued(pairs)
    assert refused.value.body["reason"] == reason
