"""`sidecar run --workers N`: keep N serving processes on one port; a worker that dies is
restarted with backoff while the others serve, and only a crash loop stops the set.

Why not gunicorn (measured with gunicorn 27.0.1 and aiohttp's `GunicornWebWorker`): its worker
serves one application on every bound socket, so the public and admin listeners (two apps)
and our drain on SIGTERM (readiness false, public listener closed, websockets told 1001)
would need a worker class that rewrites `_run`; and its arbiter respawns a dead worker at once
with no backoff and no crash-loop limit once it has booted -- a worker that crashed 0.2 s
after booting was respawned 44 times in 5 s and the master never gave up. What we would keep
of gunicorn is the part below.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import multiprocess

log = logging.getLogger("sidecar.supervisor")

# A worker that cannot start (it cannot listen on its address) exits with this; restarting
# it cannot help, so the supervisor stops the set at once with the same code.
EXIT_CANNOT_START = 3
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class RestartPolicy:
    """`limit` deaths within `window` seconds are a crash loop; before that, a dead worker is
    restarted after `first_delay` seconds, doubled for each further death in the window, at
    most `max_delay`."""

    limit: int = 5
    window: float = 60.0
    first_delay: float = 0.5
    max_delay: float = 10.0

    def decide(self, recent_deaths: int) -> float | None:
        """Seconds to wait before restarting, or None: a crash loop, stop the set."""
        if recent_deaths >= self.limit:
            return None
        return float(min(self.first_delay * 2 ** max(recent_deaths - 1, 0), self.max_delay))


def exit_code(returncode: int) -> int:
    """A worker's exit status as the supervisor reports it.

    Killed by SIGTERM/SIGINT means it stopped as told (one still starting has no handler yet);
    killed by another signal reports 128 + signum, as a shell would.
    """
    if returncode in (-signal.SIGTERM, -signal.SIGINT):
        return 0
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs `cmd` `workers` times; `run()` returns the set's exit code."""

    def __init__(self, cmd: list[str], workers: int, policy: RestartPolicy) -> None:
        self.cmd = cmd
        self.policy = policy
        self.slots: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.restart_at: list[float] = [0.0] * workers
        self.deaths: deque[float] = deque()
        self.stopping = False
        self.failure = 0
        self.metrics_dir = ""

    def run(self) -> int:
        # One directory of prometheus_client multiprocess files for this set of workers, so
        # /_metrics on any of them shows the whole set; removed when the set stops.
        self.metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        # Handlers first: a SIGTERM during the spawn must not orphan the workers started so far.
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        try:
            for slot in range(len(self.slots)):
                self._spawn(slot)
            while not self.stopping:
                time.sleep(_POLL_SECONDS)
                self._tend(time.monotonic())
            self._forward(signal.SIGTERM, None)
            codes = [exit_code(child.wait()) for child in self.slots if child is not None]
            return self.failure or max(codes, default=0)
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _spawn(self, slot: int) -> None:
        env = {**os.environ, MULTIPROC_ENV: self.metrics_dir}
        child = subprocess.Popen(self.cmd, env=env)  # noqa: S603
        self.slots[slot] = child
        if self.stopping:  # a signal arrived while it was being started
            child.send_signal(signal.SIGTERM)
        log.info("worker started", extra={"worker": slot, "pid": child.pid})

    def _tend(self, now: float) -> None:
        for slot, child in enumerate(self.slots):
            if self.stopping:
                return
            if child is None:
                if now >= self.restart_at[slot]:
                    self._spawn(slot)
                continue
            returncode = child.poll()
            if returncode is None:
                continue
            self._buried(slot, child, returncode, now)

    def _buried(
        self, slot: int, child: subprocess.Popen[bytes], returncode: int, now: float
    ) -> None:
        self.slots[slot] = None
        # Its live gauges (open websockets) leave the totals; its counters stay in them.
        multiprocess.mark_process_dead(child.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        code = exit_code(returncode)  # exiting by itself, even with 0, is a death
        self.deaths.append(now)
        while self.deaths and self.deaths[0] <= now - self.policy.window:
            self.deaths.popleft()
        fields: dict[str, Any] = {"worker": slot, "pid": child.pid, "exit_code": code}
        if returncode == EXIT_CANNOT_START:
            log.error("a worker cannot start; stopping the set", extra=fields)
            self._stop(EXIT_CANNOT_START)
            return
        delay = self.policy.decide(len(self.deaths))
        if delay is None:
            log.error(
                "workers are crash-looping; stopping the set",
                extra={**fields, "deaths": len(self.deaths), "window_seconds": self.policy.window},
            )
            self._stop(1)
            return
        self.restart_at[slot] = now + delay
        log.warning("a worker died; restarting it", extra={**fields, "restart_in_seconds": delay})

    def _stop(self, code: int) -> None:
        self.failure = code
        self._forward(signal.SIGTERM, None)

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for child in self.slots:
            if child is not None and child.poll() is None:
                child.send_signal(signum)
