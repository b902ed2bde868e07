"""A tiny built-in upstream for `make run`: echoes what it received, and echoes websocket frames.

Never for production: it only shows a newcomer what the sync service behind the sidecar sees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import WSMsgType, web

SHOWN_HEADERS = (
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-roles",
    "x-forwarded-channels",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
)


async def echo(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws
    body = await request.read()
    return web.json_response(
        {
            "upstream": "sidecar demo upstream",
            "method": request.method,
            "path": request.raw_path,
            "body_bytes": len(body),
            "headers": {k: v for k, v in request.headers.items() if k.lower() in SHOWN_HEADERS},
        }
    )


@asynccontextmanager
async def start_demo_upstream() -> AsyncIterator[str]:
    """Serve the demo upstream on a free loopback port; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
