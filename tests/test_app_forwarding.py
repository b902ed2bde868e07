"""Forwarding through the whole app: routing of odd paths, header hygiene, byte-exact targets,
methods, 64 MiB streamed bodies and websocket relay — the real sidecar, upstream and OP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import resource
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from conftest import RawAnswer, admin_session, raw_http
from support.op import OPClient, OpenIDProvider, get_tokens
from support.redis_server import free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar, serving_app
from yarl import URL

from sidecar import keys

CLIENT = OPClient(f"fwd-{secrets.token_hex(4)}", "fwd-secret", ("http://127.0.0.1:9/cb",))
COOKIE = "SyncGatewaySession"
OTHER_COOKIE = "OtherSession"
MiB = 1024 * 1024
PATTERN = bytes(range(256)) * 256  # 64 KiB


# --------------------------------------------------------------------------- a bulk upstream


async def _sink(request: web.Request) -> web.Response:
    """Hashes the body as it streams in: never holds it."""
    digest, length = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return web.json_response(
        {
            "bytes": length,
            "sha256": digest.hexdigest(),
            "content_length": request.headers.get("Content-Length"),
            "transfer_encoding": request.headers.get("Transfer-Encoding"),
        }
    )


async def _source(request: web.Request) -> web.StreamResponse:
    """Streams `size` bytes of PATTERN."""
    size = int(request.query["size"])
    response = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    )
    await response.prepare(request)
    sent = 0
    while sent < size:
        piece = PATTERN[: min(len(PATTERN), size - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


@pytest.fixture
async def bulk() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/bulk/blob", _source)
    app.router.add_route("*", "/bulk/{tail:.*}", _sink)
    async with serving_app(app) as url:
        yield url


def pattern_digest(size: int) -> str:
    digest, left = hashlib.sha256(), size
    while left:
        piece = PATTERN[: min(len(PATTERN), left)]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


async def pattern_body(size: int) -> AsyncIterator[bytes]:
    left = size
    while left:
        piece = PATTERN[: min(len(PATTERN), left)]
        left -= len(piece)
        yield piece


# --------------------------------------------------------------------------- environment


@pytest.fixture(scope="module")
def registered(op: OpenIDProvider) -> OpenIDProvider:
    op.register_client(CLIENT)
    return op


@dataclass
class Env:
    sidecar: Sidecar
    upstream: Upstream
    op: OpenIDProvider
    session: str  # a session cookie value for carol in `db`
    bulk_session: str  # and in `bulk`

    @property
    def url(self) -> str:
        return self.sidecar.url

    @property
    def cookie(self) -> tuple[str, str]:
        return ("Cookie", f"{COOKIE}={self.session}")

    async def raw(
        self, target: str | bytes, headers: Sequence[tuple[str | bytes, str | bytes]], **kw: Any
    ) -> RawAnswer:
        return await raw_http(self.sidecar.port, target, headers=headers, **kw)

    async def token(self, username: str = "alice") -> str:
        return str((await get_tokens(self.op, CLIENT, username))["id_token"])


@contextlib.asynccontextmanager
async def start_env(
    op: OpenIDProvider, upstream: Upstream, bulk: str, **settings: Any
) -> AsyncIterator[Env]:
    provider = {"issuer": op.issuer, "client_id": CLIENT.client_id, "register": True}
    config = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        databases={
            "db": {"oidc": {"providers": {"op": {**provider, "user_prefix": "op"}}}},
            "other": {"session_cookie_name": OTHER_COOKIE},
            "bulk": {"upstream": bulk},
        },
        **settings,
    )
    async with running_sidecar(config) as sidecar:
        session = await admin_session(
            sidecar.admin_url, "db", "carol", email="carol@example.com", admin_roles=["r"]
        )
        bulk_session = await admin_session(sidecar.admin_url, "bulk", "carol")
        yield Env(sidecar, upstream, op, session, bulk_session)


@pytest.fixture
async def env(registered: OpenIDProvider, upstream: Upstream, bulk: str) -> AsyncIterator[Env]:
    async with start_env(registered, upstream, bulk) as value:
        yield value


def values(upstream: Upstream, name: str, index: int = 0) -> list[str]:
    return upstream.header(index, name)


def is_json_error(answer: RawAnswer) -> bool:
    return answer.header("Content-Type") == ["application/json; charset=utf-8"] and set(
        answer.json()
    ) == {"error", "reason"}


# --------------------------------------------------------------------------- routing


# (raw request target, with carol's session cookie?, status, reason; None = aiohttp's parser)
ROUTING: list[tuple[str, bool, int, str | None]] = [
    ("/", True, 404, "404: Not Found"),
    ("//x", True, 404, "404: Not Found"),
    ("/_foo", True, 404, "no such database '_foo'"),
    ("/_foo/bar", False, 404, "no such database '_foo'"),
    ("/db%2Fx", True, 404, "no such database 'db/x'"),  # %2F never splits the database name
    ("/nodb/x", True, 404, "no such database 'nodb'"),
    ("/DB/x", True, 404, "no such database 'DB'"),
    ("/_health/x", True, 404, "no such database '_health'"),
    ("/db", False, 401, "Login required"),
    ("/db/x", False, 401, "Login required"),
    ("/db/%2e%2e/x", False, 401, "Login required"),
    # routing does not normalise: the first segment is the database whose credentials count
    ("/other/../db/x", True, 401, "Login required"),
    # authenticated, yet refused: the upstream could resolve these differently than we routed
    ("/db/../other/x", True, 400, "request path contains dot segments"),
    ("/db/./x", True, 400, "request path contains dot segments"),
    ("/db/%2e%2e/x", True, 400, "request path contains dot segments"),
    ("/db/%2E%2e/x", True, 400, "request path contains dot segments"),
    ("/db/x/.", True, 400, "request path contains dot segments"),
    ("/db/%00", True, 400, "request path contains NUL"),
    ("http://evil.example/db/x", True, 400, "request target must be an absolute path"),
    ("http://127.0.0.1:1/db/x", True, 400, "request target must be an absolute path"),
    (
        "/db/x#fragment",
        True,
        400,
        "request target contains characters that must be percent-encoded",
    ),
    ("*", True, 400, None),
    ("db/x", True, 400, None),
    ("/db/a b", True, 400, None),
    ("/db/é", True, 400, None),
    ("/db/\x7f", True, 400, None),
]


@pytest.mark.parametrize(
    ("target", "authenticated", "status", "reason"),
    [pytest.param(*row, id=f"{row[0]!r}-{'auth' if row[1] else 'anon'}") for row in ROUTING],
)
async def test_routing_of_odd_targets(
    env: Env, target: str, authenticated: bool, status: int, reason: str | None
) -> None:
    answer = await env.raw(target.encode(), [env.cookie] if authenticated else [])
    assert answer.status == status, answer.body
    assert env.upstream.requests == []
    if reason is not None:
        assert is_json_error(answer)
        assert answer.json()["reason"] == reason


# --------------------------------------------------------------------------- byte-exact targets


TARGETS = [
    "/db",
    "/db/",
    "/db?x=1",
    "/db/doc%2Fid",
    "/db/doc%2fid",
    "/db/a%20b",
    "/db/a+b",
    "/db/a%2Bb",
    "/db/x;y=1",
    "/db/x;jsessionid=1?a=b",
    "/db/a%25b",
    "/db/a%3Fb?c=d",
    "/db/%E2%9C%93",
    "/db//double//slashes/",
    "/db/~user/!$&'()*,;=:@",
    "/db/_all_docs?keys=%5B%22a%22%2C%22b%22%5D&include_docs=true",
    "/db/doc?rev=1-abc&x=%2F&y=/&z=;&w=+&v=%20&u=a+b%2Bc",
    "/db/q?a=1&a=2&b&=c&d=",
    "/db/q?a=%ZZ&b=%",
    "/db/_changes?feed=longpoll&since=now&filter=sync_gateway/bychannel&channels=a,b",
    "/%64b/x",  # %64 is "d": routed to db, forwarded unchanged
]


@pytest.mark.parametrize("target", TARGETS)
async def test_path_and_query_reach_upstream_byte_for_byte(env: Env, target: str) -> None:
    answer = await env.raw(target, [env.cookie])
    assert answer.status == 200, answer.body
    assert [r["path_qs"] for r in env.upstream.requests] == [target]


async def test_a_bare_question_mark_is_dropped(env: Env) -> None:
    # The one documented normalisation (yarl drops an empty query).
    answer = await env.raw("/db/x?", [env.cookie])
    assert answer.status == 200
    assert env.upstream.requests[0]["path_qs"] == "/db/x"


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("GET", b""),
        ("HEAD", b""),
        ("OPTIONS", b""),
        ("DELETE", b""),
        ("POST", b'{"a": 1}'),
        ("PUT", b"x" * 100_000),
        ("PATCH", b"patch"),
        ("PROPFIND", b""),
    ],
)
async def test_methods_and_bodies(env: Env, method: str, body: bytes) -> None:
    answer = await env.raw("/db/doc", [env.cookie], method=method, body=body)
    assert answer.status == 200
    assert [r["method"] for r in env.upstream.requests] == [method]
    if method == "HEAD":
        assert answer.body == b""
    else:
        assert answer.json()["bytes"] == len(body)


# --------------------------------------------------------------------------- header hygiene


SPOOFS: list[tuple[str, str]] = [
    ("X-Forwarded-User", "admin"),
    ("x_forwarded_user", "admin"),
    ("X-FORWARDED-USER", "admin"),
    ("X_Forwarded_User", "admin"),
    ("x-forwarded-email", "admin@example.com"),
    ("X_FORWARDED_EMAIL", "admin@example.com"),
    ("X-Forwarded-Roles", "admin"),
    ("x_forwarded_roles", "_admin"),
    ("X-Forwarded-Channels", "*"),
    ("x-FORWARDED_channels", "!"),
    ("X-Auth-CouchDB-UserName", "admin"),
    ("X-Auth-CouchDB-Roles", "_admin"),
    ("x_auth_couchdb_token", "abc"),
]
IDENTITY = {
    "x-forwarded-user": "carol",
    "x-forwarded-email": "carol@example.com",
    "x-forwarded-roles": "r",
}


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.mark.parametrize("via", ["cookie", "bearer"])
async def test_spoofed_identity_headers_never_reach_upstream(env: Env, via: str) -> None:
    if via == "cookie":
        credential = env.cookie
        expected = IDENTITY
    else:
        credential = ("Authorization", f"Bearer {await env.token('alice')}")
        expected = {"x-forwarded-user": "op_alice", "x-forwarded-email": "alice@example.com"}
    answer = await env.raw("/db/doc", [*SPOOFS, credential])
    assert answer.status == 200
    seen: dict[str, list[str]] = {}
    for name, value in env.upstream.requests[0]["headers"]:
        seen.setdefault(norm(name), []).append(value)
    for name in ("x-forwarded-user", "x-forwarded-email", "x-forwarded-roles"):
        assert seen.get(name, []) == ([expected[name]] if name in expected else [])
    assert "x-forwarded-channels" not in seen
    assert not [name for name in seen if name.startswith("x-auth-couchdb-")]


async def test_forwarding_claims_from_an_untrusted_client_are_replaced(env: Env) -> None:
    spoofs = [
        ("X-Forwarded-For", "203.0.113.7"),
        ("X_Forwarded_For", "203.0.113.8"),
        ("X-Real-IP", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.10;proto=https"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
    ]
    answer = await env.raw("/db/doc", [*spoofs, env.cookie])
    assert answer.status == 200
    seen: dict[str, list[str]] = {}
    for name, value in env.upstream.requests[0]["headers"]:
        seen.setdefault(norm(name), []).append(value)
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{env.sidecar.port}"]
    assert "x-real-ip" not in seen
    assert "forwarded" not in seen


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ([("X-Request-ID", "abc-123.x:y_z")], True),
        ([("X-Request-ID", "a" * 129)], False),  # too long: a fresh one instead
        ([("X-Request-ID", "a b")], False),
        ([("X-Request-ID", "<script>")], False),
        ([("X_Request_ID", "abc-123")], False),  # a look-alike never passes
    ],
)
async def test_request_id(env: Env, sent: list[tuple[str, str]], kept: bool) -> None:
    answer = await env.raw("/db/doc", [*sent, env.cookie])
    assert answer.status == 200
    seen = [v for k, v in env.upstream.requests[0]["headers"] if norm(k) == "x-request-id"]
    assert len(seen) == 1
    if kept:
        assert seen == [sent[0][1]]
    else:
        assert len(seen[0]) == 16 and set(seen[0]) <= set("0123456789abcdef")


async def test_connection_header_cannot_remove_the_identity(env: Env) -> None:
    headers = [env.cookie, ("Connection", "keep-alive, X-Forwarded-User, X-Forwarded-Roles")]
    answer = await env.raw("/db/doc", headers)
    assert answer.status == 200
    assert values(env.upstream, "X-Forwarded-User") == ["carol"]
    assert values(env.upstream, "X-Forwarded-Roles") == ["r"]


async def test_credentials_are_stripped_other_cookies_pass(env: Env) -> None:
    token = await env.token("alice")
    cookies = f'a=1; {COOKIE}={env.session}; b="two"; {OTHER_COOKIE}=keep'
    answer = await env.raw("/db/doc", [("Authorization", f"Bearer {token}"), ("Cookie", cookies)])
    assert answer.status == 200
    assert values(env.upstream, "Authorization") == []
    assert values(env.upstream, "Cookie") == [f'a=1; b="two"; {OTHER_COOKIE}=keep']
    # Bearer wins over the cookie: the identity is the token's
    assert values(env.upstream, "X-Forwarded-User") == ["op_alice"]


async def test_cookie_header_without_the_session_cookie_is_forwarded_verbatim(env: Env) -> None:
    token = await env.token("alice")
    cookies = 'a=1;b=2 ;  c="x;y"'
    answer = await env.raw("/db/doc", [("Authorization", f"Bearer {token}"), ("Cookie", cookies)])
    assert answer.status == 200
    assert values(env.upstream, "Cookie") == [cookies]


async def test_only_the_databases_own_cookie_is_stripped(env: Env) -> None:
    session = await admin_session(env.sidecar.admin_url, "other", "olga")
    cookies = f"{COOKIE}=not-ours; {OTHER_COOKIE}={session}"
    answer = await env.raw("/other/doc", [("Cookie", cookies)])
    assert answer.status == 200
    assert values(env.upstream, "X-Forwarded-User") == ["olga"]
    assert values(env.upstream, "Cookie") == [f"{COOKIE}=not-ours"]


async def test_pass_authorization_forwards_the_credentials(
    registered: OpenIDProvider, upstream: Upstream, bulk: str
) -> None:
    async with start_env(registered, upstream, bulk, pass_authorization=True) as env:
        token = await env.token("alice")
        cookies = f"a=1; {COOKIE}={env.session}"
        auth = f"Bearer {token}"
        answer = await env.raw("/db/doc", [("Authorization", auth), ("Cookie", cookies)])
        assert answer.status == 200
        assert values(upstream, "Authorization") == [auth]
        assert values(upstream, "Cookie") == [cookies]
        # identity headers are still the sidecar's own
        assert values(upstream, "X-Forwarded-User") == ["op_alice"]


# --------------------------------------------------------------------------- big bodies


SIZE = 64 * MiB


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_large_upload_streams_through(env: Env, framing: str) -> None:
    headers = {"Cookie": f"{COOKIE}={env.bulk_session}"}
    if framing == "content-length":
        headers["Content-Length"] = str(SIZE)
    before = peak_rss()
    async with aiohttp.ClientSession() as http:
        async with http.put(
            env.url + "/bulk/upload", data=pattern_body(SIZE), headers=headers
        ) as response:
            assert response.status == 200
            seen = await response.json()
    assert seen["bytes"] == SIZE
    assert seen["sha256"] == pattern_digest(SIZE)
    if framing == "content-length":
        assert (seen["content_length"], seen["transfer_encoding"]) == (str(SIZE), None)
    else:
        assert seen["transfer_encoding"] == "chunked"
    # Client, sidecar and upstream share this process: a buffered copy would raise the peak.
    assert peak_rss() - before < SIZE // 2


async def test_large_download_streams_through(env: Env) -> None:
    headers = {"Cookie": f"{COOKIE}={env.bulk_session}"}
    before = peak_rss()
    digest, length = hashlib.sha256(), 0
    async with aiohttp.ClientSession() as http:
        async with http.get(env.url + f"/bulk/blob?size={SIZE}", headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(SIZE)
            async for chunk in response.content.iter_any():
                digest.update(chunk)
                length += len(chunk)
    assert (length, digest.hexdigest()) == (SIZE, pattern_digest(SIZE))
    assert peak_rss() - before < SIZE // 2


# --------------------------------------------------------------------------- websockets


def open_websockets(sidecar: Sidecar) -> float | None:
    return sidecar.app[keys.METRICS].registry.get_sample_value("sidecar_open_websockets")


async def no_open_websockets(sidecar: Sidecar) -> None:
    """Closed relays leave nothing behind: not tracked, not counted."""
    async with asyncio.timeout(3):
        while len(sidecar.app[keys.EXCHANGES]) or open_websockets(sidecar):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("via", ["cookie", "bearer"])
async def test_websocket_relay(env: Env, via: str) -> None:
    if via == "cookie":
        headers = {"Cookie": f"a=1; {COOKIE}={env.session}"}
        user = "carol"
    else:
        headers = {"Authorization": f"Bearer {await env.token('alice')}"}
        user = "op_alice"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(
            URL(env.url + "/db/_sync?x=%2F", encoded=True), headers=headers
        ) as ws:
            await ws.send_str("hello")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:hello")
            blob = bytes(range(256)) * 100
            await ws.send_bytes(blob)
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (WSMsgType.BINARY, blob)
            assert len(env.sidecar.app[keys.EXCHANGES]) == 1
            assert open_websockets(env.sidecar) == 1
    await no_open_websockets(env.sidecar)
    (request,) = env.upstream.requests
    assert request["path_qs"] == "/db/_sync?x=%2F"
    assert values(env.upstream, "X-Forwarded-User") == [user]
    assert values(env.upstream, "Authorization") == []
    assert values(env.upstream, "Cookie") == (["a=1"] if via == "cookie" else [])


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/db/_sync", {}, 401),
        ("/db/_sync", {"Cookie": f"{COOKIE}=garbage"}, 401),
        ("/db/_sync", {"Cookie": f"{COOKIE}={'A' * 43}"}, 401),
        ("/db/_sync", {"Authorization": "Bearer x.y.z"}, 401),
        ("/db/_sync", {"Authorization": "Basic eDp5"}, 401),
        ("/db/_sync", {"X-Forwarded-User": "carol"}, 401),
        ("/nodb/_sync", {}, 404),
    ],
)
async def test_unauthenticated_websocket_upgrade_never_reaches_upstream(
    env: Env, path: str, headers: dict[str, str], status: int
) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(env.url + path, headers=headers)
    assert refused.value.status == status
    assert env.upstream.requests == []
