"""Request targets: forwarded byte for byte, or refused when an upstream decoding or normalising
differently could resolve them outside /{db}/."""

from __future__ import annotations

import pytest

from sidecar.errors import BadRequest
from sidecar.targets import target_url


@pytest.mark.parametrize(
    ("base", "raw", "expected"),
    [
        (
            "http://sg:4984",
            "/db/doc%2Fid;rev=1?q=%2F&r=a+b;c",
            "http://sg:4984/db/doc%2Fid;rev=1?q=%2F&r=a+b;c",
        ),
        ("http://sg:4984/", "/db/%7E/%e2%9c%93", "http://sg:4984/db/%7E/%e2%9c%93"),
        ("http://sg:4984/prefix/", "/db/a%2fb", "http://sg:4984/prefix/db/a%2fb"),
        ("http://sg:4984", "//evil.example/x", "http://sg:4984//evil.example/x"),
        ("http://sg:4984", "/db/..doc/...", "http://sg:4984/db/..doc/..."),
        ("http://sg:4984", "/db/x?path=/../&a=%2e%2e", "http://sg:4984/db/x?path=/../&a=%2e%2e"),
    ],
)
def test_target_url_keeps_raw_target(base: str, raw: str, expected: str) -> None:
    url = target_url(base, raw)
    assert str(url) == expected
    assert url.host == "sg" and url.port == 4984


# Legitimate targets: document ids with encoded slashes, dots that are not segments, path
# parameters away from dot segments, anything in the query. Forwarded exactly as sent.
LEGITIMATE = [
    "/db",
    "/db/",
    "/db/a%2Fb",
    "/db/a%2fb",
    "/db/a%2F%2Fb",
    "/db/a%5Cb",  # an encoded backslash alone is a document id character
    "/db/%2F",
    "/db/a.b",
    "/db/.hidden",
    "/db/...",
    "/db/..a",
    "/db/a..",
    "/db/a%2F...%2Fb",
    "/db/%2e%2e%2e",
    "/db/x;rev=1",
    "/db/x;y/z",
    "/db/_local/a%2Fb",
    "/db/a%25b",
    "/db/a%252Fb",
    "/db/100%25",
    "/db/_design/d/_view/v?startkey=%22..%2F%22",
    "/db/x?a=..%2F..%2F&b=%00&c=\\",
    "/%64b/x",  # "%64" is "d": the router and the upstream both read "db"
    "/d%62",
    "/db/caf%C3%A9",  # non-ASCII document ids stay
    "/db/%E2%80%A6",  # "…" folds to "...": not a dot segment
    "/db/%EF%BC%8E%EF%BC%8E%EF%BC%8E",  # full-width "..." likewise
]


@pytest.mark.parametrize("raw", LEGITIMATE)
def test_legitimate_targets_pass_byte_for_byte(raw: str) -> None:
    assert str(target_url("http://sg:4984", raw, "db")) == "http://sg:4984" + raw


# (raw target, reason)
DOT = "request path contains dot segments"
HOSTILE: list[tuple[str, str]] = [
    ("http://evil.example/x", "request target must be an absolute path"),
    ("db/x", "request target must be an absolute path"),
    ("", "request target must be an absolute path"),
    ("@evil.example/x", "request target must be an absolute path"),
    ("/a b", "request target contains characters that must be percent-encoded"),
    ("/a\tb", "request target contains characters that must be percent-encoded"),
    ("/a#frag", "request target contains characters that must be percent-encoded"),
    ("/café", "request target contains characters that must be percent-encoded"),
    # raw dot segments
    ("/db/../_users", DOT),
    ("/db/./x", DOT),
    ("/db/x/..", DOT),
    ("/db/x/.", DOT),
    ("/db/..", DOT),
    # encoded dot segments, any case, any depth
    ("/db/%2e%2E/x", DOT),
    ("/db/.%2e", DOT),
    ("/db/%2E", DOT),
    ("/db/%2e./x", DOT),
    ("/db/%252e%252e/x", DOT),
    ("/db/%25252E%25252E/x", DOT),
    ("/db/%2525%32%65%2e/x", DOT),  # "%25" + "%32" + "%65" decodes to "%2e"
    # look-alikes an upstream normalising Unicode or decoding overlong UTF-8 reads as dots
    ("/db/%C0%AE%C0%AE/x", "request path contains overlong UTF-8"),
    ("/db/%c0%2e/x", "request path contains overlong UTF-8"),
    ("/db/%C1%9C", "request path contains overlong UTF-8"),
    ("/db/%EF%BC%8E%EF%BC%8E/x", DOT),  # full-width dots
    ("/db/x%EF%BC%8F..%EF%BC%8Fy", DOT),  # full-width solidus around ".."
    ("/db/x%EF%BC%BC..", DOT),  # full-width reverse solidus
    # encoded "/" or "\" combined with dot segments
    ("/db/..%2f_users", DOT),
    ("/db/..%2F_users", DOT),
    ("/db/x%2F..%2F..%2F_users", DOT),
    ("/db/%2e%2e%2f_users", DOT),
    ("/db/..%5c_users", DOT),
    ("/db/..%5C..%5C_users", DOT),
    ("/db/a%252F..%252Fb", DOT),
    ("/db/%2f.", DOT),
    # ";" path parameters on or around dot segments (Tomcat, Jetty, Spring)
    ("/db/..;/_users", DOT),
    ("/db/..;jsessionid=x/_users", DOT),
    ("/db/.;/x", DOT),
    ("/db/.;x=1/x", DOT),
    ("/db/%2e%2e;/x", DOT),
    ("/db/..%3b/x", DOT),
    ("/db/..%3Bjsessionid=1/x", DOT),
    ("/db/x/..;", DOT),
    # NUL anywhere in the path, at any depth
    ("/db/%00", "request path contains NUL"),
    ("/db/x%00.json", "request path contains NUL"),
    ("/db/%2500", "request path contains NUL"),
    ("/db%00/x", "request path contains NUL"),
    # backslash
    ("/db/x\\..\\_users", "request path contains a backslash"),
    ("/db/a\\b", "request path contains a backslash"),
    ("/db\\x", "request path contains a backslash"),
    # the database segment must be the one routed
    ("/db%2F../x", DOT),
    ("/db%2Fx/y", "request path does not start with the database name"),
    ("/db;x/y", "request path does not start with the database name"),
    ("/other/x", "request path does not start with the database name"),
    ("/%64%62%2f/x", "request path does not start with the database name"),
    ("/DB/x", "request path does not start with the database name"),
]


@pytest.mark.parametrize(("raw", "reason"), HOSTILE)
def test_hostile_targets_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        target_url("http://sg:4984", raw, "db")
    assert caught.value.status == 400
    assert caught.value.reason == reason
