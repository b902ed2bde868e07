"""SIGTERM on a real `sidecar run` process: drain in-flight requests, 1001 to websockets, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType, web
from support.redis_server import free_port
from support.sidecar import ROOT, base_config, serving


class SlowUpstream:
    """Answers /db/slow after a delay, echoes websockets: enough to watch a drain."""

    def __init__(self) -> None:
        self.url = ""
        self.started = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
            return ws
        if request.path.endswith("/slow"):
            self.started.set()
            await asyncio.sleep(1.5)
        return web.json_response({"ok": True})


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    upstream = SlowUpstream()
    async with serving(upstream.handle) as url:
        upstream.url = url
        yield upstream


async def start_process(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", f.name]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                async with http.get(f"http://{config['admin_interface']}/_health") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError("sidecar did not start")


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("sidecar did not exit within the grace")
    return proc.returncode


async def test_sigterm_drains_requests_and_closes_websockets(slow_upstream: SlowUpstream) -> None:
    port, admin = free_port(), free_port()
    config = base_config(
        port,
        admin,
        upstream=slow_upstream.url,
        shutdown_grace_seconds=5,
        databases={"db": {}},
    )
    proc = await start_process(config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.put(f"http://127.0.0.1:{admin}/db/_user/ann", json={}) as r:
                assert r.status == 201
            async with http.post(
                f"http://127.0.0.1:{admin}/db/_session", json={"name": "ann"}
            ) as r:
                sid = (await r.json())["session_id"]
            cookie = {"Cookie": f"SyncGatewaySession={sid}"}
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}/db/ws", headers=cookie)
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "hi"

            in_flight = asyncio.ensure_future(
                http.get(f"http://127.0.0.1:{port}/db/slow", headers=cookie)
            )
            await asyncio.wait_for(slow_upstream.started.wait(), 5)
            proc.send_signal(signal.SIGTERM)

            closing = await ws.receive(timeout=5)
            assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
            assert ws.close_code == 1001
            response = await asyncio.wait_for(in_flight, 5)
            assert response.status == 200  # the in-flight request finished
            response.release()

            # New connections are refused once draining.
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(f"http://127.0.0.1:{port}/db/x", headers=cookie):
                        pass
        assert await wait_exit(proc, 8) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


async def test_config_error_exits_nonzero_naming_the_yaml_path(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "databases:\n  db:\n    oidc:\n      providers:\n        g:\n          issuer: nope\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "databases.db.oidc.providers.g.issuer" in err
    assert "databases.db.oidc.providers.g.client_id: required" in err
    assert "upstream: required" in err
