"""Run the real sidecar (in-process apps on real sockets, or the `sidecar` CLI as a process),
and a real upstream that records what reached it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import WSMsgType, web

from sidecar import keys
from sidecar.app import create_admin_app, create_app, make_runner
from sidecar.config import parse_settings
from support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """A real HTTP + websocket server on 127.0.0.1 standing in for the sync service."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    websockets: list[web.WebSocketResponse] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": list(request.headers.items()),
        }
        self.requests.append(record)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self.websockets.append(ws)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            return ws
        body = await request.read()
        return web.json_response({"ok": True, "path": request.raw_path, "bytes": len(body)})

    def header(self, index: int, name: str) -> list[str]:
        return [v for k, v in self.requests[index]["headers"] if k.lower() == name.lower()]


@asynccontextmanager
async def serving_app(
    app: web.Application, port: int | None = None, *, shutdown_timeout: float = 60.0
) -> AsyncIterator[str]:
    """`app` served on 127.0.0.1 (`port`, else a free one) until the block ends; its URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_upstream() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    async with serving_app(app) as upstream.url:
        yield upstream


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """`handler` answering every method and path on a free 127.0.0.1 port; yields the URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving_app(app, shutdown_timeout=0.1) as url:
        yield url


@dataclass
class Sidecar:
    url: str
    admin_url: str
    app: web.Application
    port: int
    admin_port: int


@dataclass(frozen=True)
class Replica:
    """The addresses of one `sidecar run` process among several sharing one store."""

    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def callback(self, db: str) -> str:
        return f"{self.url}/{db}/_oidc_callback"


def base_config(port: int, admin_port: int, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "interface": f"127.0.0.1:{port}",
        "admin_interface": f"127.0.0.1:{admin_port}",
        "logging": {"format": "text", "level": "warning"},
    }
    config.update(overrides)
    return config


@asynccontextmanager
async def running_sidecar(config: dict[str, Any]) -> AsyncIterator[Sidecar]:
    """The sidecar's own apps, started as `sidecar run` starts them, on the config's ports."""
    settings = parse_settings(config)
    app = create_app(settings)
    admin = create_admin_app(app)
    runner = make_runner(app, shutdown_timeout=1)
    admin_runner = make_runner(admin, shutdown_timeout=1)
    await runner.setup()
    await admin_runner.setup()
    port = int(settings.interface.rpartition(":")[2])
    admin_port = int(settings.admin_interface.rpartition(":")[2])
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await web.TCPSite(admin_runner, "127.0.0.1", admin_port).start()
    app[keys.LIFECYCLE].listening.set()  # as `sidecar run` does
    try:
        yield Sidecar(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", app, port, admin_port
        )
    finally:
        await admin_runner.cleanup()
        await runner.cleanup()


@contextmanager
def sidecar_process(
    config: dict[str, Any], *, workers: int = 1, args: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """`sidecar run` as a real process (`args` added to its command line); waits until its
    readiness endpoint answers."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
        path = f.name
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", path, "--workers", str(workers)]
    cmd += args
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, start_new_session=True)
    try:
        admin = config["admin_interface"]
        wait_ready(f"http://{admin}/_health", proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        os.unlink(path)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    async def probe() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"sidecar exited with {proc.returncode}: {err[-2000:]}")
        if asyncio.run(probe()):
            return
        time.sleep(0.1)
    raise RuntimeError(f"sidecar not ready at {url} after {timeout}s")


def dumps(value: Any) -> str:
    return json.dumps(value)
