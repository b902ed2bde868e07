"""The upstream for the websocket and memory benchmarks (aiohttp + uvloop, run as a child process).

  GET  any path, websocket upgrade   echoes every text and binary message
  GET  .../download?bytes=N           streams N bytes
  PUT|POST any path                   reads the body, answers {"bytes": n}; ?pause_after=B&pause=S
                                      stops reading for S seconds after B bytes (a slow upstream)
  anything else                       200 "ok"
Usage: upstreams.py --port N
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import WSMsgType, web

CHUNK = 256 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)


async def handle(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await echo(request)
    if request.method in ("PUT", "POST"):
        return await sink(request)
    if request.path.endswith("/download"):
        return await source(request)
    return web.Response(text="ok")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def sink(request: web.Request) -> web.Response:
    pause_after = int(request.query.get("pause_after", "-1"))
    pause = float(request.query.get("pause", "0"))
    received = 0
    paused = False
    async for chunk in request.content.iter_any():
        received += len(chunk)
        if not paused and 0 <= pause_after <= received:
            paused = True
            await asyncio.sleep(pause)  # the client's bytes must wait somewhere: not in RAM
    return web.json_response({"bytes": received})


async def source(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("bytes", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    left = size
    while left > 0:
        piece = _BLOCK if left >= CHUNK else _BLOCK[:left]
        await response.write(piece)  # waits while the proxy does not read: backpressure
        left -= len(piece)
    await response.write_eof()
    return response


async def serve(port: int) -> None:
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
