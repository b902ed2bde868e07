"""Logs and metrics of the real sidecar: one JSON line per request, request ids, Prometheus names."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from support.redis_server import free_port
from support.sidecar import Sidecar, Upstream, base_config, running_sidecar

from sidecar.observability import JsonFormatter, TextFormatter
from sidecar.observe import logged_path


def config(upstream: Upstream) -> dict[str, Any]:
    port = free_port()
    return base_config(
        port,
        free_port(),
        upstream=upstream.url,
        unsupported={"oidc_test_provider": {"enabled": True}},
        databases={
            "db": {
                "oidc": {
                    "providers": {
                        "test": {
                            "issuer": f"http://127.0.0.1:{port}/db/_oidc_testing",
                            "client_id": "sync_gateway",
                            "validation_key": "secret",
                            "register": True,
                        }
                    }
                }
            }
        },
    )


@pytest.fixture
async def sidecar(upstream: Upstream) -> AsyncIterator[Sidecar]:
    async with running_sidecar(config(upstream)) as running:
        yield running


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The sidecar's log lines as its JSON formatter writes them."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sidecar")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


async def session_cookie(sidecar: Sidecar, http: aiohttp.ClientSession, name: str) -> str:
    async with http.put(f"{sidecar.admin_url}/db/_user/{name}", json={}) as r:
        assert r.status in (200, 201)
    async with http.post(f"{sidecar.admin_url}/db/_session", json={"name": name}) as r:
        assert r.status == 200
        session_id: str = (await r.json())["session_id"]
        return session_id


async def test_one_json_line_per_request_without_secrets(
    sidecar: Sidecar, upstream: Upstream, json_log: io.StringIO
) -> None:
    async with aiohttp.ClientSession() as http:
        sid = await session_cookie(sidecar, http, "alice")
        url = f"{sidecar.url}/db/doc?code=SECRETCODE&refresh_token=SECRETRT"
        async with http.get(url, headers={"Cookie": f"SyncGatewaySession={sid}"}) as r:
            assert r.status == 200
    entries = [e for e in lines(json_log) if e.get("logger") == "sidecar.access"]
    proxied = [e for e in entries if e.get("db") == "db" and e.get("path") == "/db/doc"]
    assert len(proxied) == 1
    entry = proxied[0]
    assert entry["method"] == "GET"
    assert entry["status"] == 200
    assert entry["user"] == "alice"
    assert isinstance(entry["duration_ms"], float)
    assert len(entry["request_id"]) >= 8
    text = json_log.getvalue()
    for secret in (sid, "SECRETCODE", "SECRETRT"):
        assert secret not in text


async def test_request_id_is_kept_or_made_and_passed_upstream(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as http:
        sid = await session_cookie(sidecar, http, "bob")
        cookie = {"Cookie": f"SyncGatewaySession={sid}"}
        async with http.get(
            f"{sidecar.url}/db/a", headers=cookie | {"X-Request-ID": "abc-123"}
        ) as r:
            assert r.headers["X-Request-ID"] == "abc-123"
        async with http.get(
            f"{sidecar.url}/db/b", headers=cookie | {"X-Request-ID": "bad\tid"}
        ) as r:
            made = r.headers["X-Request-ID"]
            assert made != "bad\tid" and len(made) == 16
        async with http.get(f"{sidecar.url}/db/c") as r:  # rejected requests get one too
            assert r.status == 401
            assert r.headers["X-Request-ID"]
    assert upstream.header(0, "X-Request-ID") == ["abc-123"]
    assert upstream.header(1, "X-Request-ID") == [made]
    assert len(upstream.requests) == 2


async def test_metrics_on_admin_port_only(sidecar: Sidecar, upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as http:
        sid = await session_cookie(sidecar, http, "carol")
        async with http.get(f"{sidecar.url}/db/x", headers={"Cookie": f"SyncGatewaySession={sid}"}):
            pass
        async with http.get(f"{sidecar.url}/db/x", headers={"Authorization": "Bearer a.b.c"}) as r:
            assert r.status == 401
        async with http.get(f"{sidecar.url}/_metrics") as r:
            assert r.status == 401 or r.status == 404  # never the metrics on the public port
            assert "sidecar_requests_total" not in await r.text()
        async with http.get(f"{sidecar.admin_url}/_metrics") as r:
            assert r.status == 200
            body = await r.text()
    for name in (
        "sidecar_requests_total",
        "sidecar_request_duration_seconds_bucket",
        "sidecar_provider_request_duration_seconds",
        "sidecar_logins_total",
        "sidecar_token_validation_failures_total",
        "sidecar_jwks_refreshes_total",
        "sidecar_session_store_errors_total",
        "sidecar_open_websockets",
        "sidecar_sessions_created_total",
    ):
        assert name in body, name
    assert 'sidecar_requests_total{db="db",outcome="ok",status="200"}' in body
    assert 'sidecar_requests_total{db="db",outcome="rejected",status="401"}' in body
    assert 'sidecar_sessions_created_total{via="admin"} 1.0' in body


async def test_health_reveals_nothing_sensitive(sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as http:
        for url in (f"{sidecar.url}/_ready", f"{sidecar.admin_url}/_ready"):
            async with http.get(url) as r:
                body = await r.json()
                assert set(body) == {"ready", "session_store", "providers", "draining"}
                assert "secret" not in json.dumps(body)
        async with http.get(f"{sidecar.url}/_health") as r:
            assert r.status == 200


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_formatters_carry_extra_fields(formatter: logging.Formatter) -> None:
    record = logging.LogRecord("sidecar.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.user = "alice"
    out = formatter.format(record)
    assert "hello you" in out and "alice" in out


@pytest.mark.parametrize(
    ("seconds", "first_bucket"),
    [(0.0001, "0.0005"), (0.0005, "0.0005"), (0.00051, "0.001"), (30.0, "30.0"), (31.0, "+Inf")],
)
def test_request_histogram_buckets_are_less_or_equal(seconds: float, first_bucket: str) -> None:
    from prometheus_client import generate_latest

    from sidecar.observability import Metrics

    metrics = Metrics()
    metrics.request("db", "ok", 200, seconds)
    lines = generate_latest(metrics.registry).decode().splitlines()
    filled = [
        line.split('le="')[1].split('"')[0]
        for line in lines
        if line.startswith("sidecar_request_duration_seconds_bucket") and line.endswith(" 1.0")
    ]
    assert filled[0] == first_bucket
    assert 'sidecar_requests_total{db="db",outcome="ok",status="200"} 1.0' in lines


async def test_error_answers_are_never_sniffed_or_cached(sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{sidecar.url}/db/_oidc_callback?error=x&error_description=%3Cscript%3E"
        async with http.get(url) as r:
            assert r.status == 401
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Cache-Control"] == "no-store"
            assert r.content_type == "application/json"


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/db/doc", "/db/doc"),
        ("/db/_session", "/db/_session"),
        ("/db/_session/abc", "/db/_session/<sha256:ba7816bf8f01>"),
        ("/db/_user/bob/_session/abc", "/db/_user/bob/_session/<sha256:ba7816bf8f01>"),
        ("/db/_session/abc/x", "/db/_session/<sha256:ba7816bf8f01>/x"),
        ("/db/_session/\udcff", "/db/_session/<sha256:a8100ae6aa19>"),
    ],
)
def test_session_ids_in_paths_are_redacted(path: str, logged: str) -> None:
    assert logged_path(path) == logged


async def test_admin_access_log_redacts_session_ids(
    sidecar: Sidecar, json_log: io.StringIO
) -> None:
    async with aiohttp.ClientSession() as http:
        sid = await session_cookie(sidecar, http, "dora")
        async with http.get(f"{sidecar.admin_url}/db/_session/{sid}") as r:
            assert r.status == 200
        async with http.delete(f"{sidecar.admin_url}/db/_session/{sid}") as r:
            assert r.status == 200
    admin = [e for e in lines(json_log) if e.get("listener") == "admin"]
    paths = [e["path"] for e in admin if "/_session/" in e.get("path", "")]
    assert len(paths) == 2 and all(p.startswith("/db/_session/<sha256:") for p in paths)
    assert sid not in json_log.getvalue()


@pytest.mark.parametrize(
    ("headers", "content_type"),
    [
        ({"Sec-Fetch-Mode": "navigate"}, "text/html"),
        ({"Accept": "text/html"}, "application/json"),  # a POST without Sec-Fetch-Mode
        ({}, "application/json"),
    ],
)
async def test_aiohttps_own_errors_are_pages_for_browsers(
    sidecar: Sidecar, headers: dict[str, str], content_type: str
) -> None:
    """aiohttp's own HTTP errors (here 413, reading a form past client_max_size) get the
    sidecar's answers: the error page for a browser's page load, JSON for everyone else."""
    async with aiohttp.ClientSession() as http:
        body = b"csrf=" + b"a" * (1024**2 + 1)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        async with http.post(
            f"{sidecar.url}/db/_oidc_logout",
            data=io.BytesIO(body),
            headers=headers | form | {"Cookie": "SyncGatewaySession=" + "x" * 43},
        ) as r:
            assert r.status == 413
            assert r.content_type == content_type
            text = await r.text()
            assert "Request Entity Too Large" in text
            assert r.headers["Cache-Control"] == "no-store"
