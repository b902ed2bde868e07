"""Running wrk against one URL and reading its report (req/s, latency percentiles, errors)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from harness import BenchError, require_binary

_DURATION = re.compile(r"^\s*([\d.]+)(us|ms|s|m|h)\s*$")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass(frozen=True)
class WrkResult:
    requests_per_sec: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non_2xx_3xx: int  # wrk counts a 3xx as success: credentials are re-checked after each run
    socket_errors: int  # connect + read + write + timeout
    socket_error_detail: str = (
        ""  # wrk's own breakdown, e.g. "connect 0, read 3, write 0, timeout 0"
    )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def duration_ms(text: str) -> float:
    """wrk's human durations ("812.00us", "1.23ms", "2.01s") in milliseconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNIT_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    """Reads `wrk --latency` output; raises ValueError when a required figure is missing."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in ", output, re.M)
    percentiles = {
        int(m[1]): duration_ms(m[2])
        for m in re.finditer(r"^\s+(50|75|90|99)(?:\.0+)?%\s+(\S+)\s*$", output, re.M)
    }
    if rps is None or total is None or not {50, 90, 99} <= percentiles.keys():
        raise ValueError(f"unreadable wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests_per_sec=float(rps[1]),
        p50_ms=percentiles[50],
        p90_ms=percentiles[90],
        p99_ms=percentiles[99],
        requests=int(total[1]),
        non_2xx_3xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        socket_error_detail=errors[0].removeprefix("Socket errors: ") if errors else "",
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    threads: int,
    duration: float,
    headers: Mapping[str, str],
) -> WrkResult:
    wrk = require_binary("wrk")
    argv = [
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish against {url}") from None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}) against {url}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)
