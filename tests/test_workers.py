"""`sidecar run --workers N` as real processes: one port for all, a killed worker restarted
while the others serve, a crash loop stopping the set, /_metrics counting every worker's
requests, SIGTERM draining every worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from conftest import admin_session, raw_http
from support.redis_server import RedisServer, free_port
from support.sidecar import Upstream, base_config, serving, sidecar_process

from sidecar.supervisor import RestartPolicy

COOKIE = "SyncGatewaySession"


@asynccontextmanager
async def process(config: dict[str, Any], *, workers: int, args: tuple[str, ...] = ()) -> Any:
    """`sidecar run` as a process, entered off the event loop (its readiness wait is blocking)."""
    manager: AbstractContextManager[subprocess.Popen[bytes]] = sidecar_process(
        config, workers=workers, args=args
    )
    proc = await asyncio.to_thread(manager.__enter__)
    try:
        yield proc
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


def config_for(upstream_url: str, redis: RedisServer, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"upstream": upstream_url, "session_store": redis.url}
    fields["databases"] = {"workers": {}}
    return base_config(free_port(), free_port(), **(fields | overrides))


def ports(config: dict[str, Any]) -> tuple[int, int]:
    return (
        int(config["interface"].rpartition(":")[2]),
        int(config["admin_interface"].rpartition(":")[2]),
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def workers_of(pid: int) -> list[int]:
    """The live worker processes of supervisor `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split() if not gone(int(p))]
    except OSError:
        return []


def listening(pid: int, port: int) -> bool:
    """Does process `pid` hold a socket listening on 127.0.0.1:`port`? (/proc, Linux)"""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and local == f"0100007F:{port:04X}" and inode in inodes:
            return True
    return False


async def serving_workers(supervisor: int, count: int, *ports: int) -> list[int]:
    """Waits until `count` workers are alive and each listens on every port; returns them."""
    async with asyncio.timeout(20):
        while True:
            pids = workers_of(supervisor)
            if len(pids) == count and all(listening(p, port) for p in pids for port in ports):
                return pids
            await asyncio.sleep(0.05)


async def kill(worker: int) -> None:
    """SIGKILL, then wait until the supervisor reaped it. Not only a zombie: a thread group's
    leader is one while its other threads still hold the listening socket, and a connection
    the kernel hands that socket is reset when it closes (README: net.ipv4.tcp_migrate_req)."""
    os.kill(worker, signal.SIGKILL)
    async with asyncio.timeout(5):
        while Path(f"/proc/{worker}").exists():
            await asyncio.sleep(0.02)


async def get_all(port: int, cookie: str, count: int) -> list[int]:
    """`count` requests, each on a fresh connection (any worker may take it); their statuses."""
    statuses = []
    for _ in range(count):
        answer = await raw_http(port, "/workers/doc", headers=[("Cookie", f"{COOKIE}={cookie}")])
        statuses.append(answer.status)
    return statuses


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    return proc.stderr.read().decode()


@pytest.mark.parametrize(
    ("recent_deaths", "delay"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, None), (9, None)],
)
def test_restart_policy(recent_deaths: int, delay: float | None) -> None:
    assert RestartPolicy().decide(recent_deaths) == delay


def test_restart_delay_is_capped() -> None:
    assert RestartPolicy(limit=100, max_delay=10).decide(50) == 10


async def test_workers_share_one_port(
    upstream: Upstream, redis_server_session: RedisServer
) -> None:
    config = config_for(upstream.url, redis_server_session)
    port, admin_port = ports(config)
    async with process(config, workers=2) as proc:
        workers = await serving_workers(proc.pid, 2, port, admin_port)  # SO_REUSEPORT
        session = await admin_session(f"http://127.0.0.1:{admin_port}", "workers", "w-share")
        assert await get_all(port, session, 6) == [200] * 6
        proc.send_signal(signal.SIGTERM)  # the supervisor forwards it to every worker
        assert await wait_exit(proc, 15) == 0
        assert all(gone(pid) for pid in workers)
    assert len(upstream.requests) == 6


async def test_a_killed_worker_is_restarted_while_the_other_serves(
    upstream: Upstream, redis_server_session: RedisServer
) -> None:
    config = config_for(upstream.url, redis_server_session, logging={"format": "json"})
    port, admin_port = ports(config)
    async with process(config, workers=2) as proc:
        first, second = await serving_workers(proc.pid, 2, port, admin_port)
        session = await admin_session(f"http://127.0.0.1:{admin_port}", "workers", "w-kill")
        await kill(second)  # say, the OOM killer
        assert await get_all(port, session, 10) == [200] * 10  # the other one serves on
        back = await serving_workers(proc.pid, 2, port, admin_port)  # the count comes back
        assert first in back and second not in back
        assert await get_all(port, session, 10) == [200] * 10
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 15) == 0
        logs = [json.loads(line) for line in stderr_of(proc).splitlines() if line[:1] == "{"]
    died = [e for e in logs if e["msg"] == "a worker died; restarting it"]
    assert len(died) == 1
    assert (died[0]["pid"], died[0]["exit_code"]) == (second, 128 + signal.SIGKILL)
    assert died[0]["restart_in_seconds"] == 0.5


async def test_a_crash_loop_stops_the_set(
    upstream: Upstream, redis_server_session: RedisServer
) -> None:
    """Three deaths within the window (--restart-limit 3): the set stops, exit 1."""
    config = config_for(upstream.url, redis_server_session, logging={"format": "json"})
    port, admin_port = ports(config)
    args = ("--restart-limit", "3", "--restart-window", "60")
    async with process(config, workers=2, args=args) as proc:
        pids = await serving_workers(proc.pid, 2, port, admin_port)
        for _ in range(2):  # restarted after 0.5 s, then after 1 s
            victim = pids[-1]
            await kill(victim)
            pids = await serving_workers(proc.pid, 2, port, admin_port)
            assert victim not in pids
        os.kill(pids[-1], signal.SIGKILL)  # the third death within the window
        assert await wait_exit(proc, 15) == 1
        assert all(gone(pid) for pid in pids)
        logs = [json.loads(line) for line in stderr_of(proc).splitlines() if line[:1] == "{"]
    stopped = [e for e in logs if e["msg"] == "workers are crash-looping; stopping the set"]
    assert len(stopped) == 1
    assert stopped[0]["deaths"] == 3
    assert len([e for e in logs if e["msg"] == "a worker died; restarting it"]) == 2


def metric_sum(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def shared_dir(worker: int) -> str:
    """The PROMETHEUS_MULTIPROC_DIR the supervisor gave `worker`."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    prefix = b"PROMETHEUS_MULTIPROC_DIR="
    (value,) = [v.removeprefix(prefix).decode() for v in environ if v.startswith(prefix)]
    return value


def served_by(shared: str, pid: int) -> float:
    """Public requests one worker counted, read from its own multiprocess file."""
    from prometheus_client.mmap_dict import MmapedDict

    total = 0.0
    for key, value, _, _ in MmapedDict.read_all_values_from_file(f"{shared}/counter_{pid}.db"):
        _, name, labels, _ = json.loads(key)
        if name == "sidecar_requests_total" and labels.get("db") == "workers":
            total += value
    return total


async def scrape(admin_port: int) -> str:
    answer = await raw_http(admin_port, "/_metrics")  # a fresh connection: any worker answers
    assert answer.status == 200
    return answer.body.decode()


async def test_metrics_count_every_workers_requests(
    upstream: Upstream, redis_server_session: RedisServer
) -> None:
    config = config_for(upstream.url, redis_server_session)
    port, admin_port = ports(config)
    async with process(config, workers=2) as proc:
        workers = await serving_workers(proc.pid, 2, port, admin_port)
        shared = shared_dir(workers[0])
        session = await admin_session(f"http://127.0.0.1:{admin_port}", "workers", "w-metrics")
        # The admin API's own answers count too (db "workers", on the admin listener).
        before = metric_sum(await scrape(admin_port), "sidecar_requests_total", db="workers")
        each_before = [served_by(shared, pid) for pid in workers]
        assert await get_all(port, session, 40) == [200] * 40
        # Both workers served some (SO_REUSEPORT spreads 40 connections; all on one would be
        # 1 in 2^39), and whichever worker answers the scrape reports all 40.
        each = [served_by(shared, pid) - b for pid, b in zip(workers, each_before, strict=True)]
        assert all(n > 0 for n in each) and sum(each) == 40, each
        for _ in range(6):
            text = await scrape(admin_port)
            assert metric_sum(text, "sidecar_requests_total", db="workers") == before + 40
            count = metric_sum(text, "sidecar_request_duration_seconds_count", outcome="ok")
            assert count >= 40

        # A worker killed and restarted: its requests stay counted.
        await kill(workers[1])
        await serving_workers(proc.pid, 2, port, admin_port)
        assert await get_all(port, session, 5) == [200] * 5
        for _ in range(4):
            text = await scrape(admin_port)
            assert metric_sum(text, "sidecar_requests_total", db="workers") == before + 45
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 15) == 0
    assert not Path(shared).exists()  # removed with the set


async def test_open_websockets_gauge_adds_up_live_workers(
    upstream: Upstream, redis_server_session: RedisServer
) -> None:
    config = config_for(upstream.url, redis_server_session)
    port, admin_port = ports(config)
    async with process(config, workers=2) as proc:
        await serving_workers(proc.pid, 2, port, admin_port)
        session = await admin_session(f"http://127.0.0.1:{admin_port}", "workers", "w-gauge")
        headers = {"Cookie": f"{COOKIE}={session}"}
        clients = [aiohttp.ClientSession() for _ in range(6)]  # connections spread over workers
        try:
            url = f"http://127.0.0.1:{port}/workers/_ws"
            sockets = [await c.ws_connect(url, headers=headers) for c in clients]
            for _ in range(4):
                text = await scrape(admin_port)
                assert metric_sum(text, "sidecar_open_websockets") == 6
            for ws in sockets:
                await ws.close()
            async with asyncio.timeout(10):
                while metric_sum(await scrape(admin_port), "sidecar_open_websockets") != 0:
                    await asyncio.sleep(0.05)
        finally:
            for c in clients:
                await c.close()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 15) == 0


async def test_sigterm_drains_every_worker(
    upstream: Upstream, redis_server_session: RedisServer
) -> None:
    """In-flight requests on every worker finish, every websocket is told 1001, every worker
    logs its drain, and the set exits 0."""
    arrived = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await asyncio.sleep(1.5)
        return web.json_response({"slow": True})

    async with serving(slow) as slow_url:
        config = config_for(
            upstream.url,
            redis_server_session,
            databases={"workers": {}, "slow": {"upstream": slow_url}},
            shutdown_grace_seconds=5,
            logging={"format": "json", "level": "info"},
        )
        port, admin_port = ports(config)
        async with process(config, workers=2) as proc:
            workers = await serving_workers(proc.pid, 2, port, admin_port)
            admin = f"http://127.0.0.1:{admin_port}"
            session = await admin_session(admin, "workers", "w-drain")
            slow_session = await admin_session(admin, "slow", "w-drain")
            clients = [aiohttp.ClientSession() for _ in range(6)]
            sockets = [
                await c.ws_connect(
                    f"http://127.0.0.1:{port}/workers/_ws",
                    headers={"Cookie": f"{COOKIE}={session}"},
                )
                for c in clients
            ]
            in_flight = [
                asyncio.ensure_future(
                    raw_http(port, "/slow/doc", headers=[("Cookie", f"{COOKIE}={slow_session}")])
                )
                for _ in range(8)
            ]
            async with asyncio.timeout(10):
                while arrived < 8:
                    await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            for ws in sockets:
                msg = await ws.receive(timeout=5)
                assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
            for answer in await asyncio.gather(*in_flight):
                assert (answer.status, answer.json()) == (200, {"slow": True})
            for c in clients:
                await c.close()
            assert await wait_exit(proc, 15) == 0
            logs = [json.loads(line) for line in stderr_of(proc).splitlines() if line[:1] == "{"]
    stopped = {e["pid"] for e in logs if e["msg"] == "stopped"}
    assert stopped == set(workers)


async def test_workers_stop_when_the_supervisor_is_killed(
    upstream: Upstream, redis_server_session: RedisServer
) -> None:
    """A worker left without its supervisor (SIGKILLed) drains and exits by itself.
    (It stops ~1 s after start, when the session-events read times out: this test found the
    swallowed cancel that RedisStore.close now retries.)"""
    config = config_for(upstream.url, redis_server_session)
    port, admin_port = ports(config)
    async with process(config, workers=2) as proc:
        workers = await serving_workers(proc.pid, 2, port, admin_port)
        shared = shared_dir(workers[0])
        proc.kill()
        await wait_exit(proc, 5)
        try:
            async with asyncio.timeout(15):  # they notice within a second, then drain
                while not all(gone(pid) for pid in workers):
                    await asyncio.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # never leave one behind
            shutil.rmtree(shared)  # a SIGKILLed supervisor cannot remove it
