"""Header hygiene: hop-by-hop and spoofed headers dropped, identity added safely."""

from __future__ import annotations

import hashlib
import re
from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import CouchDBProxyAuth, IdentityHeaders, Secret
from sidecar.errors import BadRequest, Forbidden
from sidecar.headers import (
    ClientView,
    CouchDBHeaders,
    client_ip_trusted,
    client_view,
    downstream_response_headers,
    encode_value,
    strip_cookie,
    upstream_request_headers,
)
from sidecar.identity import Identity

ALICE = Identity(
    name="alice",
    email="alice@example.com",
    roles=frozenset({"editor", "admin"}),
    channels=frozenset({"news", "chat"}),
)
NAMES = IdentityHeaders()
Pairs = list[tuple[str, str]]


def build(
    pairs: Pairs,
    *,
    identity: Identity = ALICE,
    names: IdentityHeaders = NAMES,
    peer: str | None = "10.0.0.9",
    scheme: str = "http",
    host: str | None = "sync.example.com",
    trusted: bool = False,
    pass_authorization: bool = False,
    request_id: str | None = None,
    couchdb: CouchDBHeaders | CouchDBProxyAuth | None = None,
) -> CIMultiDict[str]:
    return upstream_request_headers(
        CIMultiDictProxy(CIMultiDict(pairs)),
        identity=identity,
        names=names,
        peer=peer,
        scheme=scheme,
        host=host,
        trusted=trusted,
        pass_authorization=pass_authorization,
        session_cookie_name="SyncGatewaySession",
        request_id=request_id,
        couchdb=couchdb,
    )


@pytest.mark.parametrize(
    ("pairs", "dropped"),
    [
        ([("Connection", "keep-alive")], ["Connection"]),
        ([("Keep-Alive", "timeout=5")], ["Keep-Alive"]),
        ([("HTTP2-Settings", "AAMAAABkAAQAAP__")], ["HTTP2-Settings"]),
        ([("Proxy-Authorization", "Basic eDp5")], ["Proxy-Authorization"]),
        ([("Proxy-Authenticate", "Basic")], ["Proxy-Authenticate"]),
        ([("Proxy-Connection", "keep-alive")], ["Proxy-Connection"]),
        ([("TE", "trailers")], ["TE"]),
        ([("Trailer", "X-Sum")], ["Trailer"]),
        ([("Trailers", "X-Sum")], ["Trailers"]),
        ([("Transfer-Encoding", "chunked")], ["Transfer-Encoding"]),
        ([("Upgrade", "websocket")], ["Upgrade"]),
        ([("Connection", "close, X-Private"), ("X-Private", "1")], ["X-Private"]),
        (
            [("Connection", "X-One"), ("Connection", "x_two"), ("X-One", "1"), ("X-Two", "2")],
            ["X-One", "X-Two"],
        ),
        ([("Connection", "x-private"), ("X_Private", "1")], ["X_Private"]),
        ([("Host", "evil.example")], ["Host"]),
        ([("Expect", "100-continue")], ["Expect"]),
        (
            [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
            ["Transfer-Encoding", "Content-Length"],
        ),
        (
            [("Sec-WebSocket-Key", "abc"), ("Sec-WebSocket-Version", "13")],
            ["Sec-WebSocket-Key", "Sec-WebSocket-Version"],
        ),
        (
            [("Sec-WebSocket-Protocol", "yjs"), ("Sec-WebSocket-Extensions", "permessage-deflate")],
            ["Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions"],
        ),
    ],
)
def test_hop_by_hop_headers_are_dropped(pairs: Pairs, dropped: list[str]) -> None:
    out = build(pairs + [("Accept", "application/json")])
    for name in dropped:
        assert name not in out
    assert out["Accept"] == "application/json"


def test_end_to_end_headers_keep_order_and_repeats() -> None:
    pairs = [
        ("Accept", "application/json"),
        ("X-Custom", "1"),
        ("Content-Length", "12"),
        ("X-Custom", "2"),
        ("Content-Type", "application/json"),
    ]
    out = build(pairs)
    kept = [
        (k, v)
        for k, v in out.items()
        if k in ("Accept", "X-Custom", "Content-Length", "Content-Type")
    ]
    assert kept == pairs


@pytest.mark.parametrize(
    "spoof",
    [
        "X-Forwarded-User",
        "x-forwarded-user",
        "X-FORWARDED-USER",
        "X_Forwarded_User",
        "x_forwarded-user",
        "X-Forwarded-Email",
        "x_forwarded_email",
        "X-Forwarded-Roles",
        "X_FORWARDED_ROLES",
        "X-Forwarded-Channels",
        "x_forwarded_channels",
        "X-Auth-CouchDB-UserName",
        "x-auth-couchdb-roles",
        "X_Auth_CouchDB_Token",
        "X-Auth-CouchDB-Anything",
    ],
)
@pytest.mark.parametrize("couchdb", [None, CouchDBProxyAuth(enabled=True, secret=Secret("s3cret"))])
def test_identity_look_alikes_are_dropped(spoof: str, couchdb: CouchDBProxyAuth | None) -> None:
    out = build([(spoof, "evil")], couchdb=couchdb)
    assert "evil" not in out.values()
    assert out.getall("X-Forwarded-User") == ["alice"]
    assert out.getall("X-Forwarded-Email") == ["alice@example.com"]
    assert out.getall("X-Forwarded-Roles") == ["admin,editor"]
    assert out.getall("X-Forwarded-Channels") == ["chat,news"]


def test_custom_identity_header_names() -> None:
    names = IdentityHeaders(
        user="X-Remote-User",
        email="X-Remote-Email",
        roles="X-Remote-Groups",
        channels="X-Remote-Channels",
    )
    out = build([("X_Remote_User", "evil"), ("x-remote-groups", "evil")], names=names)
    assert "evil" not in out.values()
    assert out["X-Remote-User"] == "alice"
    assert out["X-Remote-Groups"] == "admin,editor"


@pytest.mark.parametrize(
    ("identity", "present", "absent"),
    [
        (
            Identity(name="bob"),
            {"X-Forwarded-User": "bob"},
            ["X-Forwarded-Email", "X-Forwarded-Roles", "X-Forwarded-Channels"],
        ),
        (
            Identity(name="bob", roles=frozenset({"b", "a", "c"})),
            {"X-Forwarded-Roles": "a,b,c"},
            ["X-Forwarded-Channels"],
        ),
        (Identity(name="bob", email=""), {"X-Forwarded-User": "bob"}, ["X-Forwarded-Email"]),
    ],
)
def test_identity_headers_omitted_when_empty(
    identity: Identity, present: dict[str, str], absent: list[str]
) -> None:
    out = build([], identity=identity)
    for name, value in present.items():
        assert out[name] == value
    for name in absent:
        assert name not in out


@pytest.mark.parametrize(
    ("pass_authorization", "cookies", "expected_cookies", "authorization"),
    [
        (False, ["a=1; SyncGatewaySession=s; b=2"], ["a=1; b=2"], None),
        (False, ["SyncGatewaySession=s"], [], None),
        (False, ["a=1;b=2"], ["a=1;b=2"], None),  # untouched text when nothing removed
        (False, ['a=1;SyncGatewaySession=x;  b="q w"'], ['a=1; b="q w"'], None),
        (False, [" SyncGatewaySession =x; a=1"], ["a=1"], None),
        (False, ["SyncGatewaySession=1; SyncGatewaySession=2; z=9"], ["z=9"], None),
        (False, ["SyncGatewaySessionX=1; a=2"], ["SyncGatewaySessionX=1; a=2"], None),
        (
            False,
            ["syncgatewaysession=1"],
            ["syncgatewaysession=1"],
            None,
        ),  # names are case-sensitive
        (False, ["a=1", "SyncGatewaySession=s", "b=2"], ["a=1", "b=2"], None),
        (
            True,
            ["a=1; SyncGatewaySession=s; b=2"],
            ["a=1; SyncGatewaySession=s; b=2"],
            "Bearer tok",
        ),
        (True, ["SyncGatewaySession=s"], ["SyncGatewaySession=s"], "Bearer tok"),
    ],
)
def test_credentials_stripped_unless_passed(
    pass_authorization: bool,
    cookies: list[str],
    expected_cookies: list[str],
    authorization: str | None,
) -> None:
    pairs = [("Authorization", "Bearer tok")] + [("Cookie", c) for c in cookies]
    out = build(pairs, pass_authorization=pass_authorization)
    assert out.getall("Cookie", []) == expected_cookies
    assert out.get("Authorization") == authorization


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a=1; b=2", "a=1; b=2"),
        ("x=1; SyncGatewaySession=abc", "x=1"),
        ("SyncGatewaySession=abc;x=1;y=2", "x=1; y=2"),
        ("SyncGatewaySession", ""),
        (";;a=1;;", ";;a=1;;"),
    ],
)
def test_strip_cookie(value: str, expected: str) -> None:
    assert strip_cookie(value, "SyncGatewaySession") == expected


@pytest.mark.parametrize(
    ("trusted", "pairs", "peer", "host", "expected"),
    [
        (
            False,
            [
                ("X-Forwarded-For", "1.2.3.4"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "evil"),
                ("Forwarded", "for=1.2.3.4"),
                ("X-Real-IP", "1.2.3.4"),
            ],
            "10.0.0.9",
            "sync.example.com",
            {
                "X-Forwarded-For": "10.0.0.9",
                "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "sync.example.com",
                "Forwarded": None,
                "X-Real-IP": None,
            },
        ),
        (
            True,
            [
                ("X-Forwarded-For", "1.2.3.4, 5.6.7.8"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "public.example"),
                ("Forwarded", "for=1.2.3.4"),
                ("X-Real-IP", "1.2.3.4"),
            ],
            "10.0.0.9",
            "internal:4984",
            {
                "X-Forwarded-For": "1.2.3.4, 5.6.7.8, 10.0.0.9",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "public.example",
                "Forwarded": "for=1.2.3.4",
                "X-Real-IP": "1.2.3.4",
            },
        ),
        (
            True,
            [],
            "10.0.0.9",
            "sync.example.com",
            {
                "X-Forwarded-For": "10.0.0.9",
                "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "sync.example.com",
            },
        ),
        (
            True,
            [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")],
            "10.0.0.9",
            None,
            {"X-Forwarded-For": "1.1.1.1, 2.2.2.2, 10.0.0.9", "X-Forwarded-Host": None},
        ),
        (
            True,  # even a trusted proxy's look-alikes are not believed
            [
                ("X_Forwarded_For", "6.6.6.6"),
                ("x_forwarded_proto", "https"),
                ("X-Forwarded_Host", "evil"),
            ],
            "10.0.0.9",
            "sync.example.com",
            {
                "X-Forwarded-For": "10.0.0.9",
                "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "sync.example.com",
            },
        ),
        (
            False,
            [("X_Forwarded_For", "6.6.6.6"), ("x-real_ip", "6.6.6.6")],
            "10.0.0.9",
            "sync.example.com",
            {"X-Forwarded-For": "10.0.0.9", "X-Real-IP": None},
        ),
        (False, [("X-Forwarded-For", "1.2.3.4")], None, "h", {"X-Forwarded-For": None}),
    ],
)
def test_forwarding_headers(
    trusted: bool, pairs: Pairs, peer: str | None, host: str | None, expected: dict[str, str | None]
) -> None:
    out = build(pairs, trusted=trusted, peer=peer, host=host)
    for name, value in expected.items():
        assert out.getall(name, []) == ([] if value is None else [value]), name
    assert "6.6.6.6" not in ",".join(out.values())
    assert "evil" not in out.values()


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("alice", "alice"),
        ("alice\r\nX-Evil: 1", "alice%0D%0AX-Evil:%201"),
        ("nul\x00byte", "nul%00byte"),
        ("tab\tand\x7fdel", "tab%09and%7Fdel"),
        ("a,b", "a%2Cb"),
        ("100%", "100%25"),
        ("al%0Aice", "al%250Aice"),
        ("José", "Jos%C3%A9"),
        ("\ud800", "%ED%A0%80"),
        ("bob@example.com", "bob@example.com"),
    ],
)
def test_encode_value(text: str, encoded: str) -> None:
    assert encode_value(text) == encoded


def test_control_characters_in_identity_cannot_inject() -> None:
    identity = Identity(
        name="alice",
        email="a\x00b@example.com",
        roles=frozenset({"r\n1", "a,b"}),
        channels=frozenset({"ch 1", "é"}),
    )
    out = build(
        [],
        identity=identity,
        request_id="id\r\n1",
        couchdb=CouchDBProxyAuth(enabled=True, secret=Secret("k")),
    )
    for name, value in out.items():
        assert not any(c in value for c in "\r\n\x00"), name
    assert out["X-Forwarded-Email"] == "a%00b@example.com"
    assert out["X-Forwarded-Roles"] == "a%2Cb,r%0A1"  # still exactly two roles
    assert out["X-Forwarded-Channels"] == "ch%201,%C3%A9"
    assert out["X-Request-ID"] == "id%0D%0A1"
    assert out.getall("X-Forwarded-Roles") == ["a%2Cb,r%0A1"]


# The user name travels exactly as /_session reports it: Sync Gateway's query-escaped names are
# visible ASCII already and must not be escaped a second time.
@pytest.mark.parametrize(
    "name",
    [
        "alice",
        "bob%40example.com",  # a login's name for bob@example.com
        "op_bob%2Bx%40example.com",
        "www.someprovider.com%2Fextra_%7Bbernard%7D",
        "100%",
        "a,b",  # one name, never split: the header is single-valued
        "!#$&'()*+-./:;<=>?@[\\]^_`{|}~\"",
    ],
)
@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_user_name_is_sent_exactly(name: str, secret: str | None) -> None:
    out = build([], identity=Identity(name=name), couchdb=CouchDBHeaders(secret=secret))
    assert out.getall("X-Forwarded-User") == [name]
    assert out.getall("X-Auth-CouchDB-UserName") == [name]
    if secret is not None:
        assert out["X-Auth-CouchDB-Token"] == _hmac_sha256(secret.encode(), name.encode())


@pytest.mark.parametrize(
    "name",
    [
        "alice\r\nX-Forwarded-Roles: admin",
        "al\nice",
        "nul\x00",
        "tab\tname",
        "bob smith",  # admin API names may hold spaces: "bob%20smith" is another user's name
        "José",
        "del\x7f",
        "\ud800",
        "",
    ],
)
def test_user_name_without_an_exact_header_form_is_refused(name: str) -> None:
    with pytest.raises(Forbidden):
        build([], identity=Identity(name=name), couchdb=CouchDBHeaders())


def test_list_encoding_is_injective() -> None:
    roles = ["admin", "adm\nin", "adm%0Ain", "adm%250Ain", "adm in", "adm%20in", "a,b", "a%2Cb"]
    values = {
        build([], identity=Identity(name="x", roles=frozenset({r})))["X-Forwarded-Roles"]
        for r in roles
    }
    assert len(values) == len(roles)


def test_couchdb_secret_not_in_repr() -> None:
    assert "s3cret" not in repr(CouchDBHeaders(secret="s3cret"))


def _hmac_sha256(key: bytes, message: bytes) -> str:
    """RFC 2104 written out, independent of the hmac module."""
    block = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block) + message).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in block) + inner).hexdigest()


@pytest.mark.parametrize(
    ("identity", "expected_user", "expected_token"),
    [
        (ALICE, "alice", "765542af1f1d587bc60c218dca532a258f56b9c21a427cc819de2a1ff6d3e146"),
        (
            Identity(name="bob%40example.com"),
            "bob%40example.com",
            "5b31fd554da886a8b92f1a0ed1a0ec076887cada45bd5c9b0682e7a0bf10e867",
        ),
    ],
)
@pytest.mark.parametrize(
    "couchdb",
    [CouchDBHeaders(secret="s3cret"), CouchDBProxyAuth(enabled=True, secret=Secret("s3cret"))],
)
def test_couchdb_proxy_auth_token(
    identity: Identity,
    expected_user: str,
    expected_token: str,
    couchdb: CouchDBHeaders | CouchDBProxyAuth,
) -> None:
    out = build([], identity=identity, couchdb=couchdb)
    assert out["X-Auth-CouchDB-UserName"] == expected_user
    # expected_token computed with `openssl dgst -sha256 -hmac s3cret`
    assert out["X-Auth-CouchDB-Token"] == expected_token
    assert expected_token == _hmac_sha256(b"s3cret", expected_user.encode())
    if identity.roles:
        assert out["X-Auth-CouchDB-Roles"] == "admin,editor"
    else:
        assert "X-Auth-CouchDB-Roles" not in out


@pytest.mark.parametrize(
    ("couchdb", "expected"),
    [
        (None, {}),
        (CouchDBProxyAuth(enabled=False, secret=Secret("s3cret")), {}),
        (CouchDBHeaders(enabled=False, secret="s3cret"), {}),
        (
            CouchDBProxyAuth(enabled=True),
            {"X-Auth-CouchDB-UserName": "alice", "X-Auth-CouchDB-Roles": "admin,editor"},
        ),
        (
            CouchDBHeaders(),
            {"X-Auth-CouchDB-UserName": "alice", "X-Auth-CouchDB-Roles": "admin,editor"},
        ),
    ],
)
def test_couchdb_headers_only_when_enabled(
    couchdb: CouchDBHeaders | CouchDBProxyAuth | None, expected: dict[str, str]
) -> None:
    out = build(
        [("X-Auth-CouchDB-Token", "forged"), ("X-Auth-CouchDB-UserName", "admin")], couchdb=couchdb
    )
    couch = {k: v for k, v in out.items() if k.lower().startswith("x-auth-couchdb-")}
    assert couch == expected


@pytest.mark.parametrize(
    ("pairs", "request_id", "expected"),
    [
        ([("X-Request-ID", "client-1")], "ours-1", ["ours-1"]),
        ([("X-Request-ID", "client-1")], None, ["client-1"]),
        ([("X_Request_ID", "client-1")], None, []),
        ([], "ours-1", ["ours-1"]),
        ([], None, []),
    ],
)
def test_request_id(pairs: Pairs, request_id: str | None, expected: list[str]) -> None:
    assert build(pairs, request_id=request_id).getall("X-Request-ID", []) == expected


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (
            [("Content-Length", "10"), ("Content-Type", "text/plain")],
            [("Content-Length", "10"), ("Content-Type", "text/plain")],
        ),
        (
            [("Transfer-Encoding", "chunked"), ("Content-Type", "text/plain")],
            [("Content-Type", "text/plain")],
        ),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "10")], []),
        (
            [
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("X-End", "2"),
            ],
            [("X-End", "2")],
        ),
        ([("Upgrade", "h2c"), ("Proxy-Authenticate", "Basic"), ("Trailer", "X-Sum")], []),
        (
            [
                ("Set-Cookie", "a=1; Path=/"),
                ("Set-Cookie", "b=2; Path=/"),
                ("Content-Encoding", "gzip"),
            ],
            [
                ("Set-Cookie", "a=1; Path=/"),
                ("Set-Cookie", "b=2; Path=/"),
                ("Content-Encoding", "gzip"),
            ],
        ),
    ],
)
def test_downstream_response_headers(pairs: Pairs, expected: Pairs) -> None:
    out = downstream_response_headers(CIMultiDictProxy(CIMultiDict(pairs)))
    assert list(out.items()) == expected


NETS: list[IPv4Network | IPv6Network] = [
    ip_network("10.0.0.0/8"),
    ip_network("fe80::/10"),
    ip_network("2001:db8::/32"),
]


@pytest.mark.parametrize(
    ("peer", "networks", "expected"),
    [
        ("10.1.2.3", NETS, True),
        ("11.0.0.1", NETS, False),
        (None, NETS, False),
        ("", NETS, False),
        ("::ffff:10.0.0.1", NETS, True),
        ("::ffff:11.0.0.1", NETS, False),
        ("fe80::1%eth0", NETS, True),
        ("2001:db8::1", NETS, True),
        ("2001:db9::1", NETS, False),
        ("garbage", NETS, False),
        ("10.1.2.3", [], False),
        ("10.0.0.1:4984", NETS, False),
    ],
)
def test_client_ip_trusted(
    peer: str | None, networks: list[IPv4Network | IPv6Network], expected: bool
) -> None:
    assert client_ip_trusted(peer, networks) is expected


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ({"_admin", "editor"}, ["editor"]),
        ({"_admin"}, []),
        ({"_reader", "a", "b"}, ["a,b"]),
        ({"admin_"}, ["admin_"]),
    ],
)
def test_couchdb_reserved_roles_are_never_granted(roles: set[str], expected: list[str]) -> None:
    identity = Identity(name="alice", roles=frozenset(roles))
    out = build([], identity=identity, couchdb=CouchDBProxyAuth(enabled=True))
    assert out.getall("X-Auth-CouchDB-Roles", []) == expected


# ------------------------------------------------------------------ how the client reached us

PROXIES = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]
INSIDE = "internal:4984"  # the Host a request made directly to the pod carries


@pytest.mark.parametrize(
    ("peer", "pairs", "expected"),
    [
        # No proxy claims: our own connection decides.
        ("10.0.0.2", [], ClientView(False, INSIDE)),
        # The Kubernetes ingress: TLS ends there, it says so.
        ("10.0.0.2", [("X-Forwarded-Proto", "https")], ClientView(True, INSIDE)),
        (
            "10.0.0.2",
            [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "sync.example.com")],
            ClientView(True, "sync.example.com"),
        ),
        ("10.0.0.2", [("X-Forwarded-Proto", "HTTPS")], ClientView(True, INSIDE)),
        ("10.0.0.2", [("X-Forwarded-Proto", "wss")], ClientView(True, INSIDE)),
        ("10.0.0.2", [("X-Forwarded-Proto", "http")], ClientView(False, INSIDE)),
        ("10.0.0.2", [("X-Forwarded-Proto", "ftp")], ClientView(False, INSIDE)),
        ("::ffff:10.0.0.2", [("X-Forwarded-Proto", "https")], ClientView(True, INSIDE)),
        ("fd00::1", [("Forwarded", "proto=https")], ClientView(True, INSIDE)),
        # Security: an untrusted peer's claims are ignored, whatever they say.
        ("192.0.2.7", [("X-Forwarded-Proto", "https")], ClientView(False, INSIDE)),
        ("192.0.2.7", [("Forwarded", "proto=https;host=evil.example")], ClientView(False, INSIDE)),
        ("192.0.2.7", [("X-Forwarded-Host", "evil.example")], ClientView(False, INSIDE)),
        (None, [("X-Forwarded-Proto", "https")], ClientView(False, INSIDE)),
        # RFC 7239: one element per proxy, the last one our peer's.
        ("10.0.0.2", [("Forwarded", "for=192.0.2.60;proto=https;host=a.example")],
         ClientView(True, "a.example")),
        ("10.0.0.2", [("Forwarded", 'for="192.0.2.60:4711";proto="https"')],
         ClientView(True, INSIDE)),
        ("10.0.0.2", [("Forwarded", "For=192.0.2.60;Proto=HTTPS")], ClientView(True, INSIDE)),
        # Security: a client's own Forwarded element comes first; our peer's (last) wins.
        ("10.0.0.2", [("Forwarded", "proto=https;host=evil.example, for=192.0.2.60;proto=http")],
         ClientView(False, INSIDE)),
        ("10.0.0.2", [("Forwarded", "proto=https"), ("Forwarded", "for=192.0.2.60;proto=http")],
         ClientView(False, INSIDE)),
        # A chain of trusted proxies: the element written by the one facing the client.
        ("10.0.0.2", [("Forwarded", "for=192.0.2.60;proto=https, for=10.0.0.5;proto=http")],
         ClientView(True, INSIDE)),
        ("10.0.0.2", [("Forwarded", 'for=192.0.2.60;proto=https, for="[fd00::5]:80";proto=http')],
         ClientView(True, INSIDE)),
        ("10.0.0.2", [("Forwarded", "proto=http, for=192.0.2.1;proto=https, for=10.0.0.5")],
         ClientView(True, INSIDE)),
        # ... but not past an untrusted or hidden hop.
        ("10.0.0.2", [("Forwarded", "proto=https, for=unknown;proto=http")],
         ClientView(False, INSIDE)),
        ("10.0.0.2", [("Forwarded", "proto=https, for=_hidden;proto=http")],
         ClientView(False, INSIDE)),
        # The element that decides says nothing of proto: X-Forwarded-Proto, then our own.
        ("10.0.0.2", [("Forwarded", "for=192.0.2.60"), ("X-Forwarded-Proto", "https")],
         ClientView(True, INSIDE)),
        ("10.0.0.2", [("Forwarded", "for=192.0.2.60;host=a.example")], ClientView(False, "a.example")),
        # Appended X-Forwarded-Proto lists pair with X-Forwarded-For from the right.
        ("10.0.0.2", [("X-Forwarded-Proto", "https, http"), ("X-Forwarded-For", "6.6.6.6, 192.0.2.60")],
         ClientView(False, INSIDE)),
        ("10.0.0.2", [("X-Forwarded-Proto", "https, http"), ("X-Forwarded-For", "192.0.2.60, 10.0.0.5")],
         ClientView(True, INSIDE)),
        ("10.0.0.2", [("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "192.0.2.60, 10.0.0.5")],
         ClientView(True, INSIDE)),  # one value: the proxy set it, it did not append
        ("10.0.0.2", [("X-Forwarded-Proto", "http"), ("X-Forwarded-Proto", "https")],
         ClientView(True, INSIDE)),
        ("10.0.0.2", [("X-Forwarded-Proto", " , ")], ClientView(False, INSIDE)),
        ("10.0.0.2", [("Forwarded", "garbage;;,")], ClientView(False, INSIDE)),
    ],
)  # fmt: skip
def test_client_view(peer: str | None, pairs: Pairs, expected: ClientView) -> None:
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    forwarded = make_mocked_request("GET", "/", headers=headers).forwarded  # aiohttp's parser
    view = client_view(
        headers, forwarded, https=False, host=INSIDE, peer=peer, trusted_networks=PROXIES
    )
    assert view == expected


def test_client_view_with_our_own_tls() -> None:
    """TLS to the sidecar itself counts when no trusted proxy speaks; a trusted proxy's claim
    describes the client's hop (TLS may end there and be redone towards us)."""
    none = CIMultiDictProxy(CIMultiDict[str]())
    view = client_view(none, (), https=True, host=INSIDE, peer="192.0.2.7", trusted_networks=[])
    assert view == ClientView(True, INSIDE)
    claim = CIMultiDictProxy(CIMultiDict([("X-Forwarded-Proto", "http")]))
    view = client_view(
        claim, (), https=True, host=INSIDE, peer="10.0.0.2", trusted_networks=PROXIES
    )
    assert view == ClientView(False, INSIDE)


# --------------------------------------------------------------------------- foreign headers


def spellings(name: str) -> list[str]:
    """`name` as a hostile client may spell it: any case, `_` or `.` for `-`."""
    return [name, name.lower(), name.upper(), name.replace("-", "_"), name.replace("-", ".")]


FOREIGN = [
    "Remote-User",
    "Remote-Groups",
    "Remote-Email",
    "Remote-Name",
    "REMOTE_USER",
    "X-Remote-User",
    "X-Remote-Group",
    "X-Remote-Extra-Scopes",
    "X-User",
    "X-Email",
    "X-Groups",
    "X-Auth-User",
    "X-Auth-Username",
    "X-Auth-Userid",
    "X-Auth-Email",
    "X-Auth-Groups",
    "X-Auth-Roles",
    "X-Auth-Subject",
    "X-Authenticated-User",
    "X-Authenticated-Userid",
    "X-Authenticated-Groups",
    "X-WEBAUTH-USER",
    "X-WEBAUTH-EMAIL",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Auth-Request-Access-Token",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token",
    "GAP-Auth",
    "X-Auth-CouchDB-UserName",
    "X-Auth-CouchDB-Roles",
    "X-Auth-CouchDB-Token",
    "OIDC_CLAIM_email",
    "OIDC_CLAIM_sub",
    "OIDC_access_token",
    "OIDC_id_token_payload",
    "X-Pomerium-Jwt-Assertion",
    "X-Pomerium-Claim-Email",
    "X-Authentik-Username",
    "X-Consumer-Username",
    "X-Credential-Identifier",
    "X-Anonymous-Consumer",
    "X-Userinfo",
    "X-Id-Token",
    "X-MS-CLIENT-PRINCIPAL",
    "X-MS-CLIENT-PRINCIPAL-NAME",
    "X-MS-TOKEN-AAD-ID-TOKEN",
    "X-Goog-Authenticated-User-Email",
    "X-Goog-IAP-JWT-Assertion",
    "X-Amzn-Oidc-Identity",
    "Cf-Access-Authenticated-User-Email",
    "Shib-Identity-Provider",
    "Mellon-NameID",
]
URL_OVERRIDES = [
    "X-Original-URL",
    "X-Original-URI",
    "X-Original-Path",
    "X-Rewrite-URL",
    "X-Override-URL",
    "X-Forwarded-Uri",
    "X-Forwarded-Url",
    "X-Forwarded-Path",
    "X-Forwarded-Prefix",
    "X-Script-Name",
    "X-Envoy-Original-Path",
    "X-Envoy-Original-Url",
    "X-Envoy-Original-Host",
]
# Near misses of the lists above, and headers an upstream needs: all pass untouched.
KEPT = [
    "X-Auth-Token",  # a client's own credential for some APIs, not an identity assertion
    "X-User-Id",
    "X-Users",
    "X-Remoteness",
    "Remotely",
    "X-Forwarded-Users",
    "X-Original-Request-Id",
    "X-Authorization-Hint",
    "Content-Type",
    "If-None-Match",
    "X-CouchDB-WWW-Authenticate",
]


@pytest.mark.parametrize("name", [s for n in FOREIGN for s in spellings(n)])
@pytest.mark.parametrize("trusted", [False, True])
def test_foreign_identity_headers_are_removed(name: str, trusted: bool) -> None:
    out = build([(name, "evil"), (name, "evil"), ("Accept", "*/*")], trusted=trusted)
    assert "evil" not in out.values()
    assert out["Accept"] == "*/*"
    assert out.getall("X-Forwarded-User") == ["alice"]


@pytest.mark.parametrize("name", [s for n in URL_OVERRIDES for s in spellings(n)])
@pytest.mark.parametrize("trusted", [False, True])  # not even from a trusted proxy
def test_url_override_headers_are_removed(name: str, trusted: bool) -> None:
    out = build([(name, "/_users/org.couchdb.user:admin"), ("Accept", "*/*")], trusted=trusted)
    assert list(out) == [
        "Accept",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Forwarded-User",
        "X-Forwarded-Email",
        "X-Forwarded-Roles",
        "X-Forwarded-Channels",
    ]


@pytest.mark.parametrize("name", KEPT)
def test_near_misses_pass(name: str) -> None:
    assert build([(name, "v")]).getall(name) == ["v"]


@pytest.mark.parametrize(
    ("strip", "sent", "kept"),
    [
        (("X-Tenant",), ["X-Tenant", "x_tenant", "X.TENANT"], ["X-Tenant-Id"]),
        (("X-Internal-*",), ["X-Internal-Role", "x_internal_anything"], ["X-Internals"]),
        (("x_acme_user",), ["X-Acme-User"], ["X-Acme-Users"]),
        ((), [], ["X-Tenant", "X-Internal-Role"]),
    ],
)
def test_configured_headers_are_removed_too(
    strip: tuple[str, ...], sent: list[str], kept: list[str]
) -> None:
    pairs = [(n, "evil") for n in sent] + [(n, "ok") for n in kept] + [("Remote-User", "evil")]
    out = upstream_request_headers(
        CIMultiDictProxy(CIMultiDict(pairs)),
        identity=ALICE,
        names=NAMES,
        peer=None,
        scheme="http",
        host=None,
        trusted=False,
        pass_authorization=False,
        session_cookie_name="SyncGatewaySession",
        request_id=None,
        strip=strip,
    )
    assert "evil" not in out.values()
    for name in kept:
        assert out.getall(name) == ["ok"]


@pytest.mark.parametrize(
    "name",
    [
        "X-Forwarded-Port",
        "X-Forwarded-Scheme",
        "X-Forwarded-Server",
        "X-Forwarded-Ssl",
        "X-Client-IP",
        "X-Cluster-Client-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
        "Fastly-Client-IP",
        "X-Original-Forwarded-For",
        "X-Scheme",
        "X-Url-Scheme",
        "Front-End-Https",
    ],
)
def test_more_forwarding_claims_only_from_trusted_proxies(name: str) -> None:
    assert name not in build([(name, "6.6.6.6")], trusted=False)
    assert build([(name, "1.2.3.4")], trusted=True).getall(name) == ["1.2.3.4"]
    assert "6.6.6.6" not in build([(name.replace("-", "_"), "6.6.6.6")], trusted=True).values()


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("Content_Length", "0")], []),
        ([("content.length", "0")], []),
        ([("Content~Length", "0")], []),
        ([("CONTENT-LENGTH", "5")], [("CONTENT-LENGTH", "5")]),  # the real one, any case
        ([("Content-Length", "5"), ("Content_Length", "0")], [("Content-Length", "5")]),
        ([("Transfer_Encoding", "chunked"), ("Content-Length", "5")], [("Content-Length", "5")]),
        ([("transfer.encoding", "chunked")], []),
        ([("Transfer-Encoding", "chunked"), ("Content_Length", "5")], []),
    ],
)
def test_framing_look_alikes_are_removed(pairs: Pairs, expected: Pairs) -> None:
    out = build(pairs)
    framing = [(k, v) for k, v in out.items() if re.sub("[^a-z]", "", k.lower()) in FRAMING]
    assert framing == expected


FRAMING = {"contentlength", "transferencoding"}


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("public.example", True),
        ("public.example:8443", True),
        ("a.example, b.example", True),  # a chain of proxies
        ("a b", False),
        ("evil.example/x", False),
        ("u@evil.example", False),
        ("a.example, <b>", False),
        ("", False),
    ],
)
def test_trusted_forwarded_host_must_be_a_valid_host(value: str, ok: bool) -> None:
    pairs = [("X-Forwarded-Host", value)]
    if ok:
        assert build(pairs, trusted=True).getall("X-Forwarded-Host") == [value]
    else:
        with pytest.raises(BadRequest):
            build(pairs, trusted=True)
    # from an untrusted client the value is simply replaced by the request's own Host
    assert build(pairs, trusted=False).getall("X-Forwarded-Host") == ["sync.example.com"]
