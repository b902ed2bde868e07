"""People in browsers: page-load detection, return targets (the open-redirect corpus), and the
whole sign-in as a scripted browser sees it (headers a browser sends, cookies, redirects),
against the built-in test provider of a real sidecar with a real redis-server.
"""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import DB, Answer, LoginHarness, browser, builtin_provider
from yarl import URL

from sidecar.browser import (
    accepts_html,
    is_page_load,
    login_path,
    logout_csrf_ok,
    logout_csrf_token,
    may_redirect_to_login,
    parse_origin,
    safe_return_target,
)
from sidecar.config import ConfigError, parse_settings
from sidecar.oidc.browser_answers import COOKIE_NOT_KEPT
from sidecar.oidc.routes import NO_STATE_COOKIE_HINT
from sidecar.pages import error_page, signed_in_page

# --------------------------------------------------------------------------- the corpus

CORPUS = Path(__file__).parent / "data" / "open_redirect_payloads.txt"
CORPUS_ALLOWED = ("https://app.example.com", "http://localhost:8080")


def _corpus() -> list[Any]:
    cases = []
    for number, line in enumerate(CORPUS.read_text().splitlines(), start=1):
        if not line or line.startswith("#"):
            continue
        verdict, _, payload = line.partition(" ")
        assert verdict in ("refuse", "accept"), f"line {number}: {line!r}"
        cases.append(pytest.param(verdict, json.loads(payload), id=f"L{number}"))
    return cases


CORPUS_CASES = _corpus()


def test_corpus_is_large_and_mostly_hostile() -> None:
    verdicts = [case.values[0] for case in CORPUS_CASES]
    assert verdicts.count("refuse") >= 500 and verdicts.count("accept") >= 20


@pytest.mark.parametrize(("verdict", "payload"), CORPUS_CASES)
def test_return_target_corpus(verdict: str, payload: str) -> None:
    expected = None if verdict == "refuse" else payload
    assert safe_return_target(payload, CORPUS_ALLOWED) == expected


def test_return_target_without_allow_list_is_same_origin_only() -> None:
    assert safe_return_target("/db/page?x=1") == "/db/page?x=1"
    assert safe_return_target("https://app.example.com/") is None
    assert safe_return_target(None) is None


@pytest.mark.parametrize(
    ("origin", "normalised"),
    [
        ("https://app.example.com", ("https", "app.example.com", 443)),
        ("https://app.example.com/", None),  # a URL, not an origin
        ("HTTPS://App.Example.com:443", ("https", "app.example.com", 443)),
        ("http://localhost:8080", ("http", "localhost", 8080)),
        ("http://127.0.0.1:3000", ("http", "127.0.0.1", 3000)),
        ("http://[::1]:8080", ("http", "[::1]", 8080)),
        ("https://[::1]", ("https", "[::1]", 443)),
        ("http://my_host.internal", ("http", "my_host.internal", 80)),
        ("capacitor://localhost", ("capacitor", "localhost", None)),  # an app's web view
        ("https://app.example.com/path", None),
        ("https://app.example.com//", None),
        ("https://app.example.com?x", None),
        ("https://app.example.com#x", None),
        ("https://user@app.example.com", None),
        ("https://*.example.com", None),
        ("app.example.com", None),
        ("//app.example.com", None),
        ("https://app.example.com:0", None),
        ("https://app.example.com:99999", None),
        ("https://app.example.com:", None),
        ("https://[not:ip]", None),
        ("https://[::1", None),
        ("https://app.example.com.", None),
        ("https://app..example.com", None),
        ("https://-app.example.com", None),
        ("https://ápp.example.com", None),
        ("https://app example.com", None),
        ("https://app.example.com ", None),
        (" https://app.example.com", None),
        ("https://app.example.com\r\n", None),
        ("https://%61pp.example.com", None),
        ("null", None),
        ("*", None),
        ("", None),
    ],
)
def test_parse_origin(origin: str, normalised: tuple[str, str, int | None] | None) -> None:
    """The one origin parser: the Origin header, `cors.origin` and `allowed_redirect_origins`."""
    assert parse_origin(origin) == normalised


def test_allowed_redirect_origins_are_checked_at_load() -> None:
    base = {"upstream": "http://127.0.0.1:1", "databases": {"db": {}}}
    ok = parse_settings(
        base | {"databases": {"db": {"allowed_redirect_origins": ["https://app.example.com"]}}}
    )
    assert ok.databases["db"].allowed_redirect_origins == ("https://app.example.com",)
    assert ok.databases["db"].browser_login is True
    for bad in ("https://app.example.com/x", "https://app.example.com/", "capacitor://localhost"):
        with pytest.raises(ConfigError) as caught:
            parse_settings(base | {"databases": {"db": {"allowed_redirect_origins": [bad]}}})
        assert caught.value.problems[0].startswith("databases.db.allowed_redirect_origins.0:")
    with pytest.raises(ConfigError) as caught:
        parse_settings(base | {"databases": {"db": {"browser_login": "sometimes"}}})
    assert caught.value.problems[0].startswith("databases.db.browser_login:")


@pytest.mark.parametrize(
    ("uri", "allowed", "public_url", "ok"),
    [
        ("https://app.example.com/signed-out", ["https://app.example.com"], None, True),
        ("https://app.example.com:443/bye?x=1", ["https://app.example.com"], None, True),
        ("https://sync.example.com/db/_oidc_logout/done", [], "https://sync.example.com", True),
        ("https://sync.example.com/db/_oidc_logout/done", [], None, False),
        ("https://evil.example.com/", ["https://app.example.com"], None, False),
        ("http://app.example.com/", ["https://app.example.com"], None, False),
        ("https://app.example.com:8443/", ["https://app.example.com"], None, False),
        ("https://user@app.example.com/", ["https://app.example.com"], None, False),
        ("https://app.example.com/%5c%5cevil", ["https://app.example.com"], None, False),
    ],
)
def test_post_logout_redirect_uri_follows_the_return_target_rule(
    uri: str, allowed: list[str], public_url: str | None, ok: bool
) -> None:
    provider = {"issuer": "https://op.example.com", "client_id": "c"}
    data: dict[str, Any] = {
        "upstream": "http://127.0.0.1:1",
        "databases": {
            "db": {
                "allowed_redirect_origins": allowed,
                "oidc": {"providers": {"op": provider | {"post_logout_redirect_uri": uri}}},
            }
        },
    }
    if public_url:
        data["public_url"] = public_url
    if ok:
        parse_settings(data)
        return
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    assert caught.value.problems == [
        "databases.db.oidc.providers.op.post_logout_redirect_uri: not an allowed return target: "
        "list its origin in databases.db.allowed_redirect_origins (or set public_url to this "
        "origin)"
    ]


# --------------------------------------------------------------------------- page loads

CHROME_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (CHROME_ACCEPT, True),
        (FIREFOX_ACCEPT, True),
        ("text/html", True),
        ("TEXT/HTML", True),
        ("application/xhtml+xml", True),
        ("text/html;q=0.5, application/json;q=0.5", True),
        ("*/*", False),
        ("", False),
        ("text/*", False),
        ("application/json", False),
        ("application/json, text/plain, */*", False),  # axios
        ("application/json, text/html;q=0.9", False),
        ("text/html;q=0", False),
        ("text/html;q=0.000, */*", False),
        ("text/html;q=2", False),  # malformed q: not a browser
        ("text/html;q=abc", False),
        ("text/html;q=0.1234", False),
        ("text/html;level=1;q=0.8, */*;q=0.1", True),
        ("image/webp,*/*", False),
        (",,,", False),
    ],
)
def test_accepts_html(accept: str, expected: bool) -> None:
    assert accepts_html(accept) is expected


NAVIGATE = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Accept": CHROME_ACCEPT}


@pytest.mark.parametrize(
    ("method", "headers", "page_load", "redirect"),
    [
        ("GET", NAVIGATE, True, True),
        ("HEAD", NAVIGATE, True, True),
        ("POST", NAVIGATE, True, False),  # a form post: an HTML error, never a redirect
        ("GET", {"Sec-Fetch-Mode": "navigate"}, True, True),
        ("GET", {"Sec-Fetch-Mode": "NAVIGATE"}, True, True),
        ("GET", {"Sec-Fetch-Mode": "cors", "Accept": CHROME_ACCEPT}, False, False),
        ("GET", {"Sec-Fetch-Mode": "no-cors", "Accept": "text/html"}, False, False),
        ("GET", {"Sec-Fetch-Mode": "same-origin", "Accept": "text/html"}, False, False),
        ("GET", {"Sec-Fetch-Mode": "websocket"}, False, False),
        ("GET", {"Accept": FIREFOX_ACCEPT}, True, True),  # a browser without Sec-Fetch-*
        ("POST", {"Accept": FIREFOX_ACCEPT}, False, False),
        ("GET", {"Accept": FIREFOX_ACCEPT, "X-Requested-With": "XMLHttpRequest"}, False, False),
        ("GET", {"Accept": "*/*"}, False, False),  # curl
        ("GET", {}, False, False),  # Couchbase Lite, PouchDB in Node
        ("GET", {"Accept": "application/json"}, False, False),
        ("GET", {**NAVIGATE, "Authorization": "Bearer x.y.z"}, True, False),
    ],
)
def test_page_load_and_redirect_decisions(
    method: str, headers: dict[str, str], page_load: bool, redirect: bool
) -> None:
    assert is_page_load(method, headers) is page_load
    assert may_redirect_to_login(method, headers) is redirect


def test_logout_csrf_token() -> None:
    token = logout_csrf_token("session-a")
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert token == logout_csrf_token("session-a") != logout_csrf_token("session-b")
    assert "session-a" not in token
    assert logout_csrf_ok("session-a", token)
    assert not logout_csrf_ok("session-b", token)
    assert not logout_csrf_ok("session-a", "")


def test_login_path() -> None:
    assert login_path(None, "db") == "/db/_oidc"
    assert login_path(None, "db", rd="/db/a?b=1&c=%2F") == "/db/_oidc?rd=/db/a?b%3D1%26c%3D%252F"
    assert login_path("https://sync.example.com/pre/", "db", provider=None, rd="/pre/db/x") == (
        "https://sync.example.com/pre/db/_oidc?rd=/pre/db/x"
    )


# --------------------------------------------------------------------------- the flow

TEST_PROVIDER_ON = {"oidc_test_provider": {"enabled": True}}
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def start(
    h: LoginHarness,
    *,
    db: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    **provider: Any,
) -> None:
    """The sidecar with the built-in test provider; `db` adds keys to database `db`,
    `settings` top-level ones."""
    config = h.config(
        {"test": builtin_provider(h, **provider)}, unsupported=TEST_PROVIDER_ON, **(settings or {})
    )
    config["databases"][DB].update(db or {})
    from support.sidecar import running_sidecar

    h.sidecar = await h.stack.enter_async_context(running_sidecar(config))
    await h.wait_ready()


class _Page(HTMLParser):
    """Forms (action, fields) and links of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((attr.get("action", ""), {}))
        elif tag == "input" and self.forms and attr.get("name"):
            self.forms[-1][1][attr["name"]] = attr.get("value", "")
        elif tag == "a" and attr.get("href"):
            self.links.append(attr["href"])


async def navigate(h: LoginHarness, http: aiohttp.ClientSession, url: str | URL) -> Answer:
    """A top-level page load; a str URL is sent as written (yarl would re-quote it)."""
    return await h.get(
        http, URL(url, encoded=True) if isinstance(url, str) else url, headers=NAVIGATE
    )


async def sign_in_at_provider(
    h: LoginHarness, http: aiohttp.ClientSession, authorize: URL, username: str, button: str
) -> URL:
    """The test provider's form, filled and posted like a browser; the callback URL."""
    page = await navigate(h, http, authorize)
    assert page.status == 200, page.text
    action, fields = _Page(page.text).forms[0]
    fields = {**fields, "username": username, button: "1"}
    posted = await h.request(
        http, "POST", authorize.join(URL(action)), data=fields, headers=NAVIGATE
    )
    assert posted.status == 302, posted.text
    return URL(posted.headers["Location"])


async def login_from_page(
    h: LoginHarness, http: aiohttp.ClientSession, page: str, username: str = "carol"
) -> tuple[URL, Answer]:
    """A page load without a session → login → the provider → the callback (answered)."""
    first = await navigate(h, http, f"{h.url}{page}")
    assert first.status == 302, first.text
    to_login = URL(first.headers["Location"])
    assert to_login.path == f"/{DB}/_oidc" and to_login.query["rd"] == page
    started = await navigate(h, http, URL(h.url).join(to_login))
    assert started.status == 302, started.text
    authorize = URL(started.headers["Location"])
    callback = await sign_in_at_provider(h, http, authorize, username, "authenticated")
    return callback, await navigate(h, http, callback)


async def through_landing(h: LoginHarness, http: aiohttp.ClientSession, answer: Answer) -> Answer:
    """The callback's redirect to the landing check (did the session cookie stick?), followed."""
    assert answer.status == 302, answer.text
    landing = URL(answer.headers["Location"])
    assert landing.path == f"/{DB}/_oidc_callback" and set(landing.query) == {"landed"}
    return await navigate(h, http, URL(h.url).join(landing))


def assert_page(answer: Answer, status: int) -> None:
    assert answer.status == status, answer.text
    for name, value in PAGE_HEADERS.items():
        assert answer.headers[name] == value, name
    csp = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "form-action 'self'" in csp


async def test_page_load_goes_through_login_and_lands_on_the_page(harness: LoginHarness) -> None:
    await start(harness)
    page = f"/{DB}/docs/a%20b?include_docs=true&x=%2F"
    async with browser() as http:
        first = await navigate(harness, http, f"{harness.url}{page}")
        started = await navigate(
            harness, http, URL(harness.url).join(URL(first.headers["Location"]))
        )
        authorize = URL(started.headers["Location"])
        # Security: the return target is neither sent to the provider nor put in a cookie.
        assert "docs" not in str(authorize) and "rd" not in authorize.query
        assert all("docs" not in c for c in started.set_cookies)
        logins = await harness.stored("logins")
        assert logins == 1
        callback = await sign_in_at_provider(harness, http, authorize, "carol", "authenticated")
        answered = await navigate(harness, http, callback)
        assert answered.cookie("SyncGatewaySession") is not None
        assert "id_token" not in answered.text and "eyJ" not in answered.text
        landed = await through_landing(harness, http, answered)
        assert landed.status == 302 and landed.headers["Location"] == page
        shown = await navigate(harness, http, f"{harness.url}{page}")
    assert shown.status == 200, shown.text
    assert harness.upstream.requests[-1]["path_qs"] == page
    assert harness.upstream.header(-1, "X-Forwarded-User") == ["test_carol"]
    assert len(harness.upstream.requests) == 1  # nothing reached it before the login


API_CLIENTS = [
    pytest.param({}, id="couchbase-lite"),
    pytest.param({"Accept": "*/*"}, id="curl"),
    pytest.param({"Accept": "application/json"}, id="pouchdb"),
    pytest.param({"Sec-Fetch-Mode": "cors", "Accept": "*/*"}, id="fetch"),
    pytest.param({"Sec-Fetch-Mode": "cors", "Accept": CHROME_ACCEPT}, id="fetch-html"),
    pytest.param({"Sec-Fetch-Mode": "no-cors", "Accept": "text/html"}, id="no-cors"),
    pytest.param({"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"}, id="xhr"),
]


@pytest.mark.parametrize("headers", API_CLIENTS)
async def test_api_clients_keep_the_json_401(
    harness: LoginHarness, headers: dict[str, str]
) -> None:
    await start(harness)
    async with browser() as http:
        answer = await harness.get(http, f"{harness.url}/{DB}/doc", headers=headers)
    assert answer.status == 401
    assert answer.body == {"error": "Unauthorized", "reason": "Login required"}
    assert answer.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("GET", {**NAVIGATE, "Authorization": "Bearer not-a-token"}, 401),
        ("GET", {**NAVIGATE, "Cookie": "SyncGatewaySession=bad"}, 302),  # expired session
        ("POST", NAVIGATE, 401),
        ("HEAD", NAVIGATE, 302),
    ],
)
async def test_which_page_loads_are_redirected(
    harness: LoginHarness, method: str, headers: dict[str, str], status: int
) -> None:
    await start(harness)
    async with aiohttp.ClientSession() as http:
        answer = await harness.request(http, method, f"{harness.url}/{DB}/doc", headers=headers)
    assert answer.status == status, answer.text
    if status == 302:
        assert answer.headers["Location"] == f"/{DB}/_oidc?rd=/{DB}/doc"
    elif method != "HEAD":
        assert_page(answer, 401)


async def test_browser_login_off_gives_an_html_401(harness: LoginHarness) -> None:
    await start(harness, db={"browser_login": False})
    async with browser() as http:
        page = await navigate(harness, http, f"{harness.url}/{DB}/doc")
        api = await harness.get(http, f"{harness.url}/{DB}/doc")
    assert_page(page, 401)
    assert "Login required" in page.text and "401 Unauthorized" in page.text
    assert api.status == 401 and api.body == {"error": "Unauthorized", "reason": "Login required"}


async def test_public_url_prefix_in_the_redirect(harness: LoginHarness) -> None:
    """Behind a proxy that adds a path prefix, both the login and the return target carry it."""
    public = f"{harness.url}/pre"
    config = harness.config(
        {"test": builtin_provider(harness)}, unsupported=TEST_PROVIDER_ON, public_url=public
    )
    from support.sidecar import running_sidecar

    await harness.stack.enter_async_context(running_sidecar(config))
    async with aiohttp.ClientSession() as http:
        answer = await navigate(harness, http, f"{harness.url}/{DB}/doc?a=1")
    assert answer.status == 302
    assert answer.headers["Location"] == f"{public}/{DB}/_oidc?rd=/pre/{DB}/doc?a%3D1"


def test_pages_escape_what_they_show() -> None:
    page = signed_in_page(
        name='<img src=x onerror="a">&',
        onward='/db/"><script>',
        logout_url="/db/_oidc_logout",
        csrf_token='"><x',
    )
    text = page.text or ""
    assert "<img" not in text and "<script>" not in text and '"><x' not in text
    assert "Signed in as &lt;img src=x onerror=&quot;a&quot;&gt;&amp;" in text
    error = error_page(400, "Bad Request", "<b>bad</b>", retry_url='/db/_oidc?rd="x')
    assert "<b>" not in (error.text or "") and "&quot;x" in (error.text or "")
    assert error.status == 400


async def test_signed_in_page_without_return_target(harness: LoginHarness) -> None:
    await start(harness)
    async with browser() as http:
        started = await navigate(harness, http, f"{harness.url}/{DB}/_oidc")
        authorize = URL(started.headers["Location"])
        callback = await sign_in_at_provider(harness, http, authorize, "carol", "authenticated")
        page = await navigate(harness, http, callback)
    assert_page(page, 200)
    assert "<h1>Signed in as test_carol</h1>" in page.text
    session_id = page.cookie("SyncGatewaySession")
    assert session_id is not None
    session_id = session_id.split(";")[0].partition("=")[2]
    parsed = _Page(page.text)
    assert parsed.forms == [(f"/{DB}/_oidc_logout", {"csrf": logout_csrf_token(session_id)})]
    assert f"/{DB}/" in parsed.links
    assert session_id not in page.text and "eyJ" not in page.text  # no session id, no token


async def test_reload_and_back_on_a_used_callback(harness: LoginHarness) -> None:
    await start(harness)
    async with browser() as http:
        callback, answered = await login_from_page(harness, http, f"/{DB}/page?x=1")
        first = await through_landing(harness, http, answered)
        assert first.status == 302 and first.headers["Location"] == f"/{DB}/page?x=1"
        again = await navigate(harness, http, callback)  # reload: same place, no error
        assert again.status == 302 and again.headers["Location"] == f"/{DB}/page?x=1"
        assert await harness.stored("sessions") == 1  # no second login happened

    async with browser() as other:  # another browser, no session: the error stands
        stranger = await navigate(harness, other, callback)
    assert_page(stranger, 400)
    assert "No state cookie found for callback" in stranger.text
    assert f"/{DB}/_oidc" in _Page(stranger.text).links


async def test_reload_after_login_without_target_shows_the_signed_in_page(
    harness: LoginHarness,
) -> None:
    await start(harness)
    async with browser() as http:
        started = await navigate(harness, http, f"{harness.url}/{DB}/_oidc")
        callback = await sign_in_at_provider(
            harness, http, URL(started.headers["Location"]), "dave", "authenticated"
        )
        first = await navigate(harness, http, callback)
        again = await navigate(harness, http, callback)
        api = await harness.get(http, callback)  # an API client reloading: Sync Gateway's error
    assert_page(first, 200)
    assert_page(again, 200)
    assert "Signed in as test_dave" in again.text
    assert api.status == 400
    assert api.body == {
        "error": "Bad Request",
        "reason": "OIDC Auth Failure: No state cookie found for callback",
    }


async def test_cancel_at_the_provider_offers_try_again(harness: LoginHarness) -> None:
    await start(harness)
    async with browser() as http:
        first = await navigate(harness, http, f"{harness.url}/{DB}/page")
        started = await navigate(
            harness, http, URL(harness.url).join(URL(first.headers["Location"]))
        )
        authorize = URL(started.headers["Location"])
        callback = await sign_in_at_provider(harness, http, authorize, "x", "notauthenticated")
        page = await navigate(harness, http, callback)
    assert_page(page, 401)
    assert "the user did not authenticate" in page.text
    assert _Page(page.text).links == [f"/{DB}/_oidc?rd=/{DB}/page"]
    assert await harness.stored("logins") == 0  # the abandoned login is gone


async def test_error_pages_escape_provider_text(harness: LoginHarness) -> None:
    await start(harness)
    evil = "<script>alert(1)</script>"
    async with browser() as http:
        page = await navigate(
            harness,
            http,
            URL(f"{harness.url}/{DB}/_oidc_callback").with_query(
                error="access_denied", error_description=evil
            ),
        )
        api = await harness.get(
            http,
            URL(f"{harness.url}/{DB}/_oidc_callback").with_query(
                error="access_denied", error_description=evil
            ),
        )
    assert_page(page, 401)
    # outside text loses its markup characters before it reaches any page
    assert "<script>" not in page.text and "scriptalert(1)/script" in page.text
    assert api.status == 401 and api.body["error"] == "Unauthorized"


REFUSED_IN_THE_FLOW = [
    "//evil.com",
    "/\\evil.com",
    "/%2f%2fevil.com",
    "/%09/evil.com",
    "https://evil.com/",
    "javascript:alert(1)",
    "https://app.example.com@evil.com/",
    "/%0d%0aSet-Cookie:a=b",
    "\uff0f\uff0fevil.com",
]


@pytest.mark.parametrize("rd", REFUSED_IN_THE_FLOW)
async def test_refused_return_targets_land_on_the_signed_in_page(
    harness: LoginHarness, rd: str
) -> None:
    await start(harness, db={"allowed_redirect_origins": ["https://app.example.com"]})
    async with browser() as http:
        started = await navigate(harness, http, URL(f"{harness.url}/{DB}/_oidc").with_query(rd=rd))
        callback = await sign_in_at_provider(
            harness, http, URL(started.headers["Location"]), "erin", "authenticated"
        )
        page = await navigate(harness, http, callback)
    assert_page(page, 200)
    assert "Signed in as test_erin" in page.text
    assert "Location" not in page.headers


async def test_allow_listed_origin_is_a_return_target(harness: LoginHarness) -> None:
    await start(harness, db={"allowed_redirect_origins": ["https://app.example.com"]})
    target = "https://app.example.com/after?login=1"
    async with browser() as http:
        started = await navigate(
            harness, http, URL(f"{harness.url}/{DB}/_oidc").with_query(rd=target)
        )
        callback = await sign_in_at_provider(
            harness, http, URL(started.headers["Location"]), "fay", "authenticated"
        )
        landed = await through_landing(harness, http, await navigate(harness, http, callback))
    assert landed.status == 302 and landed.headers["Location"] == target


async def test_api_callback_is_unchanged_with_a_return_target(harness: LoginHarness) -> None:
    """Couchbase Lite never sees the browser answer, even when a login carried `rd`."""
    await start(harness)
    async with browser() as http:
        authorize = await harness.start_login(http, rd=f"/{DB}/page")
        page = await harness.get(http, authorize)
        action, fields = _Page(page.text).forms[0]
        posted = await harness.request(
            http,
            "POST",
            authorize.join(URL(action)),
            data={**fields, "username": "gil", "authenticated": "1"},
        )
        answer = await harness.get(http, posted.headers["Location"])
    assert answer.status == 200
    assert sorted(answer.body) == ["id_token", "name", "refresh_token", "session_id"]


async def test_disable_session_never_redirects(harness: LoginHarness) -> None:
    """No session, nothing to come back with: a redirect would loop back to the login."""
    await start(harness, disable_session=True)
    async with browser() as http:
        callback, page = await login_from_page(harness, http, f"/{DB}/page")
    assert_page(page, 200)
    parsed = _Page(page.text)
    assert parsed.forms == [] and parsed.links == [f"/{DB}/page"]


async def test_signed_in_page_lets_sign_out_continue_to_the_provider(
    harness: LoginHarness,
) -> None:
    """With the real OP (it publishes an end_session_endpoint), the sign-out form may go on
    there: browsers apply form-action to the redirects that follow a form post."""
    await harness.start_op(user_prefix="op")
    async with browser() as http:
        callback = await harness.authorize(http, "alice")
        page = await navigate(harness, http, callback)
    assert_page(page, 200)
    assert "Signed in as op_alice" in page.text
    csp = page.headers["Content-Security-Policy"]
    assert f"form-action 'self' {harness.op.issuer};" in csp


# --------------------------------------------------------------------------- redirect loops


@pytest.mark.parametrize("disable_callback_state", [True, False])
async def test_a_browser_that_drops_the_cookie_gets_an_explanation_not_a_loop(
    harness: LoginHarness, disable_callback_state: bool
) -> None:
    """`cookie_secure: always` over plain http: the browser keeps no cookie of ours. Without a
    state cookie check the callback succeeds, so the landing check must catch it; with one the
    callback itself fails. Either way one page, no redirect back to the login."""
    await start(
        harness,
        settings={"session": {"cookie_secure": "always"}},
        disable_callback_state=disable_callback_state,
    )
    page = f"/{DB}/page"
    async with browser() as http:  # aiohttp's jar, like a browser, sends no Secure cookie on http
        callback, answered = await login_from_page(harness, http, page)
        if disable_callback_state:
            answered = await through_landing(harness, http, answered)
    assert_page(answered, 400)
    assert "Location" not in answered.headers
    if disable_callback_state:
        assert html.escape(COOKIE_NOT_KEPT) in answered.text
        assert _Page(answered.text).links == [f"/{DB}/_oidc?rd={page}"]  # "Try again", by hand
    else:
        hint = "No state cookie found for callback. " + NO_STATE_COOKIE_HINT
        assert html.escape(hint) in answered.text
        # Security: the return target goes only to the browser that proved it began the login.
        assert _Page(answered.text).links == [f"/{DB}/_oidc"]


@pytest.mark.parametrize(
    ("landed", "cookie", "status"),
    [
        ("0" * 64, True, 400),  # unknown sign-in
        ("x", True, 400),  # not a digest: no store lookup
        ("", True, 400),
        (None, False, 400),  # the right sign-in, the cookie did not come back
        (None, True, 302),
    ],
)
async def test_the_landing_check(
    harness: LoginHarness, landed: str | None, cookie: bool, status: int
) -> None:
    await start(harness)
    async with browser() as http:
        _, answered = await login_from_page(harness, http, f"/{DB}/page")
        landing = URL(answered.headers["Location"])
        if landed is not None:
            landing = landing.with_query(landed=landed)
        if not cookie:
            http.cookie_jar.clear()
        answer = await navigate(harness, http, URL(harness.url).join(landing))
    assert answer.status == status, answer.text
    if status == 302:
        assert answer.headers["Location"] == f"/{DB}/page"
    else:
        assert_page(answer, 400)
