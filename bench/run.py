"""Throughput and latency of the sidecar against Apache httpd + mod_auth_openidc (issue 5).

Starts everything on free 127.0.0.1 ports (nginx upstream, Redis, the test OP, Apache, a plain
aiohttp proxy, the sidecar), checks that every protected target refuses strangers and admits the
benchmark's credentials, runs wrk round-robin over the targets, prints a markdown table of
medians, and stops everything it started. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import credentials
import services
from harness import (
    BENCH,
    LOOPBACK,
    BenchError,
    Processes,
    find_binary,
    free_port,
    http_status,
    tree_cpu_seconds,
)
from wrkrun import WrkResult, run_wrk

TARGETS = (
    "nginx",  # the upstream itself: the ceiling of the machine
    "plain",  # aiohttp proxy without auth: the framework's ceiling
    "plain-h1",  # the same on the sidecar's httptools upstream transport (aiohttp server)
    "apache-session",
    "apache-bearer",
    "sidecar-session",
    "sidecar-bearer",
)
COMPARISONS = (  # (sidecar target, baseline target)
    ("sidecar-session", "apache-session"),
    ("sidecar-bearer", "apache-bearer"),
)
BODY = b"ok"  # what nginx answers: a target that serves it to a stranger lets everyone in
REQUIRED_PROGRAMS = ("wrk", "nginx", "apache2", "redis-server", "node")


@dataclass(frozen=True)
class Refusal:
    """A request the target must refuse, with the statuses that count as a refusal."""

    what: str
    headers: dict[str, str]
    statuses: frozenset[int]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    refusals: tuple[Refusal, ...] = ()
    pid: int | None = None  # the serving process tree whose CPU time is counted


@dataclass(frozen=True)
class Run:
    target: str
    connections: int
    round: int
    result: WrkResult
    cpu_us: float | None = None  # the target's CPU µs (user + system) per request served


# ------------------------------------------------------------------------------ verification


def check_admits(target: Target) -> None:
    status, body = http_status(target.url, target.headers)
    if status != 200 or body != BODY:
        raise BenchError(
            f"{target.name}: the benchmark's credentials were not accepted at {target.url}: "
            f"{status} {body[:200]!r}"
        )


def verify(target: Target) -> None:
    """Refuses to benchmark a target that lets strangers in, or that turns the bench away."""
    check_admits(target)
    for refusal in target.refusals:
        status, body = http_status(target.url, refusal.headers)
        if status not in refusal.statuses or body == BODY:
            raise BenchError(
                f"{target.name} does NOT authenticate: {refusal.what} got {status} "
                f"{body[:100]!r} (expected one of {sorted(refusal.statuses)}); not benchmarking it"
            )
    print(
        f"  {target.name}: admits the credentials; refuses "
        + (", ".join(r.what for r in target.refusals) or "(nothing: unauthenticated baseline)")
    )


def tampered(token: str) -> str:
    """The token with its signature's last bytes changed."""
    tail = "AAAA" if not token.endswith("AAAA") else "BBBB"
    return token[: -len(tail)] + tail


def session_refusals(cookie: str, statuses: frozenset[int]) -> tuple[Refusal, ...]:
    return (
        Refusal("no cookie", {}, statuses),
        Refusal(
            "a forged session cookie", {"Cookie": f"{cookie}={secrets.token_hex(20)}"}, statuses
        ),
    )


def bearer_refusals(token: str) -> tuple[Refusal, ...]:
    unauthorized = frozenset({401})
    return (
        Refusal("no token", {}, unauthorized),
        Refusal(
            "a token with a broken signature",
            {"Authorization": f"Bearer {tampered(token)}"},
            unauthorized,
        ),
        Refusal(
            "a token without a signature",
            {"Authorization": f"Bearer {token.rsplit('.', 1)[0]}."},
            unauthorized,
        ),
    )


# ------------------------------------------------------------------------------ setup


def ensure_installed(wanted: set[str]) -> None:
    needs = set(REQUIRED_PROGRAMS)
    if not wanted & {"apache-session", "apache-bearer"}:
        needs.discard("apache2")
    missing = [p for p in sorted(needs) if find_binary(p) is None]
    openidc = Path("/usr/lib/apache2/modules/mod_auth_openidc.so")
    if "apache2" in needs and not openidc.exists():
        missing.append("mod_auth_openidc")
    op_modules = BENCH.parent / "tests" / "peers" / "op" / "node_modules" / "oidc-provider"
    if not op_modules.is_dir():
        missing.append("tests/peers/op/node_modules")
    if not missing:
        return
    print(f"missing {', '.join(missing)}: running bench/setup.sh", flush=True)
    if subprocess.run(["bash", str(BENCH / "setup.sh")], check=False).returncode != 0:
        raise BenchError("bench/setup.sh failed: install the missing programs and retry")


def start_targets(procs: Processes, wanted: set[str], args: argparse.Namespace) -> list[Target]:
    """Starts what the wanted targets need; returns them with credentials, in TARGETS order."""
    upstream = services.start_nginx(procs)
    upstream_url = upstream.base
    path = f"/{services.DB}/doc"
    targets: dict[str, Target] = {
        "nginx": Target("nginx", upstream_url + path, pid=upstream.service.pid)
    }

    for name, transport in (("plain", "aiohttp"), ("plain-h1", "h1")):
        if name in wanted:
            plain = services.start_plain_proxy(
                procs, upstream=upstream_url, workers=args.workers, transport=transport
            )
            targets[name] = Target(name, plain.base + path, pid=plain.service.pid)

    needs_apache = bool(wanted & {"apache-session", "apache-bearer"})
    needs_op = needs_apache or "sidecar-bearer" in wanted
    needs_sidecar = bool(wanted & {"sidecar-session", "sidecar-bearer"})
    redis = services.start_redis(procs) if needs_apache or needs_sidecar else None
    token_client = services.token_client()
    apache_port = free_port()
    apache_client = services.apache_client(apache_port)
    op = services.start_op(procs, [apache_client, token_client]) if needs_op else None
    token = asyncio.run(credentials.id_token(op, token_client)) if op is not None else ""

    if needs_apache:
        assert op is not None and redis is not None
        apache = services.start_apache(
            procs,
            port=apache_port,
            client=apache_client,
            op=op,
            redis_port=redis.port,
            upstream_port=upstream.port,
            workers=args.workers,
            threads=args.apache_threads,
        )
        cookie = asyncio.run(credentials.apache_session_cookie(apache))
        name = credentials.APACHE_SESSION_COOKIE
        # mod_auth_openidc redirects browsers to the OP (302) and answers others 401.
        refused = frozenset({302, 401})
        targets["apache-session"] = Target(
            "apache-session",
            apache.endpoint.base + "/session/doc",
            {"Cookie": f"{name}={cookie}"},
            session_refusals(name, refused),
            apache.endpoint.service.pid,
        )
        targets["apache-bearer"] = Target(
            "apache-bearer",
            apache.endpoint.base + "/bearer/doc",
            {"Authorization": f"Bearer {token}"},
            bearer_refusals(token),
            apache.endpoint.service.pid,
        )

    if needs_sidecar:
        assert redis is not None
        sidecar = services.start_sidecar(
            procs,
            upstream=upstream_url,
            redis_port=redis.port,
            issuer=op.issuer if op is not None else None,
            workers=args.workers,
            session_cache_seconds=args.sidecar_session_cache,
            transport=args.sidecar_transport,
        )
        (session_id,) = asyncio.run(credentials.sidecar_sessions(sidecar, ["alice"]))
        name = credentials.SIDECAR_SESSION_COOKIE
        targets["sidecar-session"] = Target(
            "sidecar-session",
            sidecar.url + "doc",
            {"Cookie": f"{name}={session_id}"},
            session_refusals(name, frozenset({401})),
            sidecar.endpoint.service.pid,
        )
        if op is not None:
            targets["sidecar-bearer"] = Target(
                "sidecar-bearer",
                sidecar.url + "doc",
                {"Authorization": f"Bearer {token}"},
                bearer_refusals(token),
                sidecar.endpoint.service.pid,
            )
    return [targets[name] for name in TARGETS if name in wanted]


# ------------------------------------------------------------------------------ measuring


def measure(procs: Processes, targets: Sequence[Target], args: argparse.Namespace) -> list[Run]:
    """Round-robin: every round visits every (connections, target) pair once."""
    runs: list[Run] = []
    total = args.rounds * len(args.connections) * len(targets)
    started = time.monotonic()
    for round_ in range(1, args.rounds + 1):
        for connections in args.connections:
            for target in targets:
                procs.check_alive()
                load = functools.partial(
                    run_wrk,
                    target.url,
                    connections=connections,
                    threads=args.threads,
                    headers=target.headers,
                )
                if args.warmup > 0:
                    load(duration=args.warmup)
                cpu_before = tree_cpu_seconds(target.pid) if target.pid else 0.0
                result = load(duration=args.duration)
                if result.requests == 0:
                    raise BenchError(f"{target.name} answered no request: {result}")
                cpu_us = (
                    (tree_cpu_seconds(target.pid) - cpu_before) * 1e6 / result.requests
                    if target.pid
                    else None
                )
                # wrk counts 3xx as success: make sure the credentials still work afterwards.
                check_admits(target)
                if result.non_2xx_3xx or result.socket_errors:
                    print(
                        f"  warning: {target.name} c={connections}: {result.non_2xx_3xx} "
                        f"non-2xx/3xx responses, socket errors: {result.socket_error_detail}"
                    )
                runs.append(Run(target.name, connections, round_, result, cpu_us))
                done = len(runs)
                eta = (time.monotonic() - started) / done * (total - done)
                print(
                    f"  [{done}/{total}] round {round_} c={connections:<4} "
                    f"{target.name:<16} {result.requests_per_sec:>9.0f} req/s  "
                    f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                    f"{_cpu(cpu_us)} CPU µs/req  "
                    f"(~{eta:.0f} s left)",
                    flush=True,
                )
    return runs


@dataclass(frozen=True)
class Median:
    target: str
    connections: int
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    runs: int
    spread: float  # (max - min) / median req/s over the rounds
    cpu_us: float | None = None  # median CPU µs per request


def _cpu(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def medians(runs: Sequence[Run]) -> dict[tuple[str, int], Median]:
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.target, run.connections), []).append(run)
    out = {}
    for (target, connections), group in groups.items():
        results = [run.result for run in group]
        rps = [r.requests_per_sec for r in results]
        mid = statistics.median(rps)
        cpu = [run.cpu_us for run in group if run.cpu_us is not None]
        out[(target, connections)] = Median(
            target,
            connections,
            mid,
            statistics.median(r.p50_ms for r in results),
            statistics.median(r.p99_ms for r in results),
            len(results),
            (max(rps) - min(rps)) / mid if mid else 0.0,
            statistics.median(cpu) if cpu else None,
        )
    return out


def _cpu_ratio(a: Median, b: Median) -> str:
    if a.cpu_us is None or b.cpu_us is None or not b.cpu_us:
        return "—"
    return f"{a.cpu_us / b.cpu_us:.2f}×"


def markdown(table: dict[tuple[str, int], Median], connections: Sequence[int]) -> str:
    lines = [
        "| target | connections | req/s | p50 ms | p99 ms | CPU µs/req | runs | spread |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TARGETS:
        for c in connections:
            m = table.get((name, c))
            if m is not None:
                lines.append(
                    f"| {name} | {c} | {m.requests_per_sec:,.0f} | {m.p50_ms:.2f} | "
                    f"{m.p99_ms:.2f} | {_cpu(m.cpu_us)} | {m.runs} | {m.spread:.0%} |"
                )
    ratios = []
    for c in connections:
        for ours, theirs in COMPARISONS:
            a, b = table.get((ours, c)), table.get((theirs, c))
            if a and b:
                ratios.append(
                    f"| {ours} / {theirs} | {c} | "
                    f"{a.requests_per_sec / b.requests_per_sec:.2f}× | "
                    f"{a.p99_ms / b.p99_ms:.2f}× | {_cpu_ratio(a, b)} |"
                )
        for baseline in ("plain", "plain-h1"):
            plain = table.get((baseline, c))
            for ours in ("sidecar-session", "sidecar-bearer"):
                a = table.get((ours, c))
                if a and plain:
                    overhead = 1 - a.requests_per_sec / plain.requests_per_sec
                    lost = f"{overhead:.0%} fewer" if overhead >= 0 else f"{-overhead:.0%} more"
                    ratios.append(
                        f"| {ours} vs {baseline} proxy | {c} | {lost} req/s | "
                        f"{a.p99_ms / plain.p99_ms:.2f}× | {_cpu_ratio(a, plain)} |"
                    )
    if ratios:
        lines += [
            "",
            "| comparison | connections | req/s | p99 | CPU µs/req |",
            "|---|---:|---:|---:|---:|",
            *ratios,
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def program_version(argv: Sequence[str]) -> str:
    """The first `name/1.2.3` word a program prints about itself, or "-"."""
    path = find_binary(argv[0])
    if path is None:
        return "-"
    done = subprocess.run([path, *argv[1:]], capture_output=True, text=True, check=False)
    match = re.search(r"[\w.-]+/\d[\w.+~-]*", done.stdout + done.stderr)
    return match[0] if match else "-"


def environment(args: argparse.Namespace) -> dict[str, str]:
    import aiohttp

    openidc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "libapache2-mod-auth-openidc"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "apache": program_version(["apache2", "-v"]),
        "mod_auth_openidc": openidc or "-",
        "nginx": program_version(["nginx", "-v"]),
        "wrk": program_version(["wrk", "-v"]),
        "workers": str(args.workers),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured load first"
    )
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over the targets")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes for Apache, the plain proxy and the sidecar each",
    )
    parser.add_argument(
        "--apache-threads",
        type=int,
        default=None,
        help="threads per Apache process (mpm_event ThreadsPerChild; default: the largest"
        " --connections, so that no process runs short of threads and closes connections)",
    )
    parser.add_argument(
        "--sidecar-session-cache",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the sidecar's session.local_cache_seconds (default: its own)",
    )
    parser.add_argument(
        "--sidecar-transport",
        choices=("aiohttp", "h1"),
        default=None,
        help="the sidecar's upstream_transport (default: its own)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=TARGETS,
        metavar="TARGET",
        help=f"targets to run (default all: {' '.join(TARGETS)})",
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s: a smoke test")
    parser.add_argument("--json", type=Path, help="also write every run and the medians here")
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary directory with configs and logs",
    )
    args = parser.parse_args(argv)
    if args.apache_threads is None:
        args.apache_threads = max(args.connections)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3.0, 1.0
    if args.rounds < 1 or args.duration < 1 or args.workers < 1:
        parser.error("--rounds, --duration and --workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = set(args.only or TARGETS)
    try:
        ensure_installed(wanted)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    os.chmod(workdir, 0o755)  # Apache's children (www-data) read files here
    print(f"workdir {workdir}; everything binds {LOOPBACK} only", flush=True)
    try:
        with Processes(workdir) as procs:
            print("starting servers and logging in ...", flush=True)
            targets = start_targets(procs, wanted, args)
            print("verifying that every target authenticates:")
            for target in targets:
                verify(target)
            print(
                f"measuring: {args.rounds} round(s) × connections {args.connections} × "
                f"{len(targets)} targets, {args.duration:g} s each (+{args.warmup:g} s warm-up)"
            )
            runs = measure(procs, targets, args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"logs are in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    else:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    table = medians(runs)
    env = environment(args)
    print()
    print("Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()))
    print(
        f"Medians of {args.rounds} round(s), wrk -t{args.threads} -d{args.duration:g}s --latency\n"
    )
    print(markdown(table, args.connections))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "runs": [
                        {
                            "target": r.target,
                            "connections": r.connections,
                            "round": r.round,
                            **r.result.as_dict(),
                        }
                        for r in runs
                    ],
                    "medians": [vars(m) for m in table.values()],
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
