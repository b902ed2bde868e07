"""Authentication of the admin listener (`admin_auth`): HTTP Basic and/or a bearer secret,
401 JSON with a challenge for everything else, open paths for probes and Prometheus, the
credential never logged; `check-config` and `run` warn about an exposed unauthenticated one."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import raw_http
from support.redis_server import free_port
from support.sidecar import Upstream, base_config, running_sidecar, sidecar_process

from sidecar.admin_auth import exposure_warning, is_loopback
from sidecar.cli import main
from sidecar.config import ConfigError, parse_settings

USER, PASSWORD, TOKEN = "ops", "pa:ss wörd-Secret-1", "tok3n-Secret-2_abc.def~+/=="
PASSWORD_ENV = "SIDECAR_TEST_ADMIN_PASSWORD"
CHALLENGE = 'Basic realm="sidecar admin", Bearer realm="sidecar admin"'


def basic(user: str | bytes, password: str | bytes) -> str:
    raw = (user if isinstance(user, bytes) else user.encode()) + b":"
    raw += password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(raw).decode()


# --- configuration -------------------------------------------------------------------------------


def settings_with(auth: Any, **more: Any) -> Any:
    return parse_settings(
        {"upstream": "http://u", "databases": {"db": {}}, "admin_auth": auth} | more
    )


def test_admin_auth_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    auth = settings_with(
        {
            "username": USER,
            "password": {"env": PASSWORD_ENV},
            "bearer_token": {"file": str(token_file)},
        }
    ).admin_auth
    assert auth.password.get() == PASSWORD and auth.bearer_token.get() == TOKEN
    assert auth.open_paths == ("/_metrics", "/_health", "/_ready")
    assert PASSWORD not in repr(auth) and TOKEN not in repr(auth)
    closed = settings_with({"bearer_token": TOKEN, "open_paths": []}).admin_auth
    assert closed.open_paths == () and closed.username is None


ADMIN_AUTH_REFUSALS: dict[str, tuple[Any, list[str]]] = {
    "empty block": ({}, ["admin_auth: needs username and password, or bearer_token, or both"]),
    "username alone": ({"username": USER}, ["admin_auth.password: required when username is set"]),
    "password alone": (
        {"password": PASSWORD},
        ["admin_auth.username: required when password is set"],
    ),
    "colon in username": (
        {"username": "a:b", "password": "p"},
        ["admin_auth.username: must be non-empty, printable and without ':'"],
    ),
    "control in username": (
        {"username": "a\tb", "password": "p"},
        ["admin_auth.username: must be non-empty, printable and without ':'"],
    ),
    "empty password": (
        {"username": USER, "password": ""},
        ["admin_auth.password: must not be empty"],
    ),
    "bearer with a space": (
        {"bearer_token": "two words"},
        ["admin_auth.bearer_token: must be RFC 6750 token characters (A-Z a-z 0-9 -._~+/ then =)"],
    ),
    "unset env": (
        {"bearer_token": {"env": "SIDECAR_TEST_ADMIN_NEVER_SET"}},
        [
            "admin_auth.bearer_token: environment variable SIDECAR_TEST_ADMIN_NEVER_SET is not set or empty"
        ],
    ),
    "a path that is not a probe": (
        {"bearer_token": TOKEN, "open_paths": ["/db/_user/x"]},
        ["admin_auth.open_paths.0: must be '/_metrics', '/_health' or '/_ready'"],
    ),
    "unknown key": ({"bearer_token": TOKEN, "tokens": []}, ["admin_auth.tokens: unknown key"]),
}


@pytest.mark.parametrize("case", ADMIN_AUTH_REFUSALS, ids=list(ADMIN_AUTH_REFUSALS))
def test_admin_auth_config_refusals(case: str) -> None:
    auth, problems = ADMIN_AUTH_REFUSALS[case]
    with pytest.raises(ConfigError) as caught:
        settings_with(auth)
    assert caught.value.problems == problems
    assert "two words" not in str(caught.value)  # a refused secret is never echoed


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:4985", True),
        ("127.8.9.10:4985", True),
        ("[::1]:4985", True),
        ("localhost:4985", True),
        (":4985", False),
        ("0.0.0.0:4985", False),
        ("[::]:4985", False),
        ("10.0.0.5:4985", False),
        ("admin.internal:4985", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback
    settings = settings_with(None, admin_interface=listen)
    assert (exposure_warning(settings) is None) is loopback
    secured = settings_with({"bearer_token": TOKEN}, admin_interface=listen)
    assert exposure_warning(secured) is None


def write_config(tmp_path: Path, **overrides: Any) -> str:
    path = tmp_path / "sidecar.yaml"
    doc = {"upstream": "http://127.0.0.1:1", "databases": {"db": {}}} | overrides
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_check_config_warns_about_an_exposed_open_admin_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exposed = write_config(tmp_path, admin_interface=":4985")
    assert main(["check-config", exposed]) == 0
    out, err = capsys.readouterr()
    assert out == f"{exposed}: ok (1 database(s))\n"
    assert err == (
        "warning: admin_interface :4985 is not loopback and admin_auth is not set: "
        "anyone who reaches that port can create sessions for any user\n"
    )
    for overrides in ({}, {"admin_interface": ":4985", "admin_auth": {"bearer_token": TOKEN}}):
        assert main(["check-config", write_config(tmp_path, **overrides)]) == 0
        out, err = capsys.readouterr()
        assert err == "" and TOKEN not in out


def test_run_logs_the_warning(tmp_path: Path) -> None:
    import subprocess
    import sys

    from support.sidecar import ROOT

    path = write_config(tmp_path, admin_interface="0.0.0.0:4985", logging={"format": "json"})
    # --workers 0 is refused right after the start-up warnings: nothing listens on 0.0.0.0.
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", path, "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [e["level"] for e in events if "admin_auth is not set" in e["msg"]] == ["warning"]


# --- the listener --------------------------------------------------------------------------------


@pytest.fixture
async def guarded(upstream: Upstream) -> AsyncIterator[str]:
    """A sidecar whose admin listener takes Basic and Bearer; its admin URL."""
    port, admin_port = free_port(), free_port()
    config = base_config(
        port,
        admin_port,
        upstream=upstream.url,
        databases={"db": {}},
        admin_auth={"username": USER, "password": PASSWORD, "bearer_token": TOKEN},
    )
    async with running_sidecar(config) as sidecar:
        yield sidecar.admin_url


# Authorization header values (None: no header) → expected status and reason
AUTH_CASES: dict[str, tuple[list[str] | None, int, str]] = {
    "missing": (None, 401, "admin API: credentials required"),
    "empty": ([""], 401, "admin API: use Basic or Bearer credentials"),
    "wrong scheme": (["Digest " + "x" * 20], 401, "admin API: use Basic or Bearer credentials"),
    "scheme only": (["Basic"], 401, "admin API: malformed Basic credentials"),
    "malformed base64": (["Basic !!!notbase64"], 401, "admin API: malformed Basic credentials"),
    "missing padding": (["Basic b3BzOnA"], 401, "admin API: malformed Basic credentials"),
    "excess padding": (["Basic b3BzOnBh="], 401, "admin API: malformed Basic credentials"),
    "padding inside": (["Basic b3Bz=OnA="], 401, "admin API: malformed Basic credentials"),
    "base64url alphabet": (
        ["Basic " + base64.urlsafe_b64encode(b"ops:>>>?").decode()],
        401,
        "admin API: malformed Basic credentials",
    ),
    "no colon": (
        ["Basic " + base64.b64encode(b"opspassword").decode()],
        401,
        "admin API: malformed Basic credentials",
    ),
    "not UTF-8": ([basic(b"ops\xff", b"x")], 401, "admin API: malformed Basic credentials"),
    "empty user and password": ([basic("", "")], 401, "admin API: invalid credentials"),
    "wrong password": ([basic(USER, PASSWORD + "x")], 401, "admin API: invalid credentials"),
    "password prefix": ([basic(USER, PASSWORD[:-1])], 401, "admin API: invalid credentials"),
    "wrong user": ([basic("root", PASSWORD)], 401, "admin API: invalid credentials"),
    "user in other case": ([basic(USER.upper(), PASSWORD)], 401, "admin API: invalid credentials"),
    "the bearer token as Basic": ([basic(USER, TOKEN)], 401, "admin API: invalid credentials"),
    "two headers": (
        [basic(USER, PASSWORD), basic(USER, PASSWORD)],
        401,
        "admin API: more than one Authorization header",
    ),
    "wrong bearer": (["Bearer " + TOKEN[:-1]], 401, "admin API: invalid credentials"),
    "empty bearer": (["Bearer "], 401, "admin API: invalid credentials"),
    "the password as bearer": (["Bearer " + PASSWORD], 401, "admin API: invalid credentials"),
    "right Basic": ([basic(USER, PASSWORD)], 404, "missing"),
    "right Basic, NFD password": (
        [basic(USER, PASSWORD.replace("ö", "o\u0308"))],
        404,
        "missing",
    ),
    "scheme in lower case": (["basic " + basic(USER, PASSWORD).split()[1]], 404, "missing"),
    "right bearer": (["Bearer " + TOKEN], 404, "missing"),
    "right bearer, BEARER": (["BEARER " + TOKEN], 404, "missing"),
}


@pytest.mark.parametrize("case", AUTH_CASES, ids=list(AUTH_CASES))
async def test_admin_credentials(guarded: str, case: str) -> None:
    values, status, reason = AUTH_CASES[case]
    port = int(guarded.rpartition(":")[2])
    headers = [("Authorization", v) for v in values or ()]
    answer = await raw_http(port, "/db/_user/nobody", headers=headers)
    assert (answer.status, answer.json()["reason"]) == (status, reason)
    if status == 401:
        assert answer.header("WWW-Authenticate") == [CHALLENGE]
        assert answer.json()["error"] == "Unauthorized"
        assert answer.header("Content-Type")[0].startswith("application/json")


async def test_open_paths_and_every_other_route(guarded: str) -> None:
    right = {"Authorization": basic(USER, PASSWORD)}
    async with aiohttp.ClientSession() as http:
        for path in ("/_health", "/_ready", "/_metrics"):
            async with http.get(guarded + path) as response:
                assert response.status == 200, path
        for method, path in (
            ("GET", "/db/_user/x"),
            ("PUT", "/db/_user/x"),
            ("DELETE", "/db/_user/x"),
            ("DELETE", "/db/_user/x/_session"),
            ("POST", "/db/_session"),
            ("GET", "/db/_session/x"),
            ("DELETE", "/db/_session/x"),
            ("GET", "/nowhere"),  # the catch-all too: no path enumeration without credentials
            ("GET", "/_metrics/"),
        ):
            async with http.request(method, guarded + path, json={"name": "x"}) as response:
                assert response.status == 401, (method, path)
        async with http.put(guarded + "/db/_user/x", json={}, headers=right) as response:
            assert response.status == 201
        async with http.post(guarded + "/db/_session", json={"name": "x"}, headers=right) as r:
            assert r.status == 200


async def test_closed_open_paths_and_basic_only(upstream: Upstream) -> None:
    port, admin_port = free_port(), free_port()
    auth = {"username": USER, "password": PASSWORD, "open_paths": ["/_health"]}
    config = base_config(
        port, admin_port, upstream=upstream.url, databases={"db": {}}, admin_auth=auth
    )
    async with running_sidecar(config) as sidecar, aiohttp.ClientSession() as http:
        async with http.get(sidecar.admin_url + "/_health") as response:
            assert response.status == 200
        for path in ("/_ready", "/_metrics"):
            async with http.get(sidecar.admin_url + path) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == 'Basic realm="sidecar admin"'
            async with http.get(
                sidecar.admin_url + path, headers={"Authorization": basic(USER, PASSWORD)}
            ) as response:
                assert response.status == 200
        bearer = {"Authorization": "Bearer " + TOKEN}
        async with http.get(sidecar.admin_url + "/_metrics", headers=bearer) as response:
            assert response.status == 401
            assert (await response.json())["reason"] == "admin API: use Basic credentials"


async def test_credentials_never_reach_the_log(upstream: Upstream) -> None:
    """`sidecar run` at debug level, JSON logs: refused, accepted and oversized credentials."""
    port, admin_port = free_port(), free_port()
    config = base_config(
        port,
        admin_port,
        upstream=upstream.url,
        databases={"db": {}},
        admin_auth={"username": USER, "password": PASSWORD, "bearer_token": TOKEN},
        logging={"format": "json", "level": "debug"},
    )
    wrong = PASSWORD + "-wrong-guess"
    manager = sidecar_process(config)
    proc = await asyncio.to_thread(manager.__enter__)  # its readiness wait blocks
    try:
        for value in (
            basic(USER, PASSWORD),
            basic(USER, wrong),
            "Bearer " + TOKEN,
            "Bearer " + wrong,
            "Basic " + "A" * 20,
            "Bearer " + TOKEN + "x" * 30_000,  # refused by the HTTP parser, which quotes headers
        ):
            await raw_http(admin_port, "/db/_user/x", headers=[("Authorization", value)])
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)
        assert proc.stderr is not None
        logs = proc.stderr.read().decode()
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
    assert '"status": 401' in logs.replace('"status":401', '"status": 401')
    for secret in (PASSWORD, TOKEN, wrong, basic(USER, PASSWORD).split()[1], "A" * 20):
        assert secret not in logs
    assert "admin_auth is not set" not in logs
