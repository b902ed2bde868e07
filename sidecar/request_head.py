"""The request head's Host and Transfer-Encoding, checked before anything is forwarded: values
an upstream (or a proxy between) could read differently from the sidecar are refused.
"""

from __future__ import annotations

import functools
import re
from ipaddress import IPv6Address

from multidict import MultiMapping

from sidecar.errors import BadRequest, HeaderFieldsTooLarge, Unimplemented

MAX_HEADER_SECTION = 64 * 1024  # bytes of names and values; RFC 6585 5: 431 beyond it

# RFC 9112 3.2 / RFC 3986 3.2.2-3.2.3: host [":" port], where host is a DNS-style name, an IPv4
# address or a bracketed IPv6 address. Stricter than reg-name on purpose: no "%", "@", "\\",
# "/", sub-delims, spaces or zone ids reach X-Forwarded-Host or an upstream's URL building.
_HOST = re.compile(
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]{2,45})\]|[A-Za-z0-9._~-]{1,253})(?::(?P<port>[0-9]{1,5}))?"
)


@functools.lru_cache(maxsize=256)  # a replica sees the same few Host values on every request
def valid_host(value: str) -> bool:
    """Is `value` a Host header value the sidecar vouches for (`_HOST`, port 1-65535)?"""
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    if match["ip6"] is not None:
        try:
            IPv6Address(match["ip6"])
        except ValueError:
            return False
    port = match["port"]
    return port is None or 0 < int(port) < 65536


def check_request_head(headers: MultiMapping[str], version: tuple[int, int]) -> str | None:
    """Refuse a request whose Host or framing an upstream could read differently; return its Host.

    - RFC 9112 3.2: more than one Host, or an invalid one (`valid_host`), gets 400.
    - RFC 9112 6.1: the only transfer coding understood is "chunked", alone. Any other (gzip,
      "gzip, chunked", identity...) gets 501: the sidecar re-frames the body it forwards, so an
      undecoded coding would reach the upstream as if it were the content. Transfer-Encoding in
      an HTTP/1.0 request is faulty framing: 400. An empty one is malformed: 400.
    """
    # Each field is bounded by the parser (24 KiB); the section as a whole here, before any
    # of it is forwarded. map(len) runs in C: a fraction of a µs for a usual request.
    if sum(map(len, headers.keys())) + sum(map(len, headers.values())) > MAX_HEADER_SECTION:
        raise HeaderFieldsTooLarge(
            f"request header fields too large (more than {MAX_HEADER_SECTION} bytes in all)"
        )
    hosts = headers.getall("Host", ())  # names compare case-insensitively, as HTTP's do
    encodings = headers.getall("Transfer-Encoding", ())
    codings = (
        [c.strip().lower() for value in encodings for c in value.split(",") if c.strip()]
        if encodings
        else None
    )
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    if hosts and not valid_host(hosts[0]):
        raise BadRequest("invalid Host header")
    if codings is not None:
        if tuple(version) < (1, 1):
            raise BadRequest("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if not codings:
            raise BadRequest("empty Transfer-Encoding")
        if codings != ["chunked"]:
            raise Unimplemented("unsupported transfer coding: only chunked is implemented")
    return hosts[0] if hosts else None
