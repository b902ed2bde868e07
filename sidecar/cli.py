"""`sidecar run|check-config`: load the config, then serve the public and admin listeners."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from aiohttp import web

from sidecar import keys
from sidecar.admin_auth import exposure_warning
from sidecar.config import ConfigError, Settings, load_settings
from sidecar.observability import setup_logging

log = logging.getLogger("sidecar")


def split_listen(value: str) -> tuple[str | None, int]:
    """`host:port` or `:port` (all interfaces, as Sync Gateway) → (host, port)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    return (host or None), int(port)


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    from sidecar.app import create_admin_app, create_app, make_runner

    app = create_app(settings)
    admin = create_admin_app(app)
    grace = settings.shutdown_grace_seconds
    runner = make_runner(app, shutdown_timeout=grace)
    admin_runner = make_runner(admin, shutdown_timeout=1)
    await runner.setup()  # opens the store, the HTTP clients, the provider refreshers
    await admin_runner.setup()
    sites = []
    for r, listen in ((runner, settings.interface), (admin_runner, settings.admin_interface)):
        host, port = split_listen(listen)
        site = web.TCPSite(r, host, port, reuse_port=reuse_port or None, backlog=1024)
        await site.start()
        sites.append(site)
    log.info(
        "sidecar listening",
        extra={
            "interface": settings.interface,
            "admin_interface": settings.admin_interface,
            "pid": os.getpid(),
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    # Drain: readiness turns false, new connections are refused, in-flight requests finish
    # within the grace, websockets are told 1001 (going away).
    log.info("shutting down", extra={"grace_seconds": grace})
    app[keys.LIFECYCLE].draining = True
    await sites[0].stop()
    await app[keys.EXCHANGES].close_all()
    await runner.cleanup()
    await admin_runner.cleanup()
    log.info("stopped")


def _run_workers(args: argparse.Namespace, settings: Settings) -> int:
    """N processes on one port (SO_REUSEPORT): this process supervises, each child serves."""
    if settings.session_store is None:
        print(
            "--workers > 1 needs session_store (Redis): each worker would have its own sessions",
            file=sys.stderr,
        )
        return 2
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", args.config, "--reuse-port"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Handlers first: a SIGTERM during the spawn must not orphan the workers started so far.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    children.extend(subprocess.Popen(cmd) for _ in range(args.workers))  # noqa: S603
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    died = not stopping
    if died:
        # A worker exited on its own (crash, OOM kill): stop the others and fail, so the
        # orchestrator restarts the whole set rather than keep a silently degraded one.
        log.error("a worker exited unexpectedly; stopping the others")
        forward(signal.SIGTERM, None)
    codes = [_exit_code(child.wait()) for child in children]
    return max(codes, default=0) or (1 if died else 0)


def _exit_code(returncode: int) -> int:
    """A worker's exit status as the supervisor reports it.

    Killed by SIGTERM/SIGINT means it stopped as told (one still starting has no handler yet);
    killed by another signal reports 128 + signum, as a shell would.
    """
    if returncode in (-signal.SIGTERM, -signal.SIGINT):
        return 0
    return 128 - returncode if returncode < 0 else returncode


def _load(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve")
    run.add_argument("--config", required=True, help="path to sidecar.yaml")
    run.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate a config file and list every problem")
    check.add_argument("config")
    args = parser.parse_args(argv)

    settings = _load(args.config)
    if settings is None:
        return 2
    exposed = exposure_warning(settings)
    if args.command == "check-config":
        if exposed:
            print(f"warning: {exposed}", file=sys.stderr)
        print(f"{args.config}: ok ({len(settings.databases)} database(s))")
        return 0
    setup_logging(settings.logging.format, settings.logging.level)
    if exposed:
        log.warning(exposed)
    if settings.unsupported.oidc_test_provider.enabled:
        log.warning(
            "THE BUILT-IN TEST PROVIDER IS ENABLED: anyone can log in as anyone. "
            "Never run this configuration in production."
        )
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1:
        return _run_workers(args, settings)
    try:
        import uvloop

        uvloop.run(serve(settings, reuse_port=args.reuse_port))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(settings, reuse_port=args.reuse_port))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
