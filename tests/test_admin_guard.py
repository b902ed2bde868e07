"""No web page may drive the admin API: requests with `Origin` are refused (403), and a
loopback admin listener without `admin_auth` refuses a Host that does not name this machine
(DNS rebinding). Probes that address a pod by IP keep working where the Host rule is off."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import raw_exchange
from support.redis_server import free_port
from support.sidecar import Upstream, base_config, running_sidecar

from sidecar.admin_auth import _host_name, is_loopback_host

TOKEN = "admin-Secret-token-1"
EVIL = "http://evil.example"


def _message(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    version = "1.0" if method.endswith("10") else "1.1"
    method = method.removesuffix("10")
    lines = [f"{method} {path} HTTP/{version}", *(f"{k}: {v}" for k, v in headers)]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# (id, mode, method, path, Host ({port} filled in; None: no Host), more headers, status)
# mode: "open" (loopback, no admin_auth: the default), "auth" (admin_auth), "exposed"
# (0.0.0.0, no admin_auth: the Host rule is off, as for Kubernetes probes by pod IP).
CASES: list[tuple[str, str, str, str, str | None, list[tuple[str, str]], int]] = [
    ("loopback ip", "open", "GET", "/_health", "127.0.0.1:{port}", [], 200),
    ("localhost", "open", "GET", "/_health", "localhost:{port}", [], 200),
    ("LOCALHOST", "open", "GET", "/_health", "LOCALHOST:{port}", [], 200),
    ("ipv6 loopback", "open", "GET", "/_health", "[::1]:{port}", [], 200),
    ("other 127/8", "open", "GET", "/_health", "127.0.0.2", [], 200),
    ("metrics", "open", "GET", "/_metrics", "127.0.0.1:{port}", [], 200),
    ("rebinding name", "open", "GET", "/_health", "evil.example:{port}", [], 403),
    ("rebinding no port", "open", "GET", "/_health", "evil.example", [], 403),
    ("localhost suffix", "open", "GET", "/_health", "localhost.evil.example", [], 403),
    ("loopback lookalike", "open", "GET", "/_health", "127.0.0.1.nip.io:{port}", [], 403),
    ("pod ip on loopback", "open", "GET", "/_health", "10.0.0.5:{port}", [], 403),
    ("bad port", "open", "GET", "/_health", "127.0.0.1:x", [], 403),
    ("no Host", "open", "GET", "/_health", None, [], 400),  # HTTP/1.1: aiohttp's parser
    ("no Host, HTTP/1.0", "open", "GET10", "/_health", None, [], 403),
    ("create session, rebinding", "open", "POST", "/db/_session", "evil.example", [], 403),
    ("unknown path, rebinding", "open", "GET", "/nope", "evil.example", [], 403),
    ("origin", "open", "GET", "/_health", "127.0.0.1:{port}", [("Origin", EVIL)], 403),
    ("origin null", "open", "GET", "/_health", "127.0.0.1:{port}", [("Origin", "null")], 403),
    (
        "own origin",
        "open",
        "POST",
        "/db/_session",
        "127.0.0.1:{port}",
        [("Origin", "http://127.0.0.1:{port}")],
        403,
    ),
    ("create session", "open", "POST", "/db/_session", "127.0.0.1:{port}", [], 200),
    ("auth: any Host", "auth", "GET", "/_metrics", "evil.example", [("Authorization", "B")], 200),
    ("auth: probe by pod ip", "auth", "GET", "/_health", "10.0.0.5:{port}", [], 200),
    ("auth: no credentials", "auth", "GET", "/_metrics", "127.0.0.1:{port}", [], 401),
    (
        "auth: origin with credentials",
        "auth",
        "GET",
        "/_metrics",
        "127.0.0.1:{port}",
        [("Authorization", "B"), ("Origin", EVIL)],
        403,
    ),
    ("auth: origin on open path", "auth", "GET", "/_health", "x", [("Origin", EVIL)], 403),
    ("exposed: probe by pod ip", "exposed", "GET", "/_ready", "10.0.0.5:{port}", [], 200),
    ("exposed: origin", "exposed", "GET", "/_health", "10.0.0.5", [("Origin", EVIL)], 403),
]


@pytest.mark.parametrize(
    ("mode", "method", "path", "host", "headers", "status"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_admin_guard(
    upstream: Upstream,
    mode: str,
    method: str,
    path: str,
    host: str | None,
    headers: list[tuple[str, str]],
    status: int,
) -> None:
    port, admin_port = free_port(), free_port()
    settings: dict[str, Any] = {}
    if mode == "auth":
        settings["admin_auth"] = {"bearer_token": TOKEN, "open_paths": ["/_health", "/_ready"]}
    if mode == "exposed":
        settings["admin_interface"] = f"0.0.0.0:{admin_port}"
    config = base_config(port, admin_port, upstream=upstream.url, databases={"db": {}}, **settings)
    sent = [("Host", host.format(port=admin_port))] if host is not None else []
    for name, value in headers:
        value = f"Bearer {TOKEN}" if name == "Authorization" else value.format(port=admin_port)
        sent.append((name, value))
    body = b'{"name": "alice"}' if method == "POST" else b""
    async with running_sidecar(config) as sidecar:
        if path == "/db/_session":  # the user must exist for a session to be created
            create = _message("PUT", "/db/_user/alice", [("Host", "127.0.0.1")], b"{}")
            assert (await raw_exchange(sidecar.admin_port, create)).status in (200, 201)
        answer = await raw_exchange(sidecar.admin_port, _message(method, path, sent, body))
    assert answer.status == status, answer.body
    if status == 403:
        assert answer.json()["error"] == "Forbidden"


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("127.0.0.1:4985", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("[::1]:4985", "::1"),
        ("[::1]", "::1"),
        ("[::1]x", None),
        ("[::1", None),
        ("a:b", None),
        (":4985", None),
        ("", None),
    ],
)
def test_host_name(value: str, host: str | None) -> None:
    assert _host_name(value) == host


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("localhost.evil.example", False),
        ("evil.example", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
