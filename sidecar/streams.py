"""Bounded reads of bodies (ours, the providers', the clients'), and JSON-object request bodies.

`StreamReader.read(n)` returns whatever has arrived, not n bytes, so a body split across
packets must be read to its end; these helpers do that without letting it fill memory.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.errors import BadRequest

CHUNK = 64 * 1024


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole stream, or None as soon as it holds more than `limit` bytes."""
    body = bytearray()
    async for chunk in stream.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def read_json_object(request: web.Request, *, limit: int = 64 * 1024) -> dict[str, Any]:
    """A request body that must be a JSON object; an empty body is `{}`. 400 otherwise."""
    if not request.can_read_body:
        return {}
    raw = await read_bounded(request.content, limit)
    if raw is None:
        raise BadRequest("body too large")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body
