"""CORS for other sites' pages (sidecar/cors.py): preflights answered by the sidecar without
credentials and never forwarded, grants on every answer to a listed origin (proxied, streamed,
the sidecar's own, errors), the upstream's own CORS headers dropped, `login_origin` only on
`_session`, and the same list deciding the cookie Origin policy. A real sidecar, a real
upstream, a real key server for bearer tokens; a real chromium where one is installed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import KeyServer, admin_session
from multidict import CIMultiDict
from support.chromium import Chromium, executable
from support.redis_server import free_port
from support.sidecar import Sidecar, base_config, running_sidecar, serving, serving_app

from sidecar.config import ConfigError, parse_settings
from sidecar.cors import METHODS

DB = "db"
COOKIE = "SyncGatewaySession"
AUDIENCE = "cors-client"
APP = "https://app.example.com"
LOGIN = "https://login.example.com"
EVIL = "https://evil.example"
ALLOW_HEADERS = "Authorization, Content-Type, X-Custom"
BIG = 100 * 1024  # above the proxy's SMALL_BODY: the answer is streamed (before_send path)


@dataclass
class CorsUpstream:
    """An upstream that sends CORS headers of its own (which must never reach the client)."""

    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close()
            return ws
        headers = {
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Methods": "TRACE",
            "Access-Control-Max-Age": "99999",
            "Access-Control-Expose-Headers": "X-Secret",
            "Vary": "Accept-Encoding",
        }
        if request.path.endswith("/big"):
            response = web.StreamResponse(headers=headers)  # no length: streamed through
            await response.prepare(request)
            await response.write(b"x" * BIG)
            await response.write_eof()
            return response
        return web.json_response({"ok": True}, headers=headers)


@dataclass
class Env:
    sidecar: Sidecar
    upstream: CorsUpstream
    ks: KeyServer
    session_id: str = ""

    @property
    def url(self) -> str:
        return self.sidecar.url

    def credentials(self, kind: str) -> list[tuple[str, str]]:
        if kind == "bearer":
            return [("Authorization", f"Bearer {self.ks.token(AUDIENCE, sub='alice')}")]
        if kind == "cookie":
            return [("Cookie", f"{COOKIE}={self.session_id}")]
        return []


def cors_config(**extra: Any) -> dict[str, Any]:
    return {
        "origin": [APP, "capacitor://localhost"],
        "login_origin": [LOGIN],
        "headers": ["X-Custom"],
        "expose_headers": ["ETag", "X-Request-ID"],
        "max_age": 120,
        **extra,
    }


@contextlib.asynccontextmanager
async def start(ks: KeyServer, cors: dict[str, Any] | None = None) -> AsyncIterator[Env]:
    upstream = CorsUpstream()
    provider = {"issuer": ks.issuer, "client_id": AUDIENCE, "register": True, "user_prefix": "ks"}
    database = {
        "oidc": {"providers": {"ks": provider}},
        "cors": cors_config() if cors is None else cors,
    }
    async with serving(upstream.handle) as upstream.url:
        config = base_config(
            free_port(), free_port(), upstream=upstream.url, databases={DB: database}
        )
        async with running_sidecar(config) as sidecar:
            env = Env(sidecar, upstream, ks)
            env.session_id = await admin_session(sidecar.admin_url, DB, "alice")
            yield env


@pytest.fixture
async def env(key_server: KeyServer) -> AsyncIterator[Env]:
    async with start(key_server) as value:
        yield value


async def call(
    method: str, url: str, headers: list[tuple[str, str]], **kwargs: Any
) -> tuple[int, CIMultiDict[str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, url, headers=CIMultiDict(headers), allow_redirects=False, **kwargs
        ) as r,
    ):
        await r.read()
        return r.status, CIMultiDict(r.headers)


def access_control(headers: CIMultiDict[str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


def varies_by_origin(headers: CIMultiDict[str]) -> bool:
    return any(
        t.strip().lower() == "origin" for v in headers.getall("Vary", ()) for t in v.split(",")
    )


GRANTED_PREFLIGHT = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": METHODS,
    "Access-Control-Allow-Headers": ALLOW_HEADERS,
    "Access-Control-Max-Age": "120",
}

# (path, Origin header values, credentials sent along, granted?)
PREFLIGHTS = [
    ("/db/doc", [APP], "none", True),
    ("/db/doc", ["capacitor://localhost"], "none", True),
    ("/db/", [APP], "none", True),  # PouchDB's database URL
    ("/db", [APP], "none", True),
    ("/db/_changes?feed=longpoll", [APP], "none", True),
    ("/db/_session", [APP], "none", True),
    ("/db/_session", [LOGIN], "none", True),  # login_origin: the session endpoint only
    ("/db/_oidc_refresh", [APP], "none", True),
    ("/db/doc", [APP], "bearer", True),  # credentials on a preflight: ignored, never checked
    ("/db/doc", [APP], "cookie", True),
    ("/db/doc", [LOGIN], "none", False),
    ("/db/doc", [EVIL], "none", False),
    ("/db/doc", ["null"], "none", False),
    ("/db/doc", ["HTTPS://APP.EXAMPLE.COM"], "none", False),  # browsers send it serialized
    ("/db/doc", [f"{APP}/"], "none", False),
    ("/db/doc", [APP, APP], "none", False),  # two Origin headers: nobody's
    ("/db/doc", [f"{APP}, {EVIL}"], "none", False),
    ("/db/_session", [EVIL], "none", False),
]


@pytest.mark.parametrize(("path", "origins", "credentials", "granted"), PREFLIGHTS)
async def test_preflight(
    env: Env, path: str, origins: list[str], credentials: str, granted: bool
) -> None:
    """204 always (Sync Gateway's answer); the grants only for a listed origin; the upstream
    never sees a preflight."""
    headers = [
        *(("Origin", o) for o in origins),
        ("Access-Control-Request-Method", "PUT"),
        ("Access-Control-Request-Headers", "authorization,content-type"),
        *env.credentials(credentials),
    ]
    status, answer = await call("OPTIONS", f"{env.url}{path}", headers)
    assert status == 204
    expected = {"Access-Control-Allow-Origin": origins[0], **GRANTED_PREFLIGHT} if granted else {}
    assert access_control(answer) == expected
    assert varies_by_origin(answer)
    assert env.upstream.requests == []


async def test_preflight_of_an_unknown_database_is_404(env: Env) -> None:
    headers = [("Origin", APP), ("Access-Control-Request-Method", "GET")]
    status, answer = await call("OPTIONS", f"{env.url}/nodb/doc", headers)
    assert (status, access_control(answer)) == (404, {})
    assert env.upstream.requests == []


@pytest.mark.parametrize(
    ("headers", "credentials", "status", "forwarded"),
    [
        # Not a preflight (no Access-Control-Request-Method, or no Origin): an ordinary
        # OPTIONS request, authenticated and proxied like every method.
        ([("Origin", APP)], "none", 401, False),
        ([("Access-Control-Request-Method", "PUT")], "none", 401, False),
        ([], "none", 401, False),
        ([("Origin", APP)], "bearer", 200, True),
        ([], "cookie", 200, True),
    ],
)
async def test_options_that_is_not_a_preflight(
    env: Env, headers: list[tuple[str, str]], credentials: str, status: int, forwarded: bool
) -> None:
    got, _ = await call("OPTIONS", f"{env.url}/db/doc", [*headers, *env.credentials(credentials)])
    assert got == status
    assert env.upstream.requests == ([("OPTIONS", "/db/doc")] if forwarded else [])


GRANT = {"Access-Control-Allow-Credentials": "true"}
EXPOSE = {"Access-Control-Expose-Headers": "ETag, X-Request-ID"}

# (method, path, credentials, Origin values, status, granted?)
ACTUAL = [
    # Proxied answers: the upstream's own CORS headers replaced by the sidecar's.
    ("GET", "/db/doc", "bearer", [APP], 200, True),
    ("GET", "/db/doc", "cookie", [APP], 200, True),
    ("GET", "/db/big", "bearer", [APP], 200, True),  # streamed
    ("PUT", "/db/doc", "bearer", ["capacitor://localhost"], 200, True),
    ("GET", "/db/doc", "bearer", [EVIL], 200, False),
    ("GET", "/db/doc", "cookie", [EVIL], 200, False),
    ("GET", "/db/doc", "bearer", ["null"], 200, False),
    ("GET", "/db/doc", "bearer", [LOGIN], 200, False),  # login_origin: _session only
    ("GET", "/db/doc", "bearer", [APP, APP], 200, False),
    ("GET", "/db/big", "bearer", [EVIL], 200, False),
    # Errors: a page must be able to read its 401 to start a login.
    ("GET", "/db/doc", "none", [APP], 401, True),
    ("GET", "/db/doc", "none", [EVIL], 401, False),
    # The sidecar's own endpoints.
    ("GET", "/db/_session", "cookie", [APP], 200, True),
    ("GET", "/db/_session", "none", [APP], 200, True),
    ("POST", "/db/_session", "cookie", [APP], 200, True),
    ("POST", "/db/_session", "cookie", [LOGIN], 200, True),
    ("POST", "/db/_session", "cookie", [EVIL], 400, False),  # the cookie Origin policy
    ("DELETE", "/db/_session", "cookie", [LOGIN], 200, True),
    ("GET", "/db/_oidc_refresh", "none", [APP], 400, True),
]


@pytest.mark.parametrize(("method", "path", "credentials", "origins", "status", "granted"), ACTUAL)
async def test_actual_request(
    env: Env,
    method: str,
    path: str,
    credentials: str,
    origins: list[str],
    status: int,
    granted: bool,
) -> None:
    headers = [*(("Origin", o) for o in origins), *env.credentials(credentials)]
    kwargs: dict[str, Any] = {"json": {}} if method in ("POST", "PUT") else {}
    got, answer = await call(method, f"{env.url}{path}", headers, **kwargs)
    assert got == status
    expected = {"Access-Control-Allow-Origin": origins[0], **GRANT, **EXPOSE} if granted else {}
    assert access_control(answer) == expected
    assert varies_by_origin(answer)


@pytest.mark.parametrize("path", ["/db/doc", "/db/big"])
async def test_no_origin_no_cors_headers(env: Env, path: str) -> None:
    """Native clients send no Origin: no grant, and the upstream's CORS headers are dropped."""
    status, answer = await call("GET", f"{env.url}{path}", env.credentials("bearer"))
    assert (status, access_control(answer)) == (200, {})
    assert answer.getall("Vary") == ["Accept-Encoding"]


async def test_no_cors_configured_no_grant(key_server: KeyServer) -> None:
    """Without a `cors` block nothing is granted: the upstream's own `*` does not leak through."""
    async with start(key_server, cors={}) as env:
        headers = [("Origin", APP), *env.credentials("bearer")]
        status, answer = await call("GET", f"{env.url}/db/doc", headers)
        assert (status, access_control(answer)) == (200, {})
        preflight = [("Origin", APP), ("Access-Control-Request-Method", "GET")]
        status, answer = await call("OPTIONS", f"{env.url}/db/doc", preflight)
        assert (status, access_control(answer)) == (204, {})
        assert env.upstream.requests == [("GET", "/db/doc")]


async def test_defaults(key_server: KeyServer) -> None:
    async with start(key_server, cors={"origin": [APP]}) as env:
        preflight = [("Origin", APP), ("Access-Control-Request-Method", "PUT")]
        _, answer = await call("OPTIONS", f"{env.url}/db/doc", preflight)
        assert answer["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
        assert answer["Access-Control-Max-Age"] == "600"
        _, answer = await call("GET", f"{env.url}/db/doc", [("Origin", APP)])
        assert "Access-Control-Expose-Headers" not in answer


async def test_login_origin_is_not_for_websockets(env: Env) -> None:
    """A websocket with a cookie needs `cors.origin`; `login_origin` is for `_session` only."""
    for origin, expected in ((APP, 101), (LOGIN, 403)):
        headers = CIMultiDict([("Origin", origin), *env.credentials("cookie")])
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(f"{env.url}/db/_ws", headers=headers):
                    status = 101
            except aiohttp.WSServerHandshakeError as exc:
                status = exc.status
        assert status == expected


@pytest.mark.parametrize(
    ("cors", "problem"),
    [
        ({"origin": ["*"]}, "databases.db.cors.origin.0: '*' is not allowed"),
        ({"login_origin": ["null"]}, "databases.db.cors.login_origin.0: 'null' is not an origin"),
        ({"origin": ["https://a.example/x"]}, "databases.db.cors.origin.0: "),
        ({"headers": ["X Bad"]}, "databases.db.cors.headers.0: 'X Bad' is not an HTTP header"),
        ({"expose_headers": [""]}, "databases.db.cors.expose_headers.0: "),
        ({"max_age": -1}, "databases.db.cors.max_age: must be at least 0"),
        ({"max_age": 86401}, "databases.db.cors.max_age: must be at most 86400"),
        ({"origins": []}, "databases.db.cors.origins: unknown key"),
    ],
)
def test_cors_config_errors(cors: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"upstream": "http://127.0.0.1:9", "databases": {DB: {"cors": cors}}})
    (only,) = caught.value.problems
    assert only.startswith(problem)


def test_cors_origins_are_kept_as_browsers_send_them() -> None:
    settings = parse_settings(
        {
            "upstream": "http://127.0.0.1:9",
            "databases": {
                DB: {"cors": {"origin": ["HTTPS://App.Example.com:443", "http://h.example:8080"]}}
            },
        }
    )
    assert settings.databases[DB].cors.origin == (APP, "http://h.example:8080")


# ------------------------------------------------------------------ a real browser


def _page_server() -> web.Application:
    """A page of another origin (another port of 127.0.0.1), for the browser to run a script in."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>app</title>", content_type="text/html")

    app.router.add_get("/", page)
    return app


BROWSER_FETCH = """
fetch(%(url)s, {method: "PUT", credentials: "include",
                headers: {"Authorization": %(auth)s, "Content-Type": "application/json"},
                body: "{}"})
  .then(r => r.json().then(b => "status " + r.status + " " + JSON.stringify(b)))
  .catch(e => "failed: " + e.name)
"""
COOKIE_FETCH = """
fetch(%(url)s, {credentials: "include"})
  .then(r => r.json().then(b => "status " + r.status + " " + b.userCtx.name))
  .catch(e => "failed: " + e.name)
"""


@pytest.mark.skipif(executable() is None, reason="chromium is not installed")
async def test_a_browser_page_on_a_listed_origin_can_use_the_api(key_server: KeyServer) -> None:
    """Chromium, a page on origin A (another port of 127.0.0.1): a bearer PUT (preflighted)
    and a cookie GET with `credentials: 'include'` succeed when A is listed and fail (the
    browser refuses to hand the answer over) from an unlisted origin B."""
    async with (
        serving_app(_page_server()) as origin_a,
        serving_app(_page_server()) as origin_b,
        start(key_server, cors={"origin": [origin_a]}) as env,
        Chromium.launch() as chrome,
    ):
        # The session cookie in the browser (same site as both pages: 127.0.0.1).
        token = key_server.token(AUDIENCE, sub="alice")
        async with chrome.page("cors") as page:
            await page.call(
                "Network.setCookie",
                name=COOKIE,
                value=env.session_id,
                url=f"{env.url}/{DB}/",
                path=f"/{DB}",
                httpOnly=True,
            )
            for origin, works in ((origin_a, True), (origin_b, False)):
                await page.goto(f"{origin}/")
                bearer = await page.evaluate(
                    BROWSER_FETCH
                    % {"url": repr(f"{env.url}/{DB}/doc"), "auth": repr(f"Bearer {token}")}
                )
                cookie = await page.evaluate(
                    COOKIE_FETCH % {"url": repr(f"{env.url}/{DB}/_session")}
                )
                if works:
                    assert bearer == 'status 200 {"ok":true}'
                    assert cookie == "status 200 alice"
                else:
                    assert bearer == cookie == "failed: TypeError"
        # The preflights never reached the upstream; only A's PUT did.
        assert env.upstream.requests == [("PUT", "/db/doc")]
