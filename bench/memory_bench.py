"""Memory of ONE sidecar process under large bodies and under a mixed-traffic soak.

Streams a --size-mib upload and download through the proxy and reports its RSS before, at its
peak (sampled every 20 ms) and after; then the same with a reader that stalls (client side for
downloads, upstream side for uploads), which a buffering proxy would answer by holding the
rest of the body in memory. --soak-minutes M adds M minutes of mixed traffic (GETs, small PUTs,
refused requests, short websockets) and reports RSS along the way. `--proxy plain` measures the
plain aiohttp proxy instead. Everything runs on 127.0.0.1 and stops when the script ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import credentials
import services
from harness import BenchError, Processes, memory_kib

MIB = 1024 * 1024
CHUNK = 256 * 1024
_BLOCK = bytes(CHUNK)


class RssSampler:
    """Samples a process's VmRSS in the background; `peak` is the largest seen since reset()."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def now(self) -> int:
        return memory_kib(self.pid)

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        self.reset()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(frozen=True)
class Phase:
    name: str
    mib: float
    seconds: float
    before_kib: int
    peak_kib: int
    after_kib: int

    def row(self) -> str:
        rate = self.mib / self.seconds if self.seconds else 0.0
        return (
            f"| {self.name} | {self.mib:.0f} | {self.seconds:.1f} | {rate:.0f} | "
            f"{self.before_kib / 1024:.1f} | {self.peak_kib / 1024:.1f} | "
            f"{self.after_kib / 1024:.1f} | {(self.peak_kib - self.before_kib) / 1024:+.1f} |"
        )


async def body(size: int) -> AsyncIterator[bytes]:
    left = size
    while left > 0:
        piece = _BLOCK if left >= CHUNK else _BLOCK[:left]
        left -= len(piece)
        yield piece


async def upload(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], size: int
) -> None:
    # A chunked body of unknown length: the proxy can only stream it, never size it up front.
    async with session.put(url, data=body(size), headers=headers) as response:
        answer = await response.json(content_type=None)
        if response.status != 200 or answer.get("bytes") != size:
            raise BenchError(f"upload through the proxy: {response.status} {answer}")


async def download(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    size: int,
    stall_after: int = -1,
    stall: float = 0.0,
) -> None:
    received = 0
    stalled = False
    async with session.get(url, params={"bytes": str(size)}, headers=headers) as response:
        if response.status != 200:
            raise BenchError(f"download through the proxy: {response.status}")
        async for chunk in response.content.iter_chunked(CHUNK):
            received += len(chunk)
            if not stalled and 0 <= stall_after <= received:
                stalled = True
                await asyncio.sleep(stall)  # a slow client: the proxy must stop reading too
    if received != size:
        raise BenchError(f"download through the proxy: got {received} of {size} bytes")


async def phase(
    name: str, sampler: RssSampler, size: int, run: Callable[[], Awaitable[None]]
) -> Phase:
    await asyncio.sleep(0.5)
    before = sampler.reset()
    started = time.monotonic()
    await run()
    seconds = time.monotonic() - started
    peak = sampler.peak
    await asyncio.sleep(1.0)
    return Phase(name, size / MIB, seconds, before, peak, sampler.now())


async def large_bodies(
    session: aiohttp.ClientSession,
    proxy: services.ProxyUnderTest,
    headers: dict[str, str],
    sampler: RssSampler,
    args: argparse.Namespace,
) -> list[Phase]:
    size = args.size_mib * MIB
    stall_size = min(size, args.stall_mib * MIB)
    up, down = proxy.url + "upload", proxy.url + "download"
    slow_up = f"{up}?pause_after={16 * MIB}&pause={args.stall_seconds}"
    phases = [
        await phase("upload", sampler, size, lambda: upload(session, up, headers, size)),
        await phase("download", sampler, size, lambda: download(session, down, headers, size)),
        await phase(
            f"upload, upstream stalls {args.stall_seconds:g} s",
            sampler,
            stall_size,
            lambda: upload(session, slow_up, headers, stall_size),
        ),
        await phase(
            f"download, client stalls {args.stall_seconds:g} s",
            sampler,
            stall_size,
            lambda: download(session, down, headers, stall_size, 16 * MIB, args.stall_seconds),
        ),
    ]
    return phases


async def soak(
    session: aiohttp.ClientSession,
    proxy: services.ProxyUnderTest,
    headers: Sequence[dict[str, str]],
    sampler: RssSampler,
    args: argparse.Namespace,
) -> None:
    """Mixed traffic for --soak-minutes with --soak-concurrency workers; RSS every 30 s."""
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + args.soak_minutes * 60
    rng = random.Random(5)
    payload = bytes(4096)

    async def one() -> str:
        h = rng.choice(headers)
        roll = rng.random()
        if roll < 0.70:
            async with session.get(proxy.url + "doc", headers=h) as r:
                await r.read()
                return f"GET {r.status}"
        if roll < 0.85:
            async with session.put(proxy.url + "doc", data=payload, headers=h) as r:
                await r.read()
                return f"PUT {r.status}"
        if roll < 0.90:
            async with session.get(proxy.url + "doc") as r:  # no credentials
                await r.read()
                return f"anonymous {r.status}"
        async with session.ws_connect(proxy.url + "ws", headers=h) as ws:
            await ws.send_str("hello")
            msg = await ws.receive(timeout=10)
            return f"websocket {'echo' if msg.data == 'hello' else 'bad'}"

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                counts[await one()] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                counts[f"error {type(exc).__name__}"] += 1

    samples = [(0.0, sampler.reset())]
    started = time.monotonic()
    workers = [asyncio.create_task(worker()) for _ in range(args.soak_concurrency)]
    pending: set[asyncio.Task[None]] = set(workers)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=30)
        sample = (time.monotonic() - started, sampler.now())
        if (
            len(samples) > 1 and samples[-1][0] > sample[0] - 1
        ):  # the workers' last requests ended just after
            samples.pop()
        samples.append(sample)
    await asyncio.gather(*workers)
    print()
    print(f"### Soak: {args.soak_minutes:g} min of mixed traffic, {args.soak_concurrency} workers")
    print()
    print("| minute | RSS MiB |")
    print("|---:|---:|")
    for at, rss in samples:
        print(f"| {at / 60:.1f} | {rss / 1024:.1f} |")
    print(
        f"\npeak RSS {sampler.peak / 1024:.1f} MiB; outcomes: "
        + ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items()))
    )


async def bench(args: argparse.Namespace, procs: Processes) -> None:
    upstream = services.start_upstream_app(procs)
    proxy = services.start_proxy_under_test(procs, args.proxy, upstream.base)
    headers = await credentials.proxy_headers(proxy, [f"mem{i}" for i in range(10)])
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as session, RssSampler(proxy.pid) as sampler:
        for _ in range(20):  # warm the process before the first reading
            async with session.get(proxy.url + "doc", headers=headers[0]) as r:
                await r.read()
        phases = await large_bodies(session, proxy, headers[0], sampler, args)
        procs.check_alive()
        print(f"### Large bodies through one {args.proxy} process (pid {proxy.pid})")
        print()
        print("| phase | MiB | s | MiB/s | RSS before | peak | after | peak growth MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for p in phases:
            print(p.row())
        if args.soak_minutes > 0:
            await soak(session, proxy, headers, sampler, args)
            procs.check_alive()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--proxy", choices=("sidecar", "plain"), default="sidecar")
    parser.add_argument("--size-mib", type=int, default=1024, help="upload and download size")
    parser.add_argument("--stall-mib", type=int, default=256, help="body size in stall phases")
    parser.add_argument("--stall-seconds", type=float, default=3.0)
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--soak-concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="64 MiB bodies: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.stall_mib, args.stall_seconds = 64, 64, 1.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-membench-"))
    try:
        with Processes(workdir) as procs:
            uvloop.run(bench(args, procs))
    except BenchError as exc:
        print(f"error: {exc}\nlogs are in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
