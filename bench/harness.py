"""Process plumbing shared by the benchmarks: free loopback ports, child process groups that are
always stopped, readiness waits and a process's resident memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
LOOPBACK = "127.0.0.1"  # the only address anything here binds or targets
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # tests.support.op: the tests' OpenID Provider harness
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """Setup or verification failed: the benchmark cannot give honest numbers."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


_PRCTL: Callable[..., int] | None
try:  # resolved now: dlopen() in a forked child of a threaded process could deadlock
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the harness dies, even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Service:
    """One started child and its process group; its output goes to `log_path`."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with {self.process.returncode}; log {self.log_path}:\n"
                + self.tail()
            )


class Processes:
    """Starts children in their own process groups and stops every one of them on exit.

    Used as a context manager: leaving the block (normally, on error, on Ctrl-C or SIGTERM)
    sends SIGTERM to each group, newest first, then SIGKILL to any group that lingers.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.services: list[Service] = []
        self._cleanups: list[Callable[[], None]] = []
        self._old_sigterm: Callable[[int, FrameType | None], object] | int | None = None

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Service:
        log_path = self.workdir / f"{name}.log"
        log: IO[bytes]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,  # its own process group, stopped as one
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl() call, no locks
            )
        service = Service(name, process, log_path)
        self.services.append(service)
        return service

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Runs `callback` when the block exits, before the children are stopped."""
        self._cleanups.append(callback)

    def stop(self, service: Service, timeout: float = 10.0) -> None:
        if service.alive():
            _signal_group(service.process, signal.SIGTERM)
            try:
                service.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(service.process, signal.SIGKILL)
                service.process.wait()
        # Apache and nginx leave workers in the group: make sure none outlives its leader.
        _signal_group(service.process, signal.SIGKILL)
        if service in self.services:
            self.services.remove(service)

    def stop_all(self) -> None:
        while self._cleanups:
            with contextlib.suppress(Exception):
                self._cleanups.pop()()
        while self.services:
            self.stop(self.services[-1])

    def check_alive(self) -> None:
        for service in self.services:
            service.check()

    def __enter__(self) -> Self:
        # SIGTERM becomes an exception so that __exit__ runs, as for Ctrl-C.
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A second Ctrl-C must not abandon the children half-stopped.
        old_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, old_sigint)
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # start_new_session: its pid is its group id


def wait_for_port(port: int, service: Service | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if service is not None:
            service.check()
        with contextlib.suppress(OSError):
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        if time.monotonic() > deadline:
            where = (
                f" ({service.name}; log {service.log_path}:\n{service.tail()})" if service else ""
            )
            raise BenchError(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f} s{where}")
        time.sleep(0.05)


def http_status(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET that follows no redirect; loopback URLs only."""
    if not url.startswith(f"http://{LOOPBACK}:"):
        raise BenchError(f"refusing a non-loopback URL: {url}")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for_http(url: str, service: Service, timeout: float = 30.0, ok: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        service.check()
        try:
            status, body = http_status(url)
            if status == ok:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{service.name}: {url} never answered {ok} ({last}):\n{service.tail()}")


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status memory field (VmRSS: resident now, VmHWM: peak resident), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} for pid {pid}")


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all of its descendants, in KiB."""
    total = 0
    for child in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError, BenchError):
            total += memory_kib(child)
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by a process and all its live descendants.

    Steadier than req/s on a shared machine: divided by the requests served it gives the CPU
    cost of one request, whatever else was competing for the cores meanwhile.
    """
    ticks = 0
    for proc in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{proc}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> Iterator[int]:
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in map(int, children):
            yield child
            yield from _descendants(child)


def raise_nofile(wanted: int) -> int:
    """Raises this process's open-file limit towards `wanted` (up to the hard limit); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def render(template: Path, out: Path, **values: object) -> Path:
    """Writes `template` with `$name` placeholders filled (string.Template, `$$` is a dollar)."""
    from string import Template

    text = Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    out.write_text(text)
    return out


def find_binary(name: str) -> str | None:
    """The full path of a program, looking in sbin too (nginx, apache2 live there)."""
    import shutil

    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")


def require_binary(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise BenchError(f"{name} is not installed: run bench/setup.sh (as root)")
    return path
