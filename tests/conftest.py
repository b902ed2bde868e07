"""Shared fixtures: a real redis-server and a real OpenID Provider (npm oidc-provider), once per run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from support.op import OPClient, OpenIDProvider, browser_login
from support.redis_server import RedisServer, free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar, running_upstream
from yarl import URL


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def op() -> Iterator[OpenIDProvider]:
    """The real OP; tests register their clients at run time (their callback ports vary)."""
    with OpenIDProvider() as provider:
        yield provider


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as up:
        yield up


# --- the login-flow harness: a real sidecar in front of a real upstream, the real OP, redis ------

DB = "db"
_client_ids = itertools.count(1)


@dataclass
class Answer:
    """A response, read: status, headers, body (parsed when it is JSON, else None)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    url: URL
    text: str

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.getall("Set-Cookie", [])

    def cookie(self, name: str) -> str | None:
        """The raw Set-Cookie line for `name`, if the response set it."""
        return next((c for c in self.set_cookies if c.startswith(f"{name}=")), None)


async def read_answer(response: aiohttp.ClientResponse) -> Answer:
    raw = await response.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    text = raw.decode("utf-8", "replace")
    return Answer(response.status, response.headers, body, response.url, text)


def browser() -> aiohttp.ClientSession:
    """A scripted browser: keeps cookies for 127.0.0.1 (IP hosts need an unsafe jar).

    Cookies ignore ports, so one browser shares its cookies with every local server."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


@dataclass
class LoginHarness:
    """One sidecar (ports chosen up front, so OP clients can be registered before it starts),
    its upstream, the session-wide OP and a redis-server of the test's own."""

    op: OpenIDProvider
    redis: RedisServer
    upstream: Upstream
    stack: contextlib.AsyncExitStack
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    sidecar: Sidecar | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def test_issuer(self) -> str:
        return f"{self.url}/{DB}/_oidc_testing"

    def callback(self, provider: str | None = None, *, port: int | None = None) -> str:
        base = f"http://127.0.0.1:{port or self.port}/{DB}/_oidc_callback"
        return f"{base}?provider={provider}" if provider else base

    def client(
        self,
        *,
        providers: tuple[str | None, ...] = (None,),
        secret: str | None = None,
        auth_method: str = "client_secret_basic",
        ports: tuple[int, ...] = (),
    ) -> OPClient:
        """Registers a new client at the OP. Its redirect_uris are the callbacks of this
        sidecar (and of `ports`) for each of `providers` (None: the default provider)."""
        uris = tuple(self.callback(p, port=port) for port in (self.port, *ports) for p in providers)
        client = OPClient(
            f"sidecar-{next(_client_ids)}-{secrets.token_hex(3)}",
            secret or secrets.token_urlsafe(24),
            uris,
            token_endpoint_auth_method=auth_method,
        )
        self.op.register_client(client)
        return client

    def provider(self, client: OPClient, **extra: Any) -> dict[str, Any]:
        """A provider block for `client` at the OP (register: true unless overridden)."""
        return {
            "issuer": self.op.issuer,
            "client_id": client.client_id,
            "validation_key": client.client_secret,
            "register": True,
            **extra,
        }

    def config(
        self,
        providers: dict[str, dict[str, Any]],
        *,
        default: str | None = None,
        more_databases: dict[str, Any] | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """The sidecar's config: database `db` with these providers, plus `more_databases`."""
        oidc: dict[str, Any] = {"providers": providers}
        if default:
            oidc["default_provider"] = default
        settings.setdefault("upstream", self.upstream.url)
        settings.setdefault("session_store", self.redis.url)
        databases = {DB: {"oidc": oidc}, **(more_databases or {})}
        return base_config(self.port, self.admin_port, databases=databases, **settings)

    async def start(
        self,
        providers: dict[str, dict[str, Any]],
        *,
        default: str | None = None,
        more_databases: dict[str, Any] | None = None,
        wait_ready: bool = True,
        **settings: Any,
    ) -> Sidecar:
        """Runs the sidecar with these providers until the test ends."""
        config = self.config(providers, default=default, more_databases=more_databases, **settings)
        self.sidecar = await self.stack.enter_async_context(running_sidecar(config))
        if wait_ready:
            await self.wait_ready()
        return self.sidecar

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the admin `/_ready` says every provider's first discovery has succeeded.

        Needed for the built-in test provider: the sidecar discovers it over HTTP from itself,
        and that first attempt can run before the listener is open (then it retries later)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"{self.admin_url}/_ready") as response:
                    body = await response.json()
                    if response.status == 200 and set(body["providers"].values()) <= {"ok"}:
                        return
                    if loop.time() > deadline:
                        raise AssertionError(f"sidecar not ready: {await response.text()}")
                await asyncio.sleep(0.05)

    async def start_op(self, **provider: Any) -> OPClient:
        """The common case: one provider `op` (a fresh client at the OP), register: true."""
        client = self.client()
        await self.start({"op": self.provider(client, **provider)})
        return client

    async def stored(self, kind: str) -> int:
        """How many `sessions`, `users` or pending `logins` the store holds (read from redis)."""
        pattern = {
            "sessions": "sidecar:s:*",
            "users": "sidecar:user:*",
            "logins": "sidecar:r:login:*",
        }[kind]
        keys = await asyncio.to_thread(self.redis.command, "KEYS", pattern)
        return len(keys)

    async def start_login(self, http: aiohttp.ClientSession, **query: str) -> URL:
        """`GET /{db}/_oidc` (must be a 302); the authorization URL it redirects to."""
        url = URL(f"{self.url}/{DB}/_oidc").with_query(query)
        async with http.get(url, allow_redirects=False) as response:
            assert response.status == 302, await response.text()
            return URL(response.headers["Location"])

    async def authorize(
        self, http: aiohttp.ClientSession, username: str, *, consent: bool = True, **query: str
    ) -> URL:
        """Up to the OP's redirect back: the callback URL (code, state), not yet requested."""
        start = await self.start_login(http, **query)
        return await browser_login(http, start, username=username, consent=consent)

    async def login(
        self, http: aiohttp.ClientSession, username: str, *, consent: bool = True, **query: str
    ) -> Answer:
        """The whole browser flow: `/{db}/_oidc` → the OP's login and consent → the callback."""
        callback = await self.authorize(http, username, consent=consent, **query)
        return await self.get(http, callback)

    async def get(self, http: aiohttp.ClientSession, url: str | URL, **kwargs: Any) -> Answer:
        async with http.get(url, allow_redirects=False, **kwargs) as response:
            return await read_answer(response)

    async def request(
        self, http: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
    ) -> Answer:
        async with http.request(method, url, allow_redirects=False, **kwargs) as response:
            return await read_answer(response)


def builtin_provider(h: LoginHarness, **extra: Any) -> dict[str, Any]:
    """A provider block for the sidecar's built-in test provider (`make run`'s)."""
    return {
        "issuer": h.test_issuer,
        "client_id": "sync_gateway",
        "validation_key": "any secret works",
        "register": True,
        "user_prefix": "test",
        **extra,
    }


async def forget_refresh_outcome(harness: LoginHarness, refresh_token: str) -> None:
    """Ends now the seconds-long window in which a refresh token already used answers with the
    same shared outcome (single_flight.OUTCOME_SECONDS), as its TTL would by itself."""
    from sidecar.oidc.single_flight import digest

    key = f"sidecar:r:refresh-outcome:{digest(refresh_token)}"
    await asyncio.to_thread(harness.redis.command, "DEL", key)


@pytest.fixture
async def fresh_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own: users and sessions never leak between tests."""
    async with RedisServer() as server:
        yield server


@pytest.fixture
async def harness(
    op: OpenIDProvider, fresh_redis: RedisServer, upstream: Upstream
) -> AsyncIterator[LoginHarness]:
    """A LoginHarness; `await harness.start(...)` runs its sidecar until the test ends."""
    async with contextlib.AsyncExitStack() as stack:
        yield LoginHarness(op, fresh_redis, upstream, stack)


# --- functional-suite helpers: a key server for forged tokens, raw HTTP, admin sessions ---------
# (imports here, not at the top: this section was appended to a shared file)

import functools  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from aiohttp import web  # noqa: E402
from support import jwt_factory  # noqa: E402
from support.jwt_factory import SigningKey, make_key  # noqa: E402


@functools.cache
def default_signing_keys() -> tuple[SigningKey, SigningKey]:
    """One RSA and one EC key, generated once per run (RSA generation is slow)."""
    return make_key("RS256", "ks-rsa-1"), make_key("ES256", "ks-ec-1")


@dataclass
class KeyServer:
    """A minimal OpenID Provider on 127.0.0.1 that publishes discovery and a JWKS for keys the
    test holds: tokens signed with them (valid or hostile) are verified by the sidecar for real."""

    port: int = field(default_factory=free_port)
    keys: list[SigningKey] = field(default_factory=lambda: list(default_signing_keys()))
    hits: list[str] = field(default_factory=list)  # paths requested, in order
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def key(self) -> SigningKey:
        return self.keys[0]

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/auth",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.json_response(jwt_factory.jwks(*self.keys))

    async def start(self) -> KeyServer:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> KeyServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def claims(self, audience: str, **overrides: Any) -> dict[str, Any]:
        """A valid ID token claim set for `audience`, now; an override of None removes a claim."""
        return jwt_factory.claims(
            now=time.time(), **{"iss": self.issuer, "aud": audience, **overrides}
        )

    def token(
        self,
        audience: str,
        *,
        key: SigningKey | None = None,
        header: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        """A token signed by `key` (default: the first published key) over these claims."""
        return jwt_factory.mint(key or self.key, self.claims(audience, **overrides), header=header)


@pytest.fixture
async def key_server() -> AsyncIterator[KeyServer]:
    async with KeyServer() as server:
        yield server


@dataclass
class RawAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


async def raw_http(
    port: int,
    target: str | bytes,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
    timeout: float = 10.0,
) -> RawAnswer:
    """One HTTP/1.1 request written byte for byte (no client library re-quoting the target or
    merging headers), `Connection: close`, read to EOF."""

    def raw(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("latin-1")

    lines = [raw(method) + b" " + raw(target) + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % port]
    lines += [raw(k) + b": " + raw(v) for k, v in headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return await raw_exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + body, timeout=timeout)


async def raw_exchange(port: int, message: bytes, *, timeout: float = 10.0) -> RawAnswer:
    """`message` written as is (request line, headers, body: the caller frames it all), then the
    answer read to EOF, so the message should ask for `Connection: close`."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(message)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    pairs = [tuple(line.split(":", 1)) for line in header_lines if ":" in line]
    parsed = [(k.strip(), v.strip()) for k, v in pairs]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in parsed):
        rest = _dechunk(rest)
    return RawAnswer(int(status_line.split()[1]), parsed, rest)


async def admin_session(
    admin_url: str, db: str, name: str, *, ttl: int | None = None, **user: Any
) -> str:
    """Creates (or updates) user `name` through the admin API and a session for them;
    returns the session id (the cookie value)."""
    from urllib.parse import quote

    async with aiohttp.ClientSession() as http:
        user_url = URL(f"{admin_url}/{db}/_user/{quote(name, safe='')}", encoded=True)
        async with http.put(user_url, json={"name": name, **user}) as response:
            assert response.status in (200, 201), await response.text()
        body: dict[str, Any] = {"name": name} | ({"ttl": ttl} if ttl is not None else {})
        async with http.post(f"{admin_url}/{db}/_session", json=body) as response:
            assert response.status == 200, await response.text()
            session_id: str = (await response.json())["session_id"]
    return session_id
