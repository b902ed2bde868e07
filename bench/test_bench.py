"""The benchmark's pure parts: reading wrk's report, medians and the comparison table.

Run with `.venv/bin/pytest bench/test_bench.py -q` (not part of `make test`'s tests/ tree).
"""

from __future__ import annotations

import pytest
from run import Median, Run, markdown, medians, tampered
from wrkrun import WrkResult, duration_ms, parse_wrk

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:40000/db/doc
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.83ms    1.02ms  30.11ms   88.10%
    Req/Sec     5.71k   412.33     6.40k    71.00%
  Latency Distribution
     50%    2.78ms
     75%    3.10ms
     90%  812.00us
     99%    1.20s
  113742 requests in 10.01s, 17.25MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  11363.11
Transfer/sec:      1.72MB
"""


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("812.00us", 0.812),
        ("2.78ms", 2.78),
        ("1.20s", 1200.0),
        ("1.50m", 90_000.0),
        (" 3ms ", 3.0),
    ],
)
def test_duration_ms(text: str, ms: float) -> None:
    assert duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "12", "1.2 ms", "ms", "-1ms", "1.2ks"])
def test_duration_ms_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        duration_ms(text)


def test_parse_wrk_reads_every_figure() -> None:
    assert parse_wrk(WRK_OUTPUT) == WrkResult(
        requests_per_sec=11363.11,
        p50_ms=2.78,
        p90_ms=0.812,
        p99_ms=1200.0,
        requests=113742,
        non_2xx_3xx=7,
        socket_errors=6,
        socket_error_detail="connect 0, read 3, write 1, timeout 2",
    )


def test_parse_wrk_clean_run_has_no_errors() -> None:
    clean = "\n".join(
        line for line in WRK_OUTPUT.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    result = parse_wrk(clean)
    assert (result.non_2xx_3xx, result.socket_errors, result.socket_error_detail) == (0, 0, "")


@pytest.mark.parametrize(
    "missing", ["Requests/sec:", "requests in", "     50%", "     99%", "     90%"]
)
def test_parse_wrk_refuses_partial_output(missing: str) -> None:
    broken = "\n".join(line for line in WRK_OUTPUT.splitlines() if missing not in line)
    with pytest.raises(ValueError):
        parse_wrk(broken)


def result(rps: float, p50: float = 1.0, p99: float = 2.0) -> WrkResult:
    return WrkResult(rps, p50, p50, p99, int(rps * 10), 0, 0)


def test_medians_per_target_and_connections() -> None:
    runs = [
        Run("plain", 32, 1, result(100, 1.0, 5.0)),
        Run("plain", 32, 2, result(300, 3.0, 9.0)),
        Run("plain", 32, 3, result(200, 2.0, 7.0)),
        Run("plain", 128, 1, result(50)),
    ]
    table = medians(runs)
    assert table[("plain", 32)] == Median("plain", 32, 200, 2.0, 7.0, 3, 1.0)
    assert table[("plain", 128)].runs == 1
    assert table[("plain", 128)].spread == 0


def test_markdown_ratios() -> None:
    table = {
        ("plain", 32): Median("plain", 32, 10_000, 1.0, 4.0, 3, 0.0),
        ("apache-session", 32): Median("apache-session", 32, 4_000, 2.0, 10.0, 3, 0.0),
        ("sidecar-session", 32): Median("sidecar-session", 32, 8_000, 1.5, 5.0, 3, 0.0),
    }
    text = markdown(table, [32])
    assert "| sidecar-session / apache-session | 32 | 2.00× | 0.50× |" in text
    assert "| sidecar-session vs plain proxy | 32 | 20% fewer req/s | 1.25× |" in text
    assert "sidecar-bearer" not in text  # nothing to compare without both sides


@pytest.mark.parametrize(
    ("token", "expected"),
    [("a.b.cdefgh", "a.b.cdAAAA"), ("a.b.cdAAAA", "a.b.cdBBBB")],
)
def test_tampered_changes_the_signature(token: str, expected: str) -> None:
    assert tampered(token) == expected
