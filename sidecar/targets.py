"""The request target sent upstream: the client's bytes exactly, or a 400 when an upstream that
decodes or normalises differently from the sidecar could read it as a path outside `/{db}/`.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote_to_bytes

from yarl import URL

from sidecar.errors import BadRequest

# Where a decoding upstream may split segments: "/" and, on some servers, "\" (IIS, Windows,
# some Java and Node stacks), whether they arrived raw or percent-encoded.
_SEPARATORS = re.compile(rb"[/\\]")
_DOTS = (b".", b"..")
# What a request target may hold as is: visible ASCII but "#"; everything else must arrive
# percent-encoded.
_MUST_BE_ENCODED = re.compile(r"[^\x21\x22\x24-\x7e]")


def _decoded(path: str) -> bytes:
    """`path` percent-decoded until nothing changes (`%252e` -> `%2e` -> `.`).

    Security: an upstream (or a chain of them) may decode more than once; checking every
    level at once means no level can hide a dot segment. Each round shortens the text, so it ends.
    """
    data = path.encode("utf-8")
    while b"%" in data:
        decoded = unquote_to_bytes(data)
        if decoded == data:
            break
        data = decoded
    return data


def _is_dot_segment(segment: bytes) -> bool:
    # Path parameters (RFC 3986 3.3): Tomcat, Jetty and Spring drop ";..." from each segment,
    # so "..;jsessionid=x" and "..;" are ".." to them.
    return segment.split(b";", 1)[0] in _DOTS


def check_path(path: str) -> None:
    """Refuse a path an upstream could resolve somewhere else than the sidecar routed it.

    Refused: dot segments in any reading (raw, percent-encoded at any depth, behind an encoded
    `/` or `\\`, with `;` parameters), a raw backslash, and NUL at any depth of encoding. Encoded
    slashes alone stay: `/db/a%2Fb` is a document id in CouchDB and Sync Gateway.
    """
    if "\\" in path:
        raise BadRequest("request path contains a backslash")
    if "%" not in path and "." not in path:
        return  # the common case: nothing to decode, no dot anywhere
    decoded = _decoded(path)
    if b"\0" in decoded:
        raise BadRequest("request path contains NUL")
    if not decoded.isascii():
        decoded = _folded(decoded)
    if b"." in decoded and any(_is_dot_segment(s) for s in _SEPARATORS.split(decoded)):
        raise BadRequest("request path contains dot segments")


def _folded(decoded: bytes) -> bytes:
    """A non-ASCII path as an upstream that normalises Unicode would read it.

    Security: overlong UTF-8 (`%C0%AE` for "."; never valid UTF-8, but some decoders accept
    it) is refused; NFKC folds full-width and other compatibility forms ("．", "／", "＼") into
    the ASCII dots and separators they stand for, so they are checked as those."""
    if b"\xc0" in decoded or b"\xc1" in decoded:
        raise BadRequest("request path contains overlong UTF-8")
    text = decoded.decode("utf-8", "replace")
    return unicodedata.normalize("NFKC", text).encode("utf-8")


def target_url(base: str, path_qs_raw: str, db: str | None = None) -> URL:
    """`base` (the upstream's URL) joined with the raw request target, byte for byte.

    Nothing is decoded, re-quoted or normalised: "%2F" in a document ID stays "%2F" (only an
    empty query, a bare trailing "?", is dropped by yarl). Targets the upstream could read
    differently from the sidecar's own routing are refused instead (`check_path`). With `db`,
    the first segment must also name that database once decoded, as the router read it.
    """
    path, _, _ = path_qs_raw.partition("?")
    if not path.startswith("/"):
        raise BadRequest("request target must be an absolute path")
    if _MUST_BE_ENCODED.search(path_qs_raw):
        raise BadRequest("request target contains characters that must be percent-encoded")
    check_path(path)
    if db is not None:
        first = path[1:].partition("/")[0]
        # Security: "/db%2F../x" must not reach the upstream as something the router did not
        # take for database "db" (aiohttp's router decodes the segment once, as upstreams do).
        if first != db and unquote_to_bytes(first) != db.encode():
            raise BadRequest("request path does not start with the database name")
    return URL(base.rstrip("/") + path_qs_raw, encoded=True)
