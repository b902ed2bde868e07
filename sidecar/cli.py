"""`sidecar run|check-config`: load the config, then serve the public and admin listeners."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import web

from sidecar import __version__, keys
from sidecar.admin_auth import exposure_warning
from sidecar.config import ConfigError, Settings, load_settings
from sidecar.observability import setup_logging
from sidecar.supervisor import EXIT_CANNOT_START, RestartPolicy, Supervisor

log = logging.getLogger("sidecar")


def split_listen(value: str) -> tuple[str | None, int]:
    """`host:port` or `:port` (all interfaces, as Sync Gateway) → (host, port)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    return (host or None), int(port)


class CannotListen(Exception):
    """A listener's address cannot be bound (in use, not permitted, unknown host)."""

    def __init__(self, listen: str, exc: OSError) -> None:
        # The event loop's strerror repeats the address; the errno's own words do not.
        code = exc.errno or 0  # getaddrinfo's are negative
        reason = os.strerror(code) if code > 0 else exc.strerror or str(exc)
        super().__init__(f"cannot listen on {listen}: {reason[:1].lower()}{reason[1:]}")


async def serve(settings: Settings, *, supervisor: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain. A worker of `--workers N` (`supervisor`: its
    supervisor's pid) shares its ports with its siblings (SO_REUSEPORT) and drains by itself
    when its supervisor is gone."""
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
        site = web.TCPSite(r, host, port, reuse_port=supervisor is not None or None, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await admin_runner.cleanup()
            raise CannotListen(listen, exc) from None
        sites.append(site)
    app[keys.LIFECYCLE].listening.set()
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
    watch = None if supervisor is None else asyncio.ensure_future(_watch(supervisor, stop))
    await stop.wait()
    if watch is not None:
        watch.cancel()

    # Drain: readiness turns false, new connections are refused, in-flight requests finish
    # within the grace, websockets are told 1001 (going away).
    log.info("shutting down", extra={"grace_seconds": grace, "pid": os.getpid()})
    app[keys.LIFECYCLE].draining = True
    await sites[0].stop()
    await app[keys.EXCHANGES].close_all()
    await runner.cleanup()
    await admin_runner.cleanup()
    log.info("stopped", extra={"pid": os.getpid()})


async def _watch(supervisor: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor is gone (killed with SIGKILL) must not serve on unsupervised."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 (no event tells us; polled, cheaply)
        await asyncio.sleep(1)
    log.error("the supervisor is gone; stopping")
    stop.set()


def check_listen(listen: str) -> None:
    """Raises CannotListen unless every address of `listen` can be bound by a worker (with
    SO_REUSEPORT, as the workers bind): the supervisor says it once, before any starts."""
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise CannotListen(listen, exc) from None


def _run_workers(args: argparse.Namespace, settings: Settings) -> int:
    """N processes on one port (SO_REUSEPORT): this process supervises, each child serves."""
    if settings.session_store is None:
        print(
            "sidecar: --workers > 1 needs session_store (Redis): "
            "each worker would have its own sessions",
            file=sys.stderr,
        )
        return 2
    try:
        check_listen(settings.interface)
        check_listen(settings.admin_interface)
    except CannotListen as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", args.config]
    cmd += ["--worker-of", str(os.getpid())]
    policy = RestartPolicy(limit=args.restart_limit, window=args.restart_window)
    return Supervisor(cmd, args.workers, policy).run()


def _load(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None


DESCRIPTION = """\
An OpenID Connect auth sidecar: a reverse proxy that lets only signed-in users through to a
sync service (Couchbase Sync Gateway, CouchDB, Yjs, ...). It speaks Sync Gateway's login
protocol (/{db}/_oidc, /{db}/_session) on the public listener and serves health, metrics and
the admin API on the admin listener."""

EXAMPLES = """\
examples:
  sidecar check-config sidecar.yaml          list every problem in a config file
  sidecar run --config sidecar.yaml          serve (stop with SIGTERM or Ctrl-C: drains)
  sidecar run --config sidecar.yaml --workers 4
                                             4 processes on one port (needs session_store)

exit codes: 0 stopped as asked; 1 the workers crash-looped; 2 bad usage or configuration
(also bare `sidecar`, which prints this help); 3 cannot listen on an address.
Documentation: README.md (configuration reference, Kubernetes, metrics)."""

RUN_HELP = """\
Serve the public listener (`interface`, default :4984) and the admin listener
(`admin_interface`, default 127.0.0.1:4985) until SIGTERM or Ctrl-C, then drain: readiness
turns false, new connections are refused, requests in flight get `shutdown_grace_seconds`,
websockets are closed with 1001."""

WORKERS_HELP = """\
With --workers N, N processes share the ports and this process supervises them: a worker
that dies is restarted after a backoff (0.5 s, doubling, at most 10 s) while the others keep
serving; --restart-limit deaths within --restart-window seconds are a crash loop and stop
the whole set with a non-zero exit. /_metrics on any worker shows the whole set."""


def _parser() -> argparse.ArgumentParser:
    def fmt(prog: str) -> argparse.HelpFormatter:
        return argparse.RawDescriptionHelpFormatter(prog, max_help_position=28)

    parser = argparse.ArgumentParser(
        prog="sidecar", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=fmt
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="serve, with the configuration from --config",
        description=RUN_HELP,
        epilog=WORKERS_HELP,
        formatter_class=fmt,
    )
    run.add_argument("--config", required=True, metavar="FILE", help="the YAML configuration")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes serving the same ports (default 1; more than 1 needs session_store)",
    )
    run.add_argument(
        "--restart-limit",
        type=int,
        default=RestartPolicy.limit,
        metavar="K",
        help=f"worker deaths that make a crash loop (default {RestartPolicy.limit})",
    )
    run.add_argument(
        "--restart-window",
        type=float,
        default=RestartPolicy.window,
        metavar="SECONDS",
        help=f"... within this many seconds (default {RestartPolicy.window:g})",
    )
    run.add_argument("--worker-of", type=int, metavar="PID", help=argparse.SUPPRESS)
    check = sub.add_parser(
        "check-config",
        help="validate a configuration file and list every problem (exit 2 if any)",
        description="Validate FILE without starting anything (no network): print `FILE: ok` "
        "(exit 0), or one line per problem, each naming its YAML path (exit 2).",
    )
    check.add_argument("config", metavar="FILE", help="the YAML configuration")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `sidecar`: a usage error, answered with the help
        parser.print_help()
        return 2
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
    supervised = args.worker_of is not None  # the supervisor has said it for the set
    if exposed and not supervised:
        log.warning(exposed)
    if settings.unsupported.oidc_test_provider.enabled and not supervised:
        log.warning(
            "THE BUILT-IN TEST PROVIDER IS ENABLED: anyone can log in as anyone. "
            "Never run this configuration in production."
        )
    if args.workers < 1:  # after the start-up warnings (a test runs up to them this way)
        parser.error("--workers must be at least 1")
    if args.restart_limit < 1 or args.restart_window <= 0:
        parser.error("--restart-limit must be at least 1 and --restart-window positive")
    if args.workers > 1:
        return _run_workers(args, settings)
    try:
        _run(serve(settings, supervisor=args.worker_of))
    except CannotListen as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
