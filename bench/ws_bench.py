"""Idle websockets through ONE sidecar process: its memory per connection, then relay latency.

Opens --connections authenticated websockets (session cookies from the admin API) through a
single sidecar process to an echo upstream, reports the sidecar's RSS before and after, then
sends --rate messages/s round-robin over --subset of them and reports the echo round trip, next
to the same measurement made directly against the upstream. Everything runs on 127.0.0.1 and
stops when the script ends. `--proxy plain` measures the plain aiohttp relay instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import credentials
import services
from harness import BenchError, Processes, memory_kib, raise_nofile

FD_MARGIN = 200  # listening sockets, Redis, logs, the Python runtime's own files


@dataclass
class Probe:
    """Round-trip bookkeeping for the latency phase."""

    sent: dict[int, float] = field(default_factory=dict)
    rtts_ms: list[float] = field(default_factory=list)
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set: no echo outstanding


async def reader(ws: aiohttp.ClientWebSocketResponse, probe: Probe) -> None:
    """Every socket is read (so pings are answered); echoes of timed messages are recorded."""
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            seq = int(msg.data.split(" ", 1)[0])
            started = probe.sent.pop(seq, None)
            if started is not None:
                probe.rtts_ms.append((time.perf_counter() - started) * 1000)
                if not probe.sent:
                    probe.drained.set()
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
            break


async def open_all(
    session: aiohttp.ClientSession,
    url: str,
    headers: Sequence[dict[str, str]],
    count: int,
    concurrency: int,
    timeout: float = 30.0,
) -> list[aiohttp.ClientWebSocketResponse]:
    """Opens up to `count` websockets; gives up early once failures pile up (a capped proxy
    would otherwise cost `timeout` per remaining socket)."""
    gate = asyncio.Semaphore(concurrency)
    failures: Counter[str] = Counter()
    give_up_after = max(50, count // 100)
    skipped = 0

    async def one(i: int) -> aiohttp.ClientWebSocketResponse | None:
        nonlocal skipped
        async with gate:
            if failures.total() >= give_up_after:
                skipped += 1
                return None
            try:
                return await asyncio.wait_for(
                    session.ws_connect(
                        url, headers=headers[i % len(headers)], autoping=True, max_msg_size=0
                    ),
                    timeout,
                )
            except aiohttp.WSServerHandshakeError as exc:
                failures[f"HTTP {exc.status}"] += 1
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
            return None

    opened = await asyncio.gather(*(one(i) for i in range(count)))
    sockets = [ws for ws in opened if ws is not None]
    if failures:
        print(
            f"  {failures.total()} websocket(s) failed to open: "
            + ", ".join(f"{what} ×{n}" for what, n in failures.most_common())
            + (f"; gave up on the remaining {skipped}" if skipped else "")
        )
    return sockets


async def latency(
    sockets: Sequence[aiohttp.ClientWebSocketResponse],
    probe: Probe,
    *,
    rate: float,
    seconds: float,
    size: int,
) -> tuple[int, int]:
    """Sends rate×seconds messages round-robin on an even schedule; returns (sent, lost)."""
    loop = asyncio.get_running_loop()
    pad = "x" * max(0, size - 12)
    total = int(rate * seconds)
    start = loop.time()
    for seq in range(total):
        delay = start + seq / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        probe.drained.clear()
        probe.sent[seq] = time.perf_counter()
        await sockets[seq % len(sockets)].send_str(f"{seq} {pad}")
    if probe.sent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(probe.drained.wait(), timeout=10)
    lost = len(probe.sent)
    probe.sent.clear()
    return total, lost


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(name: str, probe: Probe, sent: int, lost: int) -> str:
    r = probe.rtts_ms
    if not r:
        return f"| {name} | {sent} | {lost} | - | - | - |"
    return (
        f"| {name} | {sent} | {lost} | {statistics.median(r):.2f} | {percentile(r, 0.99):.2f} "
        f"| {max(r):.2f} |"
    )


async def bench(args: argparse.Namespace, procs: Processes) -> bool:
    """Runs the measurement; False when fewer websockets opened than asked for."""
    upstream = services.start_upstream_app(procs)
    proxy = services.start_proxy_under_test(procs, args.proxy, upstream.base)
    users = [f"ws{i}" for i in range(args.users)]
    headers = await credentials.proxy_headers(proxy, users)
    url = proxy.url + "ws"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm the process (imports, pools) before the baseline reading.
        async with session.ws_connect(url, headers=headers[0]) as ws:
            await ws.send_str("0 warm")
            await ws.receive(timeout=10)
        await asyncio.sleep(1)
        rss_before = memory_kib(proxy.pid)
        print(f"{args.proxy} pid {proxy.pid}: RSS {rss_before / 1024:.1f} MiB before")

        started = time.monotonic()
        sockets = await open_all(session, url, headers, args.connections, args.open_concurrency)
        opened_in = time.monotonic() - started
        probe = Probe()
        readers = [asyncio.create_task(reader(ws, probe)) for ws in sockets]
        print(
            f"opened {len(sockets)} websockets in {opened_in:.1f} s "
            f"({len(sockets) / opened_in:.0f}/s)"
        )
        await asyncio.sleep(args.settle)
        procs.check_alive()
        rss_open = memory_kib(proxy.pid)
        per = (rss_open - rss_before) / max(1, len(sockets))
        print(
            f"{args.proxy}: RSS {rss_open / 1024:.1f} MiB with {len(sockets)} idle websockets "
            f"(+{(rss_open - rss_before) / 1024:.1f} MiB, {per:.1f} KiB per connection)"
        )

        subset = sockets[: args.subset]
        sent, lost = await latency(
            subset, probe, rate=args.rate, seconds=args.seconds, size=args.message_bytes
        )
        through = Probe(rtts_ms=list(probe.rtts_ms))
        probe.rtts_ms.clear()
        rss_after_latency = memory_kib(proxy.pid)

        direct = Probe()
        direct_url = f"{upstream.base}/{services.DB}/ws"
        direct_sockets = await open_all(session, direct_url, [{}], len(subset), 50)
        direct_readers = [asyncio.create_task(reader(ws, direct)) for ws in direct_sockets]
        d_sent, d_lost = await latency(
            direct_sockets, direct, rate=args.rate, seconds=args.seconds, size=args.message_bytes
        )

        started = time.monotonic()
        await asyncio.gather(
            *(ws.close() for ws in [*sockets, *direct_sockets]), return_exceptions=True
        )
        for task in [*readers, *direct_readers]:
            task.cancel()
        await asyncio.gather(*readers, *direct_readers, return_exceptions=True)
        closed_in = time.monotonic() - started
        await asyncio.sleep(args.settle)
        rss_closed = memory_kib(proxy.pid)

    print()
    print(f"### {len(sockets)} idle websockets through one {args.proxy} process")
    print()
    print("| | RSS MiB |")
    print("|---|---:|")
    print(f"| before | {rss_before / 1024:.1f} |")
    print(f"| {len(sockets)} open, idle | {rss_open / 1024:.1f} |")
    print(f"| after the latency run | {rss_after_latency / 1024:.1f} |")
    print(f"| all closed ({closed_in:.1f} s to close) | {rss_closed / 1024:.1f} |")
    print(f"| per connection | {per:.1f} KiB |")
    print()
    print(
        f"Echo round trip, {args.rate:g} msgs/s for {args.seconds:g} s over {len(subset)} "
        f"sockets, {args.message_bytes} B messages, while {len(sockets)} sockets are open:"
    )
    print()
    print("| path | sent | lost | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    print(describe(f"through {args.proxy}", through, sent, lost))
    print(describe("direct to the upstream", direct, d_sent, d_lost))
    if len(sockets) < args.connections:
        print(
            f"\nerror: only {len(sockets)} of {args.connections} websockets opened", file=sys.stderr
        )
        return False
    return True


def plan_connections(wanted: int) -> int:
    """Raises the open-file limit; returns how many websockets one proxy process can hold.

    The proxy holds two sockets per websocket (client side and upstream side) and inherits
    our limit, which only root with CAP_SYS_RESOURCE can raise past the hard limit.
    """
    limit = raise_nofile(2 * wanted + FD_MARGIN)
    possible = (limit - FD_MARGIN) // 2
    if possible < wanted:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        print(
            f"warning: the open-file hard limit is {hard}: one proxy process can hold "
            f"{possible} websockets (2 sockets each), not {wanted}; measuring {possible}"
        )
        return possible
    return wanted


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--proxy", choices=("sidecar", "plain"), default="sidecar")
    parser.add_argument("--users", type=int, default=100, help="sessions, shared round-robin")
    parser.add_argument(
        "--open-concurrency", type=int, default=200, help="websocket handshakes in flight at once"
    )
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds to wait before reading RSS"
    )
    parser.add_argument("--subset", type=int, default=100, help="sockets used for latency")
    parser.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency phase length")
    parser.add_argument("--message-bytes", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="500 sockets, 3 s: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.seconds, args.settle = 500, 3.0, 1.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    args.connections = plan_connections(args.connections)
    args.subset = max(1, min(args.subset, args.connections))
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-wsbench-"))
    try:
        with Processes(workdir) as procs:
            complete = uvloop.run(bench(args, procs))
    except BenchError as exc:
        print(f"error: {exc}\nlogs are in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
