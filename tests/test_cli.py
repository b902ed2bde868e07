"""The `sidecar` command: check-config on good and broken files (every problem, with its YAML
path, exit 2), and `sidecar run` as a real process: serving, draining on SIGTERM, workers."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType, web
from conftest import admin_session, raw_http
from support.redis_server import RedisServer, free_port
from support.sidecar import ROOT, Upstream, base_config, serving, sidecar_process

from sidecar import __version__
from sidecar.cli import main, split_listen

COOKIE = "SyncGatewaySession"
SECRET_ENV = "SIDECAR_TEST_CLI_SECRET"
UNSET_ENV = "SIDECAR_TEST_CLI_NEVER_SET"

GOOD = """\
interface: "127.0.0.1:4984"
upstream: http://127.0.0.1:4986
databases:
  db:
    oidc:
      providers:
        google:
          issuer: https://accounts.google.com
          client_id: sync-gateway
          validation_key: {env: SIDECAR_TEST_CLI_SECRET}
          register: true
  other:
    upstream: http://127.0.0.1:5984
    session_cookie_name: OtherSession
"""

PROVIDER = "databases.db.oidc.providers.op"


def provider_yaml(**fields: Any) -> str:
    block = {"issuer": "https://op.example.com", "client_id": "c", **fields}
    doc = {
        "upstream": "http://u.example",
        "databases": {"db": {"oidc": {"providers": {"op": block}}}},
    }
    return yaml.safe_dump(doc)


# (id, YAML text, lines expected on stderr: each starts with the YAML path of the problem)
BROKEN: list[tuple[str, str, list[str]]] = [
    ("unknown-top-level-key", GOOD + "intreface: ':4984'\n", ["intreface: unknown key"]),
    ("unknown-provider-key", provider_yaml(regster=True), [f"{PROVIDER}.regster: unknown key"]),
    ("unknown-nested-key", GOOD + "session:\n  tll: 60\n", ["session.tll: unknown key"]),
    ("bad-upstream-url", "upstream: ftp://x\ndatabases: {db: {}}\n", ["upstream: "]),
    ("upstream-without-host", "upstream: 'http://'\ndatabases: {db: {}}\n", ["upstream: "]),
    ("bad-db-upstream", "databases: {db: {upstream: 'not a url'}}\n", ["databases.db.upstream: "]),
    ("bad-issuer", provider_yaml(issuer="accounts.google.com"), [f"{PROVIDER}.issuer: "]),
    (
        "bad-discovery-url",
        provider_yaml(discovery_url="file:///etc/passwd"),
        [f"{PROVIDER}.discovery_url: "],
    ),
    ("missing-client-id", provider_yaml(client_id=None), [f"{PROVIDER}.client_id: "]),
    (
        "secret-from-missing-env",
        provider_yaml(validation_key={"env": UNSET_ENV}),
        [f"{PROVIDER}.validation_key: environment variable {UNSET_ENV} is not set or empty"],
    ),
    (
        "secret-from-missing-file",
        provider_yaml(validation_key={"file": "/nonexistent/secret"}),
        [f"{PROVIDER}.validation_key: cannot read secret file /nonexistent/secret"],
    ),
    (
        "secret-empty",
        provider_yaml(validation_key=""),
        [f"{PROVIDER}.validation_key: must not be empty"],
    ),
    (
        "secret-bad-shape",
        provider_yaml(validation_key={"vault": "x"}),
        [f"{PROVIDER}.validation_key: must be"],
    ),
    (
        "provider-name-with-underscore",
        "upstream: http://u\ndatabases: {db: {oidc: {providers: {my_op: {issuer: 'http://o', client_id: c}}}}}\n",
        ["databases.db.oidc.providers.my_op: provider names may contain only"],
    ),
    (
        "default-provider-unknown",
        "upstream: http://u\ndatabases: {db: {oidc: {default_provider: nope, providers: {op: {issuer: 'http://o', client_id: c}}}}}\n",
        ["databases.db.oidc.default_provider: 'nope' is not in providers"],
    ),
    (
        "no-providers",
        "upstream: http://u\ndatabases: {db: {oidc: {providers: {}}}}\n",
        ["databases.db.oidc.providers: "],
    ),
    (
        "unsigned-tokens",
        provider_yaml(allow_unsigned_provider_tokens=True),
        [f"{PROVIDER}.allow_unsigned_provider_tokens: "],
    ),
    (
        "hmac-algorithm",
        provider_yaml(allowed_algorithms=["HS256"]),
        [f"{PROVIDER}.allowed_algorithms: "],
    ),
    (
        "database-name-uppercase",
        "upstream: http://u\ndatabases: {Db: {}}\n",
        ["databases.Db: database name"],
    ),
    ("no-databases", "upstream: http://u\ndatabases: {}\n", ["databases: "]),
    ("no-upstream", "databases: {db: {}}\n", ["upstream: required"]),
    (
        "bad-interface",
        GOOD + "admin_interface: '4985'\n",
        ["admin_interface: must be host:port or :port"],
    ),
    (
        "port-out-of-range",
        GOOD.replace("4984", "65536"),
        ["interface: port must be between 1 and 65535"],
    ),
    (
        "session-store-not-redis",
        GOOD + "session_store: http://r\n",
        ["session_store: must be a Redis URL"],
    ),
    (
        "bad-trusted-proxy",
        GOOD + "trusted_proxies: [10.0.0.0/33]\n",
        ["trusted_proxies: '10.0.0.0/33'"],
    ),
    (
        "bad-cookie-name",
        GOOD.replace("OtherSession", "'Other Session'"),
        ["databases.other.session_cookie_name: "],
    ),
    ("ttl-too-short", GOOD + "session: {ttl: 5}\n", ["session.ttl: "]),
    ("log-level", GOOD + "logging: {level: trace}\n", ["logging.level: "]),
    ("not-a-mapping", "- a\n- b\n", ["(top level): must be a mapping"]),
    ("empty-file", "", ["(top level): must be a mapping"]),
    ("yaml-syntax", "databases: [\n", [":2:1: not valid YAML"]),
    (
        "duplicate-key",
        "upstream: http://a\ndatabases: {db: {}}\nupstream: http://b\n",
        [":3:1: not valid YAML: duplicate key 'upstream'"],
    ),
    (
        "register-by-attribute-name",
        "upstream: http://a\ndatabases:\n  db:\n    oidc:\n      providers:\n        p: {issuer: 'http://x', client_id: c, register_user: true}\n",
        ["databases.db.oidc.providers.p.register_user: unknown key"],
    ),
    (
        "every-problem-at-once",
        "upstream: ftp://x\nintreface: 1\ndatabases:\n  Db: {}\n  db:\n    oidc:\n      default_provider: x\n"
        "      providers:\n        my_op: {issuer: nope, client_id: c, validation_key: {env: "
        + UNSET_ENV
        + "}}\n",
        [
            "upstream: ",
            "intreface: unknown key",
            "databases.Db: database name",
            "databases.db.oidc.providers.my_op.issuer: ",
            f"databases.db.oidc.providers.my_op.validation_key: environment variable {UNSET_ENV}",
            "databases.db.oidc.providers.my_op: provider names",
            "databases.db.oidc.default_provider: 'x' is not in providers",
        ],
    ),
]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "s3cret-value")
    monkeypatch.delenv(UNSET_ENV, raising=False)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return str(path)


def test_check_config_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{path}: ok (2 database(s))\n", "")
    assert "s3cret-value" not in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in BROKEN],
)
def test_check_config_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: list[str]
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    problems = [
        line.removeprefix("config error: ")
        for line in err.splitlines()
        if line.startswith("config error: ")
    ]
    for start in expected:
        assert any(
            p.startswith(start)
            or p.startswith(f"{path}: {start}")
            or p.startswith(f"{path}{start}")
            for p in problems
        ), (
            start,
            problems,
        )
    if len(expected) > 1:  # validation collected them all; none hides another
        assert len(problems) >= len(expected)


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.yaml")
    assert main(["check-config", path]) == 2
    assert (
        capsys.readouterr().err == f"config error: {path}: cannot read: No such file or directory\n"
    )


def test_secrets_never_reach_the_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        provider_yaml(validation_key="inline-secret-value", client_id="")
        + "session_store: http://user:pw-secret@r\n"
    )
    assert main(["check-config", write(tmp_path, text)]) == 2
    out, err = capsys.readouterr()
    assert "inline-secret-value" not in out + err
    assert "pw-secret" not in out + err


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_command_exits_with_the_codes(tmp_path: Path) -> None:
    good = run_cli("check-config", write(tmp_path, GOOD))
    assert (good.returncode, good.stderr) == (0, "")
    bad = tmp_path / "bad.yaml"
    bad.write_text("databases: {db: {}}\nbogus: 1\n")
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert "config error: bogus: unknown key" in result.stderr
    assert "config error: upstream: required" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":4984", (None, 4984)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("0.0.0.0:4984", ("0.0.0.0", 4984)),
        ("[::1]:4985", ("::1", 4985)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_split_listen(value: str, expected: tuple[str | None, int]) -> None:
    assert split_listen(value) == expected


# --------------------------------------------------------------------------- `sidecar run`


@asynccontextmanager
async def process(config: dict[str, Any], *, workers: int = 1) -> Any:
    """`sidecar run` as a process, entered off the event loop (its readiness wait is blocking)."""
    manager: AbstractContextManager[subprocess.Popen[bytes]] = sidecar_process(
        config, workers=workers
    )
    proc = await asyncio.to_thread(manager.__enter__)
    try:
        yield proc
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


@asynccontextmanager
async def slow_upstream(arrived: asyncio.Event) -> Any:
    """Answers after 1.5 s; `arrived` is set when a request reaches it."""

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(1.5)
        return web.json_response({"slow": True})

    async with serving(slow) as url:
        yield url


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


async def test_run_serves_then_drains_on_sigterm(upstream: Upstream) -> None:
    arrived = asyncio.Event()
    async with slow_upstream(arrived) as slow:
        port, admin_port = free_port(), free_port()
        config = base_config(
            port,
            admin_port,
            upstream=upstream.url,
            databases={"db": {}, "slow": {"upstream": slow}},
            shutdown_grace_seconds=5,
            logging={"format": "json", "level": "info"},
        )
        async with process(config) as proc:
            base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
            session = await admin_session(admin, "db", "carol")
            slow_session = await admin_session(admin, "slow", "carol")
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    base + "/db/doc", headers={"Cookie": f"{COOKIE}={session}"}
                ) as r:
                    assert r.status == 200
                    assert (await r.json())["path"] == "/db/doc"
                ws = await http.ws_connect(
                    base + "/db/_ws", headers={"Cookie": f"{COOKIE}={session}"}
                )
                in_flight = asyncio.ensure_future(
                    raw_http(port, "/slow/doc", headers=[("Cookie", f"{COOKIE}={slow_session}")])
                )
                await asyncio.wait_for(arrived.wait(), 5)  # in flight at the upstream now

                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                msg = await ws.receive(timeout=5)
                assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)  # going away
                await ws.close()
                async with http.get(admin + "/_ready") as r:  # draining, until the end
                    assert r.status == 503
                    assert (await r.json())["draining"] is True
                with pytest.raises(aiohttp.ClientConnectionError):  # no new connections
                    async with http.get(base + "/_health"):
                        pass
                answer = await in_flight  # the in-flight request finished inside the grace
                assert answer.status == 200
                assert answer.json() == {"slow": True}
            assert await wait_exit(proc, 10) == 0
            assert time.monotonic() - started < 5
            assert proc.stderr is not None
            logs = proc.stderr.read().decode()
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert [e["msg"] for e in events if e["logger"] == "sidecar"][-2:] == [
        "shutting down",
        "stopped",
    ]


async def test_malformed_requests_never_log_their_bytes(upstream: Upstream) -> None:
    """An oversized Cookie header is refused by aiohttp's parser, whose error message quotes
    the header's start: the session id must not end up in the log."""
    port, admin_port = free_port(), free_port()
    config = base_config(
        port,
        admin_port,
        upstream=upstream.url,
        databases={"db": {}},
        logging={"format": "json", "level": "debug"},
    )
    async with process(config) as proc:
        session = await admin_session(f"http://127.0.0.1:{admin_port}", "db", "carol")
        cookie = f"{COOKIE}={session}; filler={'x' * 30_000}"
        answer = await raw_http(port, "/db/doc", headers=[("Cookie", cookie)])
        assert answer.status == 400
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0
        assert proc.stderr is not None
        logs = proc.stderr.read().decode()
    assert session not in logs
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    rejected = [e for e in events if e["msg"] == "malformed request rejected"]
    assert len(rejected) == 1
    assert rejected[0]["status"] == 400
    assert upstream.requests == []


def test_workers_need_a_shared_store(tmp_path: Path) -> None:
    result = run_cli("run", "--config", write(tmp_path, GOOD), "--workers", "2")
    assert result.returncode == 2
    assert "--workers > 1 needs session_store" in result.stderr


# --------------------------------------------------------------------------- for people


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"sidecar {__version__}\n", "")


def test_bare_command_prints_the_help() -> None:
    """No command is a usage error (exit 2, as argparse's others), answered with the help on
    stdout rather than a one-line complaint."""
    result = run_cli()
    assert result.returncode == 2
    assert result.stdout.startswith("usage: sidecar")
    assert "run" in result.stdout and "check-config" in result.stdout
    assert "examples:" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--help",), ["OpenID Connect", "run", "check-config", "examples:", "exit codes:"]),
        (
            ("run", "--help"),
            ["--config FILE", "--workers N", "--restart-limit", "drain", "crash loop"],
        ),
        (("check-config", "--help"), ["FILE", "YAML path"]),
    ],
)
def test_help_is_written_for_people(args: tuple[str, ...], words: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0
    for word in words:
        assert word in result.stdout, word


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("listener", ["interface", "admin_interface"])
def test_port_in_use_is_one_clear_line(
    tmp_path: Path, redis_server_session: RedisServer, workers: int, listener: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = (port, free_port()) if listener == "interface" else (free_port(), port)
        config = base_config(
            *ports,
            upstream="http://127.0.0.1:9",
            session_store=redis_server_session.url,
            databases={"db": {}},
        )
        path = write(tmp_path, yaml.safe_dump(config))
        result = run_cli("run", "--config", path, "--workers", str(workers))
    assert result.returncode == 3
    line = f"sidecar: cannot listen on 127.0.0.1:{port}: address already in use"
    assert result.stderr.splitlines() == [line]  # workers: the supervisor says it, once
