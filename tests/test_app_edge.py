"""What reaches the upstream is exactly what the sidecar vouches for: foreign identity and
URL-override headers removed, framing look-alikes dropped, transfer codings, Host values and
request targets checked, the user name sent exactly. Raw bytes over a socket, the real sidecar
and a real upstream that records every request it gets."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import RawAnswer, admin_session, raw_exchange
from support.op import OPClient, OpenIDProvider, get_tokens
from support.redis_server import free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar
from test_headers import FOREIGN, URL_OVERRIDES, spellings
from test_targets import LEGITIMATE

COOKIE = "SyncGatewaySession"
SECRET = "couch-s3cret"
CLIENT = OPClient(f"edge-{secrets.token_hex(4)}", "edge-secret", ("http://127.0.0.1:9/cb",))


@dataclass
class Edge:
    sidecar: Sidecar
    upstream: Upstream
    session: str  # carol's session cookie value

    async def send(
        self,
        target: bytes = b"/db/doc",
        headers: Sequence[bytes] = (),
        *,
        method: bytes = b"GET",
        version: bytes = b"HTTP/1.1",
        host: bytes | None = b"sync.example.com",
        body: bytes = b"",
        session: str | None = None,
    ) -> RawAnswer:
        """One request written byte for byte: no client library re-spelling a header name,
        merging duplicates, fixing the Host or framing the body."""
        lines = [method + b" " + target + b" " + version]
        if host is not None:
            lines.append(b"Host: " + host)
        lines.append(b"Cookie: %s=%s" % (COOKIE.encode(), (session or self.session).encode()))
        lines += [*headers, b"Connection: close"]
        return await raw_exchange(self.sidecar.port, b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def seen(self, index: int = 0) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.upstream.requests[index]["headers"]]

    def seen_names(self, index: int = 0) -> list[str]:
        return [k for k, _ in self.seen(index)]


@contextlib.asynccontextmanager
async def start(upstream: Upstream, **settings: Any) -> AsyncIterator[Edge]:
    config = base_config(
        free_port(), free_port(), upstream=upstream.url, databases={"db": {}}, **settings
    )
    async with running_sidecar(config) as sidecar:
        session = await admin_session(sidecar.admin_url, "db", "carol", email="carol@example.com")
        yield Edge(sidecar, upstream, session)


@pytest.fixture
async def edge(upstream: Upstream) -> AsyncIterator[Edge]:
    async with start(upstream) as value:
        yield value


def is_json_error(answer: RawAnswer, reason: str) -> bool:
    return answer.header("Content-Type") == ["application/json; charset=utf-8"] and (
        answer.json() == {"error": answer.json()["error"], "reason": reason}
    )


# Exactly what the upstream gets for a GET carrying nothing of the client's but the session
# cookie (which is removed): aiohttp's Host, then the sidecar's own headers.
OURS = [
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Request-ID",
]
CLEAN = ["Host", *OURS]


async def test_a_plain_request_gets_exactly_the_sidecars_headers(edge: Edge) -> None:
    answer = await edge.send(headers=[b"Accept: application/json"])
    assert answer.status == 200
    assert edge.seen_names() == ["Host", "Accept", *OURS]
    seen = dict(edge.seen())
    assert seen["X-Forwarded-User"] == "carol"
    assert seen["X-Forwarded-Host"] == "sync.example.com"
    assert seen["Host"] == edge.upstream.url.removeprefix("http://")


# --------------------------------------------------------------------------- foreign headers


@pytest.mark.parametrize("name", FOREIGN)
async def test_foreign_identity_headers_never_reach_the_upstream(edge: Edge, name: str) -> None:
    # every spelling, each sent twice
    lines = [b"%s: evil" % s.encode() for s in spellings(name) for _ in range(2)]
    answer = await edge.send(headers=lines)
    assert answer.status == 200
    assert edge.seen_names() == CLEAN


@pytest.mark.parametrize("trusted", [False, True])
async def test_url_override_headers_never_reach_the_upstream(
    upstream: Upstream, trusted: bool
) -> None:
    lines = [b"%s: /_users/x" % s.encode() for n in URL_OVERRIDES for s in spellings(n)]
    proxies = ["127.0.0.1/32"] if trusted else []
    async with start(upstream, trusted_proxies=proxies) as edge:
        answer = await edge.send(headers=lines)
        assert answer.status == 200
        assert edge.seen_names() == CLEAN


async def test_configured_headers_never_reach_the_upstream(upstream: Upstream) -> None:
    async with start(upstream, strip_request_headers=["X-Tenant", "X-Internal-*"]) as edge:
        lines = [b"X-Tenant: evil", b"x_tenant: evil", b"X-Internal-Role: evil", b"X-Tenants: ok"]
        answer = await edge.send(headers=lines)
        assert answer.status == 200
        assert edge.seen_names() == ["Host", "X-Tenants", *OURS]


async def test_websocket_upgrade_is_cleaned_too(edge: Edge) -> None:
    spoofs = [(s, "evil") for n in ("Remote-User", "X-WEBAUTH-USER") for s in spellings(n)]
    spoofs += [("X-Original-URL", "/_users"), ("X-Auth-Request-Email", "evil")]
    spoofs += [("Content_Length", "0"), ("Cookie", f"{COOKIE}={edge.session}")]
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{edge.sidecar.url}/db/ws", headers=spoofs) as ws,
    ):
        await ws.send_str("hi")
        assert (await ws.receive_str()) == "echo:hi"
    names = {k.lower() for k in edge.seen_names()}
    assert "evil" not in {v for _, v in edge.seen()}
    assert names.isdisjoint({"x-original-url", "content_length", "remote-user"})
    assert dict(edge.seen())["X-Forwarded-User"] == "carol"


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    ("lines", "body"),
    [
        ([b"Content-Length: 5", b"Content_Length: 0"], b"hello"),
        ([b"Content-Length: 5", b"content.length: 1", b"Content~Length: 2"], b"hello"),
        ([b"Content-Length: 5", b"Transfer_Encoding: chunked"], b"hello"),
        ([b"Transfer-Encoding: chunked", b"Content_Length: 3"], b"5\r\nhello\r\n0\r\n\r\n"),
        ([b"Transfer-Encoding: chunked", b"transfer.encoding: gzip"], b"5\r\nhello\r\n0\r\n\r\n"),
    ],
)
async def test_framing_look_alikes_are_dropped(edge: Edge, lines: list[bytes], body: bytes) -> None:
    answer = await edge.send(method=b"POST", headers=lines, body=body)
    assert answer.status == 200, answer.body
    assert answer.json()["bytes"] == 5
    framing = [k for k in edge.seen_names() if k.lower()[:4] in ("cont", "tran")]
    assert framing in (["Content-Length"], ["Transfer-Encoding"])


CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"
# (Transfer-Encoding lines, HTTP version, status, our JSON reason; None: aiohttp's parser said no)
CODINGS: list[tuple[list[bytes], bytes, int, str | None]] = [
    ([b"Transfer-Encoding: chunked"], b"HTTP/1.1", 200, None),
    ([b"Transfer-Encoding: Chunked"], b"HTTP/1.1", 200, None),
    ([b"Transfer-Encoding: ,chunked"], b"HTTP/1.1", 200, None),
    ([b"Transfer-Encoding: gzip, chunked"], b"HTTP/1.1", 501, "unsupported transfer coding"),
    ([b"Transfer-Encoding: deflate,chunked"], b"HTTP/1.1", 501, "unsupported transfer coding"),
    ([b"Transfer-Encoding: x-custom, chunked"], b"HTTP/1.1", 501, "unsupported transfer coding"),
    ([b"Transfer-Encoding: gzip"], b"HTTP/1.1", 400, None),
    ([b"Transfer-Encoding: chunked, gzip"], b"HTTP/1.1", 400, None),
    ([b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], b"HTTP/1.1", 400, None),
    ([b"Transfer-Encoding: chunked", b"Content-Length: 5"], b"HTTP/1.1", 400, None),
    ([b"Transfer-Encoding: chunked"], b"HTTP/1.0", 400, "http/1.0"),
]


@pytest.mark.parametrize(("lines", "version", "status", "reason"), CODINGS)
async def test_transfer_codings(
    edge: Edge, lines: list[bytes], version: bytes, status: int, reason: str | None
) -> None:
    answer = await edge.send(method=b"POST", headers=lines, version=version, body=CHUNKED_BODY)
    assert answer.status == status, answer.body
    if status == 200:
        assert answer.json()["bytes"] == 5
        return
    assert edge.upstream.requests == []
    if reason == "unsupported transfer coding":
        assert is_json_error(answer, "unsupported transfer coding: only chunked is implemented")
    elif reason == "http/1.0":
        assert is_json_error(answer, "Transfer-Encoding is not allowed in an HTTP/1.0 request")


async def test_an_empty_transfer_encoding_is_refused(edge: Edge) -> None:
    answer = await edge.send(method=b"POST", headers=[b"Transfer-Encoding: "])
    assert answer.status == 400
    assert edge.upstream.requests == []


async def test_no_100_continue_before_a_501(edge: Edge) -> None:
    lines = [b"Transfer-Encoding: gzip, chunked", b"Expect: 100-continue"]
    answer = await edge.send(method=b"PUT", headers=lines, body=CHUNKED_BODY)
    assert answer.status == 501  # the first status line read: no "100 Continue" went first
    assert edge.upstream.requests == []


# --------------------------------------------------------------------------- Host


# (Host header line(s), status, our JSON reason; None: aiohttp's parser said no)
BAD_HOSTS: list[tuple[list[bytes], int, str | None]] = [
    ([b"Host: a b"], 400, "invalid Host header"),
    ([b"Host: evil.example/x"], 400, "invalid Host header"),
    ([b"Host: user@evil.example"], 400, "invalid Host header"),
    ([b"Host: evil.example\\x"], 400, "invalid Host header"),
    ([b"Host: <script>"], 400, "invalid Host header"),
    ([b'Host: a"b'], 400, "invalid Host header"),
    ([b"Host: a\tb"], 400, "invalid Host header"),
    ([b"Host: a,b"], 400, "invalid Host header"),
    ([b"Host: host:99999"], 400, "invalid Host header"),
    ([b"Host: host:0"], 400, "invalid Host header"),
    ([b"Host: host:x"], 400, "invalid Host header"),
    ([b"Host: [::1"], 400, "invalid Host header"),
    ([b"Host: [fe80::1%25eth0]:80"], 400, "invalid Host header"),
    ([b"Host: \xc3\xa9vil.example"], 400, "invalid Host header"),
    ([b"Host: "], 400, "invalid Host header"),
    ([b"Host: \x01a"], 400, None),
    ([b"Host: a", b"Host: b"], 400, None),
    ([b"Host: a", b"host: a"], 400, None),
    ([], 400, None),  # HTTP/1.1 without Host
]


@pytest.mark.parametrize(("lines", "status", "reason"), BAD_HOSTS)
@pytest.mark.parametrize("trusted", [False, True])
async def test_invalid_host_never_reaches_the_upstream(
    upstream: Upstream, lines: list[bytes], status: int, reason: str | None, trusted: bool
) -> None:
    async with start(upstream, trusted_proxies=["127.0.0.1/32"] if trusted else []) as edge:
        answer = await edge.send(headers=lines, host=None)
        assert answer.status == status, answer.body
        assert edge.upstream.requests == []
        if reason is not None:
            assert is_json_error(answer, reason)


@pytest.mark.parametrize(
    "host",
    [b"sync.example.com", b"sync.example.com:8443", b"10.0.0.1:4984", b"[::1]:4984", b"a_b.local"],
)
async def test_valid_host_travels_as_x_forwarded_host(edge: Edge, host: bytes) -> None:
    answer = await edge.send(host=host)
    assert answer.status == 200
    assert edge.upstream.header(0, "X-Forwarded-Host") == [host.decode()]


@pytest.mark.parametrize(
    ("value", "status"),
    [(b"public.example", 200), (b"a.example, b.example:8443", 200), (b"u@evil.example", 400)],
)
async def test_a_trusted_proxys_forwarded_host_is_checked_too(
    upstream: Upstream, value: bytes, status: int
) -> None:
    async with start(upstream, trusted_proxies=["127.0.0.1/32"]) as edge:
        answer = await edge.send(headers=[b"X-Forwarded-Host: " + value])
        assert answer.status == status
        if status == 200:
            assert edge.upstream.header(0, "X-Forwarded-Host") == [value.decode()]
        else:
            assert is_json_error(answer, "invalid X-Forwarded-Host")
            assert edge.upstream.requests == []


async def test_http10_without_host_has_no_forwarded_host(edge: Edge) -> None:
    answer = await edge.send(version=b"HTTP/1.0", host=None)
    assert answer.status == 200
    assert edge.upstream.header(0, "X-Forwarded-Host") == []


# --------------------------------------------------------------------------- targets


DOT = "request path contains dot segments"
NUL = "request path contains NUL"
BACKSLASH = "request path contains a backslash"
# (raw target, status, reason): 400 from the target rule; 404 where the router already refused
TARGETS: list[tuple[bytes, int, str]] = [
    (b"/db/..%2f_users", 400, DOT),
    (b"/db/x%2F..%2F..%2F_users", 400, DOT),
    (b"/db/%2e%2e%5c_users", 400, DOT),
    (b"/db/..%5C..%5C_all_dbs", 400, DOT),
    (b"/db/%252e%252e/_users", 400, DOT),
    (b"/db/%25252e%25252E/_users", 400, DOT),
    (b"/db/..;/_users", 400, DOT),
    (b"/db/.;/x", 400, DOT),
    (b"/db/..;jsessionid=x/_users", 400, DOT),
    (b"/db/%2e%2e;x/_users", 400, DOT),
    (b"/db/..%3b/_users", 400, DOT),
    (b"/db/x%00", 400, NUL),
    (b"/db/%2500", 400, NUL),
    (b"/db/x\\..\\_users", 400, BACKSLASH),
    (b"/db/a\\b", 400, BACKSLASH),
    (b"/db%2F../x", 404, "no such database 'db/..'"),
    (b"/db%2f..%2f_users", 404, "no such database 'db/../_users'"),
    (b"/db%00/x", 404, "no such database 'db'"),  # outside text: the NUL is dropped
    (b"/db;x/y", 404, "no such database 'db;x'"),
    (b"/db\\x", 404, "no such database 'dbx'"),  # outside text: the backslash is dropped
]


@pytest.mark.parametrize(("target", "status", "reason"), TARGETS)
async def test_hostile_targets_never_reach_the_upstream(
    edge: Edge, target: bytes, status: int, reason: str
) -> None:
    answer = await edge.send(target)
    assert answer.status == status, answer.body
    assert is_json_error(answer, reason)
    assert edge.upstream.requests == []


@pytest.mark.parametrize("target", [t for t in LEGITIMATE if t.startswith(("/db/", "/%64b"))])
async def test_legitimate_targets_reach_the_upstream_byte_for_byte(edge: Edge, target: str) -> None:
    answer = await edge.send(target.encode())
    assert answer.status == 200, answer.body
    assert [r["path_qs"] for r in edge.upstream.requests] == [target]


# --------------------------------------------------------------------------- the user name


def hmac_sha256(key: str, message: str) -> str:
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    "name", ["bob%40example.com", "op_x%2Bbob%40example.com", "100%", "a,b", "O'Brien"]
)
async def test_user_name_is_sent_exactly_as_session_reports_it(
    upstream: Upstream, name: str
) -> None:
    couchdb = {"enabled": True, "secret": SECRET}
    async with start(upstream, couchdb_proxy_auth=couchdb) as edge:
        session = await admin_session(edge.sidecar.admin_url, "db", name)
        answer = await edge.send(session=session)
        assert answer.status == 200
        assert edge.upstream.header(0, "X-Forwarded-User") == [name]
        assert edge.upstream.header(0, "X-Auth-CouchDB-UserName") == [name]
        assert edge.upstream.header(0, "X-Auth-CouchDB-Token") == [hmac_sha256(SECRET, name)]
        reported = await edge.send(b"/db/_session", session=session)
        assert reported.json()["userCtx"]["name"] == name


@pytest.mark.parametrize("name", ["bob smith", "José", "tab\there"])
async def test_user_name_without_an_exact_header_form_is_refused(edge: Edge, name: str) -> None:
    session = await admin_session(edge.sidecar.admin_url, "db", name)
    answer = await edge.send(session=session)
    assert answer.status == 403
    assert is_json_error(
        answer, "the user name cannot be passed upstream exactly (not visible ASCII)"
    )
    assert edge.upstream.requests == []


async def test_a_login_name_is_not_escaped_twice(op: OpenIDProvider, upstream: Upstream) -> None:
    op.register_client(CLIENT)
    provider = {"issuer": op.issuer, "client_id": CLIENT.client_id, "register": True}
    provider |= {"username_claim": "email"}
    config = base_config(
        free_port(),
        free_port(),
        upstream=upstream.url,
        databases={"db": {"oidc": {"providers": {"op": provider}}}},
        couchdb_proxy_auth={"enabled": True},
    )
    async with running_sidecar(config) as sidecar:
        token = (await get_tokens(op, CLIENT, "alice"))["id_token"]
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.get(f"{sidecar.url}/db/_session") as response:
                name = (await response.json())["userCtx"]["name"]
            async with http.get(f"{sidecar.url}/db/doc") as response:
                assert response.status == 200
    assert name == "alice%40example.com"  # Sync Gateway's query-escaped form of the email
    assert upstream.header(0, "X-Forwarded-User") == [name]
    assert upstream.header(0, "X-Auth-CouchDB-UserName") == [name]
    assert upstream.header(0, "X-Forwarded-Email") == ["alice@example.com"]
