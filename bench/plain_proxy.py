"""A plain aiohttp + uvloop reverse proxy with no authentication: the framework's ceiling.

Forwards every request to --upstream, streaming bodies both ways over pooled keep-alive
connections, and relays websockets; --workers processes share the port with SO_REUSEPORT.
Usage: plain_proxy.py --port N --upstream http://127.0.0.1:M [--workers K] [--transport h1]

`--transport h1` sends HTTP requests through the sidecar's httptools upstream transport
(sidecar/upstream_h1.py) instead of aiohttp's ClientSession: the ceiling of that transport.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.upstream_h1 import H1Pool

# RFC 9110 7.6.1: connection-specific headers are not forwarded.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
CLIENT = web.AppKey("client", aiohttp.ClientSession)
H1 = web.AppKey("h1", H1Pool)  # --transport h1
UPSTREAM = web.AppKey("upstream", str)
TRANSPORT = web.AppKey("transport", str)


def forwarded_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    return out


async def proxy(request: web.Request) -> web.StreamResponse:
    target = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await relay_websocket(request, target)
    h1 = request.app.get(H1)
    if h1 is not None:
        return await proxy_h1(request, h1, target)
    client = request.app[CLIENT]
    body = request.content if request.body_exists else None
    async with client.request(
        request.method,
        target,
        headers=forwarded_headers(request.headers),
        data=body,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(forwarded_headers(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def proxy_h1(request: web.Request, pool: H1Pool, target: URL) -> web.StreamResponse:
    body = request.content.iter_any() if request.body_exists else None
    upstream = await pool.request(request.method, target, forwarded_headers(request.headers), body)
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(forwarded_headers(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    except BaseException:
        upstream.close()
        raise
    upstream.release()
    return response


async def relay_websocket(request: web.Request, target: URL) -> web.StreamResponse:
    client = request.app[CLIENT]
    async with client.ws_connect(target.with_scheme("ws"), max_msg_size=0) as upstream:
        downstream = web.WebSocketResponse(max_msg_size=0)
        await downstream.prepare(request)

        async def pump(source: WebSocket, sink: WebSocket) -> None:
            async for msg in source:
                if msg.type == WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                else:
                    break
            await sink.close()

        await asyncio.gather(pump(downstream, upstream), pump(upstream, downstream))
        return downstream


async def client_ctx(app: web.Application) -> AsyncIterator[None]:
    app[CLIENT] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
        skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
    )
    if app[TRANSPORT] == "h1":
        app[H1] = H1Pool(connect_timeout=10, read_timeout=300, keepalive_timeout=60)
    yield
    await app[CLIENT].close()
    if H1 in app:
        await app[H1].close()


async def serve(port: int, upstream: str, transport: str) -> None:
    app = web.Application(client_max_size=0)
    app[UPSTREAM] = upstream.rstrip("/")
    app[TRANSPORT] = transport
    app.cleanup_ctx.append(client_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def run_worker(port: int, upstream: str, transport: str) -> None:
    import uvloop

    uvloop.run(serve(port, upstream, transport))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--transport", choices=("aiohttp", "h1"), default="aiohttp")
    args = parser.parse_args()
    if args.workers <= 1:
        run_worker(args.port, args.upstream, args.transport)
        return 0
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            run_worker(args.port, args.upstream, args.transport)
            os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
