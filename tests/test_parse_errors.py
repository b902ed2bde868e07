"""Requests aiohttp's own HTTP parser refuses, written byte for byte on raw sockets: both
listeners answer JSON `{"error", "reason"}` with a fixed reason that never quotes the request
(a cookie bomb must not hand the HttpOnly session cookie back to a script), and the upstream
never sees them."""

from __future__ import annotations

import json

import pytest
from conftest import admin_session, raw_exchange
from support.redis_server import free_port
from support.sidecar import Upstream, base_config, running_sidecar

from sidecar.server import parse_error_answer

SECRET = "S3cretSessionIdThatMustNotComeBack"
HOST = b"Host: 127.0.0.1\r\n"
CLOSE = b"Connection: close\r\n"


def _request(head: bytes, tail: bytes = b"") -> bytes:
    return head + b"\r\n" + HOST + CLOSE + tail + b"\r\n"


CASES = [
    # an oversized Cookie header (cookie bombing) carrying the session cookie first
    (
        "oversized cookie",
        _request(
            b"GET /db/doc HTTP/1.1",
            f"Cookie: SyncGatewaySession={SECRET}; pad={'x' * 30_000}\r\n".encode(),
        ),
        "request line or header field too long",
    ),
    (
        "oversized header",
        _request(b"GET /db/doc HTTP/1.1", f"X-Pad: {SECRET}{'y' * 30_000}\r\n".encode()),
        "request line or header field too long",
    ),
    (
        "oversized target",
        _request(f"GET /db/{SECRET}{'z' * 20_000} HTTP/1.1".encode()),
        "request line or header field too long",
    ),
    (
        "space in a header name",
        _request(b"GET /db/doc HTTP/1.1", f"X Bad: {SECRET}\r\n".encode()),
        None,  # aiohttp's C and Python parsers raise different classes: reason not pinned
    ),
    (
        "control character in a value",
        _request(b"GET /db/doc HTTP/1.1", f"X-Bad: {SECRET}\x01\r\n".encode()),
        None,  # aiohttp's C and Python parsers raise different classes: reason not pinned
    ),
    (
        "Content-Length with Transfer-Encoding",
        _request(
            b"POST /db/doc HTTP/1.1",
            f"X-Secret: {SECRET}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n".encode(),
        ),
        None,
    ),
    (
        "two Content-Length values",
        _request(b"POST /db/doc HTTP/1.1", b"Content-Length: 1\r\nContent-Length: 2\r\n"),
        None,
    ),
    ("bad method", _request(f"G{SECRET}(T /db/doc HTTP/1.1".encode()), None),
    (
        "not HTTP (TLS hello)",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET.encode(),
        None,
    ),
    ("bad version", _request(f"GET /db/{SECRET} HTTP/9.x".encode()), None),
    ("bare LF in request line", f"GET /db/{SECRET} HTTP/1.1\nHost: x\n\n".encode(), None),
]


@pytest.mark.parametrize(("message", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_parser_refusals_are_fixed_json(
    upstream: Upstream, message: bytes, reason: str | None
) -> None:
    config = base_config(free_port(), free_port(), upstream=upstream.url, databases={"db": {}})
    async with running_sidecar(config) as sidecar:
        for port in (sidecar.port, sidecar.admin_port):
            answer = await raw_exchange(port, message)
            assert answer.status == 400, answer.body[:200]
            assert SECRET.encode() not in answer.body
            assert answer.header("Content-Type") == ["application/json; charset=utf-8"]
            assert answer.header("X-Content-Type-Options") == ["nosniff"]
            assert answer.header("Cache-Control") == ["no-store"]
            body = json.loads(answer.body)
            assert body.keys() == {"error", "reason"} and body["error"] == "Bad Request"
            if reason is not None:
                assert body["reason"] == reason
    assert upstream.requests == []


async def test_cookie_bomb_does_not_return_the_real_session_cookie(upstream: Upstream) -> None:
    config = base_config(free_port(), free_port(), upstream=upstream.url, databases={"db": {}})
    async with running_sidecar(config) as sidecar:
        session_id = await admin_session(sidecar.admin_url, "db", "alice")
        padding = "; ".join(f"pad{i}={'x' * 1000}" for i in range(40))
        message = _request(
            b"GET /db/anything HTTP/1.1",
            f"Cookie: SyncGatewaySession={session_id}; {padding}\r\n".encode(),
        )
        answer = await raw_exchange(sidecar.port, message)
    assert answer.status == 400
    assert session_id.encode() not in answer.body and b"pad0" not in answer.body
    assert answer.json() == {
        "error": "Bad Request",
        "reason": "request line or header field too long",
    }


@pytest.mark.parametrize(
    ("status", "exc", "expected"),
    [
        (500, RuntimeError("boom with secret"), (500, "internal error")),
        (504, None, (504, "handler timed out")),
        (400, ValueError("not a parser error"), (500, "internal error")),
        (503, None, (500, "internal error")),
    ],
)
def test_other_refusals(status: int, exc: Exception | None, expected: tuple[int, str]) -> None:
    code, body = parse_error_answer(status, exc)
    assert (code, body["reason"]) == expected
    assert "secret" not in json.dumps(body)
