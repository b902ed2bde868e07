"""The request head: Host values (RFC 9112 3.2) and transfer codings (RFC 9112 6.1)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import BadRequest, HeaderFieldsTooLarge, Unimplemented
from sidecar.request_head import check_request_head, valid_host

Pairs = list[tuple[str, str]]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("sync.example.com", True),
        ("sync.example.com:443", True),
        ("127.0.0.1:4984", True),
        ("[::1]:4984", True),
        ("[2001:db8::1]", True),
        ("localhost", True),
        ("my_host.internal", True),
        ("a" * 253, True),
        ("", False),
        ("a b", False),
        ("a\tb", False),
        ("evil.example/x", False),
        ("user@evil.example", False),
        ("a\\b", False),
        ("<script>", False),
        ('a"b', False),
        ("a,b", False),
        ("a;b", False),
        ("%65vil.example", False),
        ("é.example", False),
        ("a\x01", False),
        ("a\x7f", False),
        ("host:", False),
        ("host:0", False),
        ("host:65536", False),
        ("host:99999", False),
        ("host:123456", False),
        ("host:-1", False),
        ("host:80:80", False),
        ("host:http", False),
        ("[::1", False),
        ("::1", False),
        ("[fe80::1%25eth0]", False),
        ("[not:an:ip:x]", False),
        ("[v1.future]", False),
        ("a" * 254, False),
        ("host\n", False),
    ],
)
def test_valid_host(value: str, ok: bool) -> None:
    assert valid_host(value) is ok


@pytest.mark.parametrize(
    ("pairs", "version", "error"),
    [
        ([("Host", "h")], (1, 1), None),
        ([], (1, 0), None),
        ([("Host", "h"), ("Transfer-Encoding", "chunked")], (1, 1), None),
        ([("Host", "h"), ("Transfer-Encoding", "Chunked")], (1, 1), None),
        ([("Host", "h"), ("Transfer-Encoding", ",chunked")], (1, 1), None),
        ([("Host", "h"), ("Transfer_Encoding", "gzip")], (1, 1), None),  # look-alike: dropped
        ([("Host", "a"), ("Host", "a")], (1, 1), BadRequest),
        ([("Host", "a"), ("host", "b")], (1, 1), BadRequest),
        ([("Host", "a b")], (1, 1), BadRequest),
        ([("Host", "")], (1, 1), BadRequest),
        ([("Host", "h"), ("Transfer-Encoding", "gzip, chunked")], (1, 1), Unimplemented),
        ([("Host", "h"), ("Transfer-Encoding", "deflate,chunked")], (1, 1), Unimplemented),
        ([("Host", "h"), ("Transfer-Encoding", "gzip")], (1, 1), Unimplemented),
        ([("Host", "h"), ("Transfer-Encoding", "identity")], (1, 1), Unimplemented),
        ([("Host", "h"), ("Transfer-Encoding", "chunked, chunked")], (1, 1), Unimplemented),
        (
            [("Host", "h"), ("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
            (1, 1),
            Unimplemented,
        ),
        ([("Host", "h"), ("Transfer-Encoding", "chunked;x=1")], (1, 1), Unimplemented),
        ([("Host", "h"), ("Transfer-Encoding", "")], (1, 1), BadRequest),
        ([("Host", "h"), ("Transfer-Encoding", " , ")], (1, 1), BadRequest),
        ([("Host", "h"), ("Transfer-Encoding", "chunked")], (1, 0), BadRequest),
    ],
)
def test_check_request_head(
    pairs: Pairs, version: tuple[int, int], error: type[Exception] | None
) -> None:
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    if error is None:
        assert check_request_head(headers, version) == headers.get("Host")
    else:
        with pytest.raises(error):
            check_request_head(headers, version)


@pytest.mark.parametrize(
    ("fields", "size", "refused"),
    [
        (8, 1024, False),
        (60, 1000, False),  # 60 KB of values and names: under 64 KiB
        (100, 8 * 1024, True),  # 800 KiB in all, each field under the parser's 24 KiB
        (3, 23 * 1024, True),
    ],
)
def test_the_header_section_as_a_whole_is_bounded(fields: int, size: int, refused: bool) -> None:
    headers = CIMultiDictProxy(
        CIMultiDict(
            [("Host", "sync.example.com")] + [(f"X-F{i}", "v" * size) for i in range(fields)]
        )
    )
    if refused:
        with pytest.raises(HeaderFieldsTooLarge):
            check_request_head(headers, (1, 1))
    else:
        assert check_request_head(headers, (1, 1)) == "sync.example.com"
