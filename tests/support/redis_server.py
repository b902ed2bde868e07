"""A real `redis-server` on a free 127.0.0.1 port for tests, which can be stopped, restarted
on the same port and paused to simulate outages and hangs."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis


class RedisServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`with RedisServer() as server:` (or `async with`); `server.url` is `redis://127.0.0.1:<port>/0`.

    No persistence (`--save "" --appendonly no`): a restart comes back empty, like a failover
    to a replica that lost the data would.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        monitor: tuple[str, int] | None = None,
        cluster: bool = False,
    ) -> None:
        """`monitor=(service_name, master_port)` makes this a Sentinel watching that master;
        `cluster=True` a one-node Redis Cluster owning every slot (Redis >= 7.0)."""
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisServerError(
                "redis-server not found on PATH: run `make test`, which installs it "
                "(or install the redis-server package yourself)"
            )
        self.binary = found
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self._log = self._dir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._monitor = monitor
        self._cluster = cluster
        self._bus_port = free_port() if cluster else 0
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- sync -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        args = [self.binary]
        if self._monitor is not None:
            # Sentinel insists on a writable config file of its own.
            config = self._dir / "sentinel.conf"
            service, master_port = self._monitor
            config.write_text(
                f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
                f"sentinel down-after-milliseconds {service} 1000\n"
            )
            args += [str(config), "--sentinel"]
        args += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self._cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-port", str(self._bus_port)]  # not the default port + 10000
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.port):
            if self._process.poll() is not None:
                raise RedisServerError(f"redis-server exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server did not answer PING:\n{self.log_tail()}")
            time.sleep(0.02)
        if self._cluster:
            self._own_all_slots(deadline)
        return self

    def _own_all_slots(self, deadline: float) -> None:
        with self.client() as client:
            if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RedisServerError("the one-node cluster did not become ok")
                time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._paused:
            self.resume(process)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def restart(self) -> None:
        """Stop, then start again on the same port (empty: there is no persistence)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        if self._process is not None and not self._paused:
            self._process.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self, process: subprocess.Popen[bytes] | None = None) -> None:
        process = process or self._process
        if process is not None and self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self) -> redis.Redis:
        """A sync client for inspecting the server from a test; close it after use."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def command(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)

    def commandstats(self) -> dict[str, int]:
        """Calls per command so far (`INFO commandstats`), e.g. {"get": 3, "set": 1}."""
        with self.client() as client:
            stats = client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- async (the sync calls block for tens of milliseconds; keep the loop free) -----------

    async def astart(self) -> RedisServer:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        await asyncio.to_thread(self.restart)

    async def __aenter__(self) -> RedisServer:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)
