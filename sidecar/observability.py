"""Structured logs, Prometheus metrics, and the per-request log line (never a secret in either)."""

from __future__ import annotations

import atexit
import bisect
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class JsonFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]  # timestamps in UTC

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = {
            k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        }
        return base + ("  " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else "")


class MalformedRequestFilter(logging.Filter):
    """Replaces aiohttp's log of a request its parser refused with a line of our own.

    aiohttp logs it as an ERROR with a traceback whose message quotes the offending bytes:
    for an oversized Cookie or Authorization header, the start of that header, i.e. a session
    id or a token. Security: log the fact, never the bytes; at info, as the client's error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        logging.getLogger("sidecar.access").info(
            "malformed request rejected",
            extra={
                "status": exc.code,
                "error": type(exc).__name__,
                "remote": args[0] if args else None,
            },
        )
        return False


_MALFORMED_REQUESTS = MalformedRequestFilter()


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr without a write system call per request line: lines are buffered and flushed at
    least every `interval` seconds (by a daemon thread when idle), at once for warnings and
    above, and at exit. The per-request access log costs a syscall per request otherwise."""

    def __init__(self, interval: float = 0.5) -> None:
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(sys.stderr.fileno(), "w", closefd=False), 64 * 1024),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=False,
        )
        super().__init__(stream)
        self._interval = interval
        self._flusher = threading.Thread(target=self._flush_forever, daemon=True)
        self._flusher.start()
        atexit.register(self.flush)

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self._interval)
            self.flush()

    def write_line(self, line: str) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(line + self.terminator)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(msg + self.terminator)
                if record.levelno >= logging.WARNING:
                    self.stream.flush()
        except Exception:
            self.handleError(record)


class AccessLog:
    """The one line per request. Through `logging` by default (tests and embedders capture it
    there); once `setup_logging` installed JSON logs on stderr, written straight into that
    handler's buffer instead — the logging machinery cost more per request than the auth."""

    def __init__(self) -> None:
        self._logger = logging.getLogger("sidecar.access")
        self._direct: BufferedStreamHandler | None = None
        self._second = -1
        self._stamp = ""

    def write_directly(self, handler: BufferedStreamHandler | None) -> None:
        self._direct = handler

    def enabled(self) -> bool:
        return self._direct is not None or self._logger.isEnabledFor(logging.INFO)

    def request(self, fields: dict[str, Any]) -> None:
        direct = self._direct
        if direct is None:
            self._logger.info("request", extra=fields)
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # the timestamp's text changes once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry = {
            "time": f"{self._stamp}.{int((now - second) * 1000):03d}Z",
            "level": "info",
            "logger": "sidecar.access",
            "msg": "request",
        }
        entry.update(fields)
        direct.write_line(json.dumps(entry, default=str, separators=(",", ":")))


ACCESS_LOG = AccessLog()

_AUDIT = logging.getLogger("sidecar.audit")
AUDIT_FIELDS = frozenset({"user", "provider", "db", "reason", "sessions", "via"})


def audit(event: str, **fields: str | int | None) -> None:
    """One structured line (logger `sidecar.audit`, message = `event`) per login, refresh,
    logout, back-channel logout and revocation. Security: only the named fields exist, so a
    token can never be passed in by accident."""
    unknown = set(fields) - AUDIT_FIELDS
    if unknown:
        raise TypeError(f"audit fields {sorted(unknown)} are not allowed")
    _AUDIT.info(event, extra={"event": event, **fields})


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    handler = BufferedStreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True  # we log one line per request ourselves
    access_on = logging.getLogger("sidecar.access").isEnabledFor(logging.INFO)
    ACCESS_LOG.write_directly(handler if fmt == "json" and access_on else None)
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)


_REQUESTS = ("sidecar_requests", "Requests handled, by database, outcome and status")
_DURATION = (
    "sidecar_request_duration_seconds",
    "Time to answer a request (proxied: to the upstream's response headers)",
)


class RequestStats(Collector):
    """Per-request counters kept as plain ints and turned into Prometheus families at scrape
    time: prometheus_client's locked Counter and Histogram cost ~10 µs on every request.
    Safe without locks: the event loop is the only writer."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        self._buckets: dict[str, list[int]] = {}  # per outcome: counts per _LATENCY_BUCKETS + inf
        self._sums: dict[str, float] = {}

    def record(self, db: str, outcome: str, status: int, seconds: float) -> None:
        key = (db, outcome, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        buckets = self._buckets.get(outcome)
        if buckets is None:
            buckets = self._buckets[outcome] = [0] * (len(_LATENCY_BUCKETS) + 1)
            self._sums[outcome] = 0.0
        buckets[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self._sums[outcome] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(*_REQUESTS, labels=["db", "outcome", "status"])
        for (db, outcome, status), count in list(self._counts.items()):
            requests.add_metric([db, outcome, str(status)], count)
        yield requests
        seconds = HistogramMetricFamily(*_DURATION, labels=["outcome"])
        for outcome, counts in list(self._buckets.items()):
            cumulative, total = [], 0
            for bound, count in zip((*_LATENCY_BUCKETS, float("inf")), counts, strict=True):
                total += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
            seconds.add_metric([outcome], cumulative, self._sums[outcome])
        yield seconds


class SharedRequestStats:
    """RequestStats for a worker of `--workers N`: the same families in prometheus_client's
    multiprocess files, which every worker's /_metrics adds up. The labelled children are
    kept, so a request costs a dict lookup and two file-backed increments."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(*_REQUESTS, ["db", "outcome", "status"], registry=registry)
        self._seconds = Histogram(
            *_DURATION, ["outcome"], buckets=_LATENCY_BUCKETS, registry=registry
        )
        self._counts: dict[tuple[str, str, int], Counter] = {}
        self._durations: dict[str, Histogram] = {}

    def record(self, db: str, outcome: str, status: int, seconds: float) -> None:
        key = (db, outcome, status)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self._requests.labels(db, outcome, str(status))
        count.inc()
        duration = self._durations.get(outcome)
        if duration is None:
            duration = self._durations[outcome] = self._seconds.labels(outcome)
        duration.observe(seconds)


def multiprocess_dir() -> str | None:
    """Where the workers of `--workers N` share their metrics (set by the supervisor)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The sidecar's Prometheus metrics, in a registry of its own (tests create many apps).

    In a worker of `--workers N` (PROMETHEUS_MULTIPROC_DIR set by the supervisor, so
    prometheus_client keeps every value in a per-process file there) the exposition adds up
    every worker's files: /_metrics on any worker shows the whole set. A gauge added here
    needs a `multiprocess_mode` saying how workers' values combine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.shared_dir = multiprocess_dir()
        self.request_stats: RequestStats | SharedRequestStats
        if self.shared_dir:
            self.request_stats = SharedRequestStats(r)
        else:
            self.request_stats = RequestStats()
            r.register(self.request_stats)
        self.provider_seconds = Histogram(
            "sidecar_provider_request_duration_seconds",
            "Calls to OpenID Providers, by provider and kind",
            ["provider", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.logins = Counter(
            "sidecar_logins_total",
            "Logins and refreshes by provider, kind and result",
            ["provider", "kind", "result"],
            registry=r,
        )
        self.token_failures = Counter(
            "sidecar_token_validation_failures_total",
            "Rejected ID tokens by reason",
            ["reason"],
            registry=r,
        )
        self.jwks_refreshes = Counter(
            "sidecar_jwks_refreshes_total",
            "JWKS fetches by provider and result",
            ["provider", "result"],
            registry=r,
        )
        self.store_errors = Counter(
            "sidecar_session_store_errors_total", "Session store operations that failed", registry=r
        )
        self.websockets = Gauge(
            "sidecar_open_websockets",
            "Websockets being relayed",
            registry=r,
            multiprocess_mode="livesum",  # the live workers' sum; a dead worker's are gone
        )
        self.sessions_created = Counter(
            "sidecar_sessions_created_total", "Sessions created, by how", ["via"], registry=r
        )

    def exposition(self) -> bytes:
        """The text format for /_metrics: this process's registry, or the whole set's files."""
        if not self.shared_dir:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def provider_fetch(self, provider: str, kind: str, result: str, seconds: float) -> None:
        self.provider_seconds.labels(provider, kind).observe(seconds)
        if kind == "jwks":
            self.jwks_refreshes.labels(provider, result).inc()

    def token_failure(self, reason: str) -> None:
        self.token_failures.labels(reason).inc()

    def request(self, db: str, outcome: str, status: int, seconds: float) -> None:
        self.request_stats.record(db, outcome, status, seconds)
