"""Session rules in front of browsers and ingresses: the absolute lifetime, the admin API only
looking, Secure cookies behind TLS (direct or through a trusted proxy), answers carrying
sessions kept out of caches, and the Origin policy for cookie sessions. Real sidecar, real
upstream, real key server for bearer tokens, real redis-server where the store matters."""

from __future__ import annotations

import contextlib
import datetime
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import KeyServer, admin_session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict
from support.redis_server import RedisServer, free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar, serving

from sidecar import keys
from sidecar.app import create_admin_app, create_app, make_runner
from sidecar.config import parse_settings
from sidecar.sessions.cookies import private_cache_control

DB = "db"
COOKIE = "SyncGatewaySession"
STATE = "sg-oidc-state"
AUDIENCE = "policy-client"
ALLOWED = ["https://app.example.com", "capacitor://localhost"]


@dataclass
class Env:
    sidecar: Sidecar
    upstream: Upstream
    ks: KeyServer

    @property
    def url(self) -> str:
        return self.sidecar.url

    @property
    def origin(self) -> str:
        return self.sidecar.url  # http://127.0.0.1:<port>

    def bearer(self, name: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ks.token(AUDIENCE, sub=name)}"}

    async def session(self, name: str = "alice", **body: Any) -> str:
        return await admin_session(self.sidecar.admin_url, DB, name, **body)


def config(port: int, admin_port: int, upstream: str, ks: KeyServer, **settings: Any) -> Any:
    provider = {"issuer": ks.issuer, "client_id": AUDIENCE, "register": True, "user_prefix": "ks"}
    database = {
        "oidc": {"providers": {"ks": {**provider, "validation_key": "s3cret"}}},
        "cors": {"origin": ALLOWED},
    }
    return base_config(port, admin_port, upstream=upstream, databases={DB: database}, **settings)


@contextlib.asynccontextmanager
async def start(ks: KeyServer, upstream: Upstream, **settings: Any) -> AsyncIterator[Env]:
    async with running_sidecar(config(free_port(), free_port(), upstream.url, ks, **settings)) as s:
        yield Env(s, upstream, ks)


@pytest.fixture
async def env(key_server: KeyServer, upstream: Upstream) -> AsyncIterator[Env]:
    async with start(key_server, upstream) as value:
        yield value


async def call(
    method: str, url: str, headers: Any = None, **kwargs: Any
) -> tuple[int, CIMultiDict[str], Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, headers=headers, allow_redirects=False, **kwargs) as r,
    ):
        body = await r.json() if r.content_type == "application/json" else await r.read()
        return r.status, CIMultiDict(r.headers), body


def cookie(headers: CIMultiDict[str], name: str) -> dict[str, Any] | None:
    """The attributes of the Set-Cookie for `name` (value under "value", flags as booleans),
    None if the answer does not set it."""
    for line in headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(line)
        if name in jar:
            morsel = jar[name]
            flags = {flag: bool(morsel[flag]) for flag in ("secure", "httponly")}
            return {**dict(morsel), **flags, "value": morsel.value}
    return None


def rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


async def backdated_session(env: Env, *, age: float, ttl: int = 1000) -> tuple[str, float]:
    """A session created `age` seconds ago (so due for extension), straight through the
    sidecar's own store; returns (id, expires)."""
    await env.session("alice")  # registers the user
    store = env.sidecar.app[keys.STORE]
    user = await store.get_user(DB, "alice")
    assert user is not None
    session_id, session = await store.create_session(
        user, ttl=ttl, provider=None, now=time.time() - age
    )
    return session_id, session.expires


# ------------------------------------------------------------------ absolute lifetime


async def test_max_lifetime_caps_extension_and_admin_sessions(
    key_server: KeyServer, upstream: Upstream
) -> None:
    """ttl 60, max_lifetime 100: a session 50 s old is extended to its absolute end (50 s from
    now), not a full ttl; the cookie sent again says so; an admin ttl of an hour gets 100 s."""
    async with start(key_server, upstream, session={"ttl": 60, "max_lifetime": 100}) as env:
        session_id, _ = await backdated_session(env, age=50, ttl=60)
        now = time.time()
        status, headers, _ = await call(
            "GET", f"{env.url}/{DB}/doc", headers={"Cookie": f"{COOKIE}={session_id}"}
        )
        assert status == 200
        sent = cookie(headers, COOKIE)
        assert sent is not None and sent["value"] == session_id
        cookie_expires = parsedate_to_datetime(sent["expires"]).timestamp()
        assert abs(cookie_expires - (now + 50)) <= 2  # not now + 60
        status, _, info = await call("GET", f"{env.sidecar.admin_url}/{DB}/_session/{session_id}")
        assert status == 200 and abs(rfc3339(info["expires"]) - cookie_expires) <= 1

        status, headers, body = await call(
            "POST", f"{env.sidecar.admin_url}/{DB}/_session", json={"name": "alice", "ttl": 3600}
        )
        assert status == 200 and abs(rfc3339(body["expires"]) - (time.time() + 100)) <= 2


@pytest.mark.parametrize(
    ("session", "problem"),
    [
        ({"ttl": 3600, "max_lifetime": 600}, "session.max_lifetime: must be at least session.ttl"),
        ({"ttl": 30 * 86400}, "session.max_lifetime: must be at least session.ttl (2592000)"),
        ({"max_lifetime": 59}, "session.max_lifetime: must be at least 60"),
        ({"max_lifetime": "week"}, "session.max_lifetime: must be a whole number"),
    ],
)
def test_max_lifetime_config_errors(session: dict[str, Any], problem: str) -> None:
    from sidecar.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {"upstream": "http://127.0.0.1:9", "databases": {DB: {}}, "session": session}
        )
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_max_lifetime_default() -> None:
    settings = parse_settings({"upstream": "http://127.0.0.1:9", "databases": {DB: {}}})
    assert (settings.session.ttl, settings.session.max_lifetime) == (86400, 7 * 86400)


# ------------------------------------------------------------------ the admin API only looks


@pytest.fixture(params=["memory", "redis"])
async def either_store(
    request: pytest.FixtureRequest, key_server: KeyServer, upstream: Upstream
) -> AsyncIterator[Env]:
    """The sidecar with its in-process store, or with a redis-server of its own."""
    async with contextlib.AsyncExitStack() as stack:
        settings: dict[str, Any] = {}
        if request.param == "redis":
            server = await stack.enter_async_context(RedisServer())
            settings["session_store"] = server.url
        yield await stack.enter_async_context(start(key_server, upstream, **settings))


async def test_looking_at_a_session_does_not_extend_it(either_store: Env) -> None:
    env = either_store
    session_id, expires = await backdated_session(env, age=500)  # ttl 1000: due
    admin_url = f"{env.sidecar.admin_url}/{DB}/_session/{session_id}"
    for _ in range(3):
        status, headers, info = await call("GET", admin_url)
        assert status == 200 and headers["Cache-Control"] == "no-store"
        assert abs(rfc3339(info["expires"]) - expires) < 0.001
    # It was due: a real use extends it (and the admin API then shows the new expiry).
    status, headers, _ = await call(
        "GET", f"{env.url}/{DB}/doc", headers={"Cookie": f"{COOKIE}={session_id}"}
    )
    assert status == 200 and cookie(headers, COOKIE) is not None
    _, _, info = await call("GET", admin_url)
    assert rfc3339(info["expires"]) > expires + 400


# ------------------------------------------------------------------ Secure


@pytest.mark.parametrize(
    ("settings", "headers", "secure"),
    [
        ({}, {}, False),
        # Security: an untrusted peer's word is ignored.
        ({}, {"X-Forwarded-Proto": "https"}, False),
        ({}, {"Forwarded": "proto=https"}, False),
        # The Kubernetes ingress: TLS ends there, it says so.
        ({"trusted_proxies": ["127.0.0.1/32"]}, {"X-Forwarded-Proto": "https"}, True),
        ({"trusted_proxies": ["127.0.0.0/8"]}, {"Forwarded": 'for=192.0.2.1;proto="https"'}, True),
        ({"trusted_proxies": ["127.0.0.1/32"]}, {"X-Forwarded-Proto": "http"}, False),
        ({"trusted_proxies": ["127.0.0.1/32"]}, {}, False),
        # A client's own element first, the trusted proxy's (plain http) last.
        (
            {"trusted_proxies": ["127.0.0.1/32"]},
            {"Forwarded": "proto=https, for=192.0.2.1;proto=http"},
            False,
        ),
        ({"trusted_proxies": ["10.0.0.0/8"]}, {"X-Forwarded-Proto": "https"}, False),
        (
            {"trusted_proxies": ["127.0.0.1/32"], "session": {"cookie_secure": "never"}},
            {"X-Forwarded-Proto": "https"},
            False,
        ),
        ({"session": {"cookie_secure": "always"}}, {}, True),
    ],
)
async def test_secure_cookies(
    key_server: KeyServer,
    upstream: Upstream,
    settings: dict[str, Any],
    headers: dict[str, str],
    secure: bool,
) -> None:
    """The session cookie (login, extension, logout) and the login-state cookie alike."""
    async with start(key_server, upstream, **settings) as env:
        _, answer, _ = await call(
            "POST", f"{env.url}/{DB}/_session", env.bearer() | headers, json={}
        )
        created = cookie(answer, COOKIE)
        assert created is not None and created["secure"] is secure
        _, answer, _ = await call("GET", f"{env.url}/{DB}/_oidc", headers)
        state = cookie(answer, STATE)
        assert state is not None and state["secure"] is secure and state["httponly"] is True
        session_id, _ = await backdated_session(env, age=500)
        cookies = {"Cookie": f"{COOKIE}={session_id}"}
        _, answer, _ = await call("GET", f"{env.url}/{DB}/doc", cookies | headers)
        extended = cookie(answer, COOKIE)
        assert extended is not None and extended["secure"] is secure
        _, answer, _ = await call("DELETE", f"{env.url}/{DB}/_session", cookies | headers)
        expired = cookie(answer, COOKIE)
        assert expired is not None and expired["value"] == "" and expired["secure"] is secure


def _self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


async def test_secure_over_direct_tls(key_server: KeyServer, upstream: Upstream) -> None:
    """TLS ending at the sidecar itself (no proxy): Secure with the default `auto`."""
    port, admin_port = free_port(), free_port()
    app = create_app(parse_settings(config(port, admin_port, upstream.url, key_server)))
    admin = create_admin_app(app)
    runner, admin_runner = (
        make_runner(app, shutdown_timeout=1),
        make_runner(admin, shutdown_timeout=1),
    )
    with tempfile.TemporaryDirectory() as directory:
        context = _self_signed(Path(directory))
    await runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        await web.TCPSite(admin_runner, "127.0.0.1", admin_port).start()
        session_id = await admin_session(f"http://127.0.0.1:{admin_port}", DB, "alice")
        async with aiohttp.ClientSession() as http:
            url = f"https://127.0.0.1:{port}/{DB}"
            bearer = {"Authorization": f"Bearer {key_server.token(AUDIENCE, sub='alice')}"}
            async with http.post(f"{url}/_session", headers=bearer, json={}, ssl=False) as r:
                assert r.status == 200
                created = cookie(CIMultiDict(r.headers), COOKIE)
            async with http.get(f"{url}/_oidc", allow_redirects=False, ssl=False) as r:
                state = cookie(CIMultiDict(r.headers), STATE)
            cookies = {"Cookie": f"{COOKIE}={session_id}"}
            async with http.delete(f"{url}/_session", headers=cookies, ssl=False) as r:
                expired = cookie(CIMultiDict(r.headers), COOKIE)
        assert created is not None and created["secure"] is True
        assert state is not None and state["secure"] is True
        assert expired is not None and expired["secure"] is True
    finally:
        await admin_runner.cleanup()
        await runner.cleanup()


# ------------------------------------------------------------------ caching


async def test_session_answers_are_never_stored(env: Env) -> None:
    session_id = await env.session()
    cookies = {"Cookie": f"{COOKIE}={session_id}"}
    answers = [
        await call("GET", f"{env.url}/{DB}/_session"),  # guest
        await call("GET", f"{env.url}/{DB}/_session", cookies),
        await call("POST", f"{env.url}/{DB}/_session", env.bearer(), json={}),
        await call("DELETE", f"{env.url}/{DB}/_session", cookies),
        await call("DELETE", f"{env.url}/{DB}/_session"),  # 404: no session
        await call("GET", f"{env.url}/{DB}/_oidc"),  # the login-state cookie
        await call("POST", f"{env.sidecar.admin_url}/{DB}/_session", json={"name": "alice"}),
    ]
    admin_id = answers[-1][2]["session_id"]
    answers.append(await call("GET", f"{env.sidecar.admin_url}/{DB}/_session/{admin_id}"))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 200, 200, 404, 302, 200, 200]
    assert [h.getall("Cache-Control") for _, h, _ in answers] == [["no-store"]] * len(answers)


@pytest.mark.parametrize(
    ("upstream_value", "expected"),
    [
        (None, "private"),
        ("public, max-age=60, s-maxage=300", "private, max-age=60"),
        ("PUBLIC, Max-Age=60", "private, Max-Age=60"),
        ("s-maxage=300, proxy-revalidate, must-revalidate", "private, must-revalidate"),
        ("private", "private"),
        ('private="Set-Cookie", max-age=5', "private, max-age=5"),  # qualified: not enough
        ('no-cache="Set-Cookie, X-A", public', 'private, no-cache="Set-Cookie, X-A"'),
        ("no-store", "no-store"),
        ("public, no-store", "public, no-store"),  # no-store already wins over everything
        ("max-age=0", "private, max-age=0"),
        ('no-cache="Set-Cookie, public', "no-store"),  # unbalanced quote: fail closed
        ('no-cache="a\\"b", public', 'private, no-cache="a\\"b"'),  # escaped quote
        ("public", "private"),
        (" , public ,, ", "private"),
    ],
)
def test_private_cache_control(upstream_value: str | None, expected: str) -> None:
    assert private_cache_control([upstream_value] if upstream_value else []) == expected


def test_private_cache_control_reads_every_header() -> None:
    assert private_cache_control(["max-age=5", "public"]) == "private, max-age=5"


async def test_an_upstream_answer_resending_the_cookie_becomes_private(
    key_server: KeyServer,
) -> None:
    """The upstream says `public, s-maxage`; when the sidecar adds the session cookie (an
    extension), no shared cache may keep that answer. Without a cookie it is left alone."""

    async def public(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "public, max-age=60, s-maxage=300"}
        return web.json_response({"ok": True}, headers=headers)

    async with serving(public) as url:
        up = Upstream(url=url)
        async with start(key_server, up) as env:
            session_id, _ = await backdated_session(env, age=500)
            cookies = {"Cookie": f"{COOKIE}={session_id}"}
            status, extended, _ = await call("GET", f"{env.url}/{DB}/doc", cookies)
            assert status == 200 and cookie(extended, COOKIE) is not None
            assert extended.getall("Cache-Control") == ["private, max-age=60"]
            # Not due (and not renewed in the last 2 s): no cookie, the upstream's own value.
            quiet_id, _ = await backdated_session(env, age=50)
            quiet = {"Cookie": f"{COOKIE}={quiet_id}"}
            status, plain, _ = await call("GET", f"{env.url}/{DB}/doc", quiet)
            assert status == 200 and cookie(plain, COOKIE) is None
            assert plain.getall("Cache-Control") == ["public, max-age=60, s-maxage=300"]


# ------------------------------------------------------------------ Origin policy

OWN = "{own}"  # replaced by the sidecar's origin, http://127.0.0.1:<port>

# (Origin header values, allowed?) for a cookie session, with the sidecar reached directly.
ORIGINS = [
    ([], True),  # no Origin: not a browser (or a same-origin GET): allowed
    ([OWN], True),
    ([OWN.upper()], True),  # scheme and host compare case-insensitively
    (["http://127.0.0.1:{port}"], True),
    (["http://localhost:{port}"], False),  # other host
    (["http://127.0.0.1:{other_port}"], False),  # other port
    (["http://127.0.0.1"], False),  # port 80
    (["https://127.0.0.1:{port}"], False),  # other scheme
    (["ws://127.0.0.1:{port}"], False),
    (["null"], False),  # sandboxed frames, file: pages
    (["NULL"], False),
    ([""], False),
    (["{own}/"], False),  # trailing slash: not a serialized origin
    (["{own}/db"], False),
    (["{own}?x"], False),
    (["{own}#x"], False),
    (["http://user@127.0.0.1:{port}"], False),  # userinfo
    (["http://user:pw@127.0.0.1:{port}"], False),
    (["http://127.0.0.1:{port}@evil.example"], False),
    (["127.0.0.1:{port}"], False),  # no scheme
    (["http://127.0.0.1:{port}, http://evil.example"], False),  # a list
    ([OWN, OWN], False),  # two Origin headers
    (["http://127.0.0.1:{port}.evil.example"], False),
    (["https://app.example.com"], True),  # databases.db.cors.origin
    (["HTTPS://APP.EXAMPLE.COM"], True),
    (["https://app.example.com:443"], True),  # the default port, spelled out
    (["https://app.example.com:8443"], False),
    (["http://app.example.com"], False),
    (["https://app.example.com/"], False),
    (["https://evil.app.example.com"], False),
    (["https://app.example.com.evil.example"], False),
    (["capacitor://localhost"], True),  # an app's origin, listed
    (["capacitor://localhost:1"], False),
    (["https://public.example.com"], False),  # public_url not configured here
]


def origin_headers(values: list[str], env: Env) -> list[tuple[str, str]]:
    port = env.sidecar.port
    fill = {"own": env.origin, "port": port, "other_port": port + 1}
    return [("Origin", v.replace(OWN.upper(), env.origin.upper()).format(**fill)) for v in values]


def case_id(case: tuple[list[str], bool]) -> str:
    return ("+".join(case[0]) or "none") + ("-ok" if case[1] else "-refused")


async def websocket_status(env: Env, headers: list[tuple[str, str]]) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(f"{env.url}/{DB}/_ws", headers=CIMultiDict(headers)) as ws:
                await ws.send_str("hi")
                assert (await ws.receive()).data == "echo:hi"
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


@pytest.mark.parametrize("case", ORIGINS, ids=[case_id(c) for c in ORIGINS])
async def test_cookie_websocket_origin(env: Env, case: tuple[list[str], bool]) -> None:
    values, allowed = case
    session_id = await env.session()
    headers = [("Cookie", f"{COOKIE}={session_id}"), *origin_headers(values, env)]
    assert await websocket_status(env, headers) == (101 if allowed else 403)
    # Security: a refused handshake never reaches the upstream.
    assert len(env.upstream.requests) == (1 if allowed else 0)


@pytest.mark.parametrize("case", ORIGINS, ids=[case_id(c) for c in ORIGINS])
async def test_cookie_session_post_and_delete_origin(
    env: Env, case: tuple[list[str], bool]
) -> None:
    values, allowed = case
    session_id = await env.session()
    headers = CIMultiDict([("Cookie", f"{COOKIE}={session_id}"), *origin_headers(values, env)])
    no_cors = (400, {"error": "Bad Request", "reason": "No CORS"})
    status, _, body = await call("POST", f"{env.url}/{DB}/_session", headers, json={})
    if allowed:
        assert status == 200 and body["userCtx"]["name"] == "alice"
    else:
        assert (status, body) == no_cors
    status, answer, body = await call("DELETE", f"{env.url}/{DB}/_session", headers)
    if allowed:
        assert (status, body) == (200, {"ok": True})
    else:
        assert (status, body) == no_cors and cookie(answer, COOKIE) is None
    # Refused: the session lives on (the logout from another site did nothing).
    status, _, body = await call(
        "GET", f"{env.url}/{DB}/_session", {"Cookie": f"{COOKIE}={session_id}"}
    )
    if allowed:
        assert (status, body["reason"]) == (401, "Session Invalid")
    else:
        assert (status, body["userCtx"]["name"]) == (200, "alice")


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:1/"])
async def test_bearer_requests_ignore_origin(env: Env, origin: str) -> None:
    """A bearer token is not sent by a browser on its own: no cross-site risk, no check, even
    with a session cookie alongside (the bearer token is what authenticates)."""
    session_id = await env.session()
    headers = [*env.bearer().items(), ("Origin", origin)]
    assert await websocket_status(env, headers) == 101
    status, _, body = await call("POST", f"{env.url}/{DB}/_session", CIMultiDict(headers), json={})
    assert status == 200 and body["userCtx"]["name"] == "ks_alice"
    both = CIMultiDict([*headers, ("Cookie", f"{COOKIE}={session_id}")])
    assert await websocket_status(env, list(both.items())) == 101
    status, _, _ = await call("POST", f"{env.url}/{DB}/_session", both, json={})
    assert status == 200


@pytest.mark.parametrize(
    ("settings", "headers", "origin", "allowed"),
    [
        # Behind a TLS-terminating ingress: the origin the browser sees is the ingress's.
        (
            {"trusted_proxies": ["127.0.0.1/32"]},
            {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "sync.example.com"},
            "https://sync.example.com",
            True,
        ),
        (
            {"trusted_proxies": ["127.0.0.1/32"]},
            {"Forwarded": "for=192.0.2.1;proto=https;host=sync.example.com"},
            "https://sync.example.com",
            True,
        ),
        (
            {"trusted_proxies": ["127.0.0.1/32"]},
            {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "sync.example.com"},
            "http://sync.example.com",
            False,
        ),
        (
            {"trusted_proxies": ["127.0.0.1/32"]},
            {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "sync.example.com:8443"},
            "https://sync.example.com:8443",
            True,
        ),
        # Security: an untrusted client cannot make its own site "ours".
        (
            {},
            {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
            "https://evil.example",
            False,
        ),
        ({}, {"Forwarded": "proto=https;host=evil.example"}, "https://evil.example", False),
        # public_url is ours too (its path does not matter).
        ({"public_url": "https://public.example.com/sync"}, {}, "https://public.example.com", True),
        ({"public_url": "https://public.example.com"}, {}, "https://public.example.com:443", True),
        ({"public_url": "https://public.example.com"}, {}, "http://public.example.com", False),
    ],
)
async def test_own_origin_behind_a_proxy(
    key_server: KeyServer,
    upstream: Upstream,
    settings: dict[str, Any],
    headers: dict[str, str],
    origin: str,
    allowed: bool,
) -> None:
    async with start(key_server, upstream, **settings) as env:
        session_id = await env.session()
        sent = [("Cookie", f"{COOKIE}={session_id}"), *headers.items(), ("Origin", origin)]
        assert await websocket_status(env, sent) == (101 if allowed else 403)
        status, _, _ = await call("POST", f"{env.url}/{DB}/_session", CIMultiDict(sent), json={})
        assert status == (200 if allowed else 400)


# parse_origin's own cases: tests/test_browser.py (one parser for every origin).


@pytest.mark.parametrize(
    ("origin", "problem"),
    [
        ("*", "'*' is not allowed"),
        ("null", "'null' is not an origin"),
        ("https://app.example.com/", "is not an origin"),
        ("app.example.com", "is not an origin"),
    ],
)
def test_cors_origin_config_errors(origin: str, problem: str) -> None:
    from sidecar.config import ConfigError

    document = {
        "upstream": "http://127.0.0.1:9",
        "databases": {DB: {"cors": {"origin": ["https://ok.example", origin]}}},
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    (only,) = caught.value.problems
    assert only.startswith(f"databases.{DB}.cors.origin.1: ") and problem in only
