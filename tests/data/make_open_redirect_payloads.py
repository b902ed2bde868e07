"""Writes open_redirect_payloads.txt: the return-target corpus of tests/test_browser.py.

The patterns are those of the published open-redirect payload lists (PayloadsAllTheThings'
"Open Redirect", cujanovic's Open-Redirect-Payloads, the oauth2-proxy and mod_auth_openidc
advisories): protocol-relative and slash/backslash mixes, encoded and double-encoded forms,
whitespace and control characters, script schemes, user info, IP encodings, Unicode
look-alikes, dot tricks — each against the attacker's host, spelled several ways.

Each line is `<verdict> <JSON string>`: `refuse` (safe_return_target must answer None) or
`accept` (it must answer the payload unchanged). The allow-list used is ALLOWED below.
Run `python tests/data/make_open_redirect_payloads.py` after changing it.
"""

from __future__ import annotations

import json
from pathlib import Path

ALLOWED = ("https://app.example.com", "http://localhost:8080")
EVIL = "evil.com"

# How the attacker's host is spelled after the prefix.
HOSTS = (
    EVIL,
    f"{EVIL}/",
    f"{EVIL}/%2f..",
    f"{EVIL}?app.example.com",
    f"{EVIL}#app.example.com",
    f"{EVIL}%23app.example.com",
    f"{EVIL}%2f%2e%2e",
    f"app.example.com.{EVIL}",
    f"app.example.com@{EVIL}",
    f"app.example.com%40{EVIL}",
    f"{EVIL}@app.example.com",
    f"{EVIL}\\@app.example.com",
    f"app.example.com:443@{EVIL}",
    "evil%E3%80%82com",  # ideographic full stop, encoded
    "evil\u3002com",  # ideographic full stop
    "\u24d4\u24e5\u24d8\u24db.com",  # circled letters
    "ev\u0131l.com",  # dotless i
    "2130706433",  # 127.0.0.1 as one decimal number
    "0x7f000001",
    "0x7f.1",
    "0177.0.0.1",
    "127.1",
    "[::1]",
    "[::ffff:7f00:1]",
    "3627734734",  # an outside address as one number
    "0xd8.0x3a.0xd6.0xe3",
    "%65%76%69%6c%2e%63%6f%6d",  # evil.com, every byte encoded
    "localhost:8080@evil.com",
)

# What comes before the host: the tricks themselves.
PREFIXES = (
    "//",
    "///",
    "////",
    "/////",
    "/\\",
    "/\\/",
    "\\\\",
    "\\/",
    "\\/\\/",
    "/\\\\",
    "//\\",
    "\\",
    "/%2f",
    "/%2F",
    "/%2f%2f",
    "%2f%2f",
    "/%5c",
    "/%5C",
    "%5c%5c",
    "/%252f",
    "/%252f%252f",
    "/%255c",
    "/%25252f",
    "/%09/",
    "/%0a/",
    "/%0d/",
    "/%0d%0a/",
    "/%00/",
    "/%20/",
    "/%2509/",
    "/\t/",
    "/\n/",
    "/\r\n/",
    "/ /",
    " //",
    "\t//",
    "//\t",
    "// ",
    "/.",
    "/..",
    "/./",
    "/../",
    "/..//",
    "/%2e%2e//",
    "/%2e/",
    "/..;/",
    "/@",
    "@",
    "https:",
    "https:/",
    "https:\\\\",
    "https:/\\",
    "https:\\/",
    "https://",
    "http://",
    "HTTPS://",
    "hTtP://",
    "https:///",
    "https:%2f%2f",
    "https%3a%2f%2f",
    "https%253a%252f%252f",
    "ftp://",
    "ws://",
    "//%5c",
    "/%5c%5c",
    "%09//",
    "\u3000//",  # ideographic space
    "\uff0f\uff0f",  # fullwidth solidus twice
    "/\uff0f",
    "%EF%BC%8F%EF%BC%8F",
    "/%EF%BC%8F",
    "\u2215\u2215",  # division slash
    "/\u2044",  # fraction slash
    "\u29f8\u29f8",  # big solidus
    "/\\\t/",
    "/%5c%09/",
    "/%2f%09",
)

# Whole payloads the prefix × host grid does not produce.
EXTRA_REFUSED = (
    "",
    "evil.com",
    "www.evil.com",
    "/" * 3,
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "javascript://%0aalert(1)",
    "javascript://app.example.com/%0aalert(1)",
    "java%0ascript:alert(1)",
    "java\tscript:alert(1)",
    "java\nscript:alert(1)",
    " javascript:alert(1)",
    "javascript&colon;alert(1)",
    "%6a%61%76%61%73%63%72%69%70%74:alert(1)",
    "\x01javascript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)",
    "file:///etc/passwd",
    "about:blank",
    "blob:https://app.example.com/uuid",
    "mailto:a@evil.com",
    "%0d%0aLocation:%20http://evil.com",
    "/%0d%0aSet-Cookie:%20a=b",
    "/db/%0d%0aSet-Cookie:a=b",
    "/db/doc\r\nSet-Cookie: a=b",
    "/db/doc%250d%250aSet-Cookie:a=b",
    "/db/%00",
    "/db/\x7f",
    "/db/doc\x00",
    "/db/doc with space",
    "/db/caf\u00e9",
    "/db/\u200bdoc",
    "/\u202eelgoog",
    "/db\\doc",
    "/db/doc\\..\\..\\evil.com",
    "/db/%5c%5cevil.com",
    "/db/../../evil.com",
    "/db/%2e%2e/%2e%2e//evil.com",
    "/db/./doc",
    "/db/..",
    "/.",
    "/..",
    "/%2e%2e",
    "/.well-known/x",
    "/.evil.com/db",
    "/@evil.com",
    "/evil.com@app.example.com/",
    "/%40evil.com",
    "/%2fevil.com",
    "/%5Cevil.com",
    "/\uff0fevil.com",
    "/%EF%BC%8Fevil.com",
    "/%E3%80%82evil.com",
    "/" + "a" * 2048,
    "https://app.example.com:8443/",
    "https://app.example.com./",
    "https://app.example.co/",
    "https://app.example.com.evil.com/",
    "https://evil.com/https://app.example.com/",
    "https://evil.com?https://app.example.com",
    "https://evil.com#https://app.example.com",
    "http://app.example.com/",
    "https://app.example.com:0443/",
    "https://app.example.com:+443/",
    "https://app.example.com:443:443/",
    "https://app.example.com:65536/",
    "https://app.example.com:/",
    "https://user@app.example.com/",
    "https://user:pass@app.example.com/",
    "https://app.example.com%2f@evil.com/",
    "https://app.example.com\\@evil.com/",
    "https://app.example.com/\\evil.com",
    "https://app.example.com/%5cevil.com",
    "https://app.example.com/%0d%0aLocation:evil",
    "https://app.example.com/%250d%250a",
    "https://app.example.com\t/",
    "https://app.example.com /",
    "https://app.exam\u0440le.com/",  # Cyrillic er
    "https://xn--app-example-xyz.com/",
    "https://APP.EXAMPLE.COM:443@evil.com/",
    "https://[::1]/",
    "https://%61pp.example.com/",
    "https:app.example.com",
    "https:/app.example.com",
    "https:///app.example.com",
    "//app.example.com",
    "///app.example.com/",
    "\\\\app.example.com",
    "http://localhost/",
    "http://localhost:80/",
    "http://localhost:08080/",
    "http://localhost:8081/",
    "https://localhost:8080/",
    "http://127.0.0.1:8080/",
    "http://localhost.:8080/",
    "http://localhost:8080\\@evil.com/",
    "http://localhost:8080.evil.com/",
    "http://evil.com:8080/",
    "ws://localhost:8080/",
)

ACCEPTED = (
    "/",
    "/db/",
    "/db/doc1",
    "/db/doc1?rev=1-abc",
    "/db/_all_docs?include_docs=true&limit=10",
    "/db/_changes?feed=longpoll&since=0",
    "/db/doc%2Fwith%2Fslashes",
    "/db/caf%C3%A9",
    "/db/user@example.com",
    "/db/a:b",
    "/db/doc..name",
    "/db/doc.json",
    "/app/index.html#/route",
    "/app/?q=a%20b",
    "/db/doc?next=//evil.com",  # a same-origin page; what it does with `next` is its own affair
    "/prefix/db/page",
    "https://app.example.com",
    "https://app.example.com/",
    "https://app.example.com/path?x=1#frag",
    "https://APP.example.com/x",
    "HTTPS://app.example.com/",
    "https://app.example.com:443/x",
    "http://localhost:8080",
    "http://localhost:8080/",
    "http://LOCALHOST:8080/db/page?x=//evil.com",
)


def corpus() -> list[tuple[str, str]]:
    seen: set[str] = set()
    lines: list[tuple[str, str]] = []
    refused = [p + h for p in PREFIXES for h in HOSTS] + list(EXTRA_REFUSED)
    for verdict, payloads in (("refuse", refused), ("accept", list(ACCEPTED))):
        for payload in payloads:
            if payload not in seen:
                seen.add(payload)
                lines.append((verdict, payload))
    return lines


def main() -> None:
    out = Path(__file__).with_name("open_redirect_payloads.txt")
    header = [
        "# Open-redirect corpus for safe_return_target (tests/test_browser.py).",
        "# Generated by make_open_redirect_payloads.py; allow-list: " + " ".join(ALLOWED),
        "# <verdict> <JSON string>: refuse = must answer None, accept = must answer it unchanged",
    ]
    body = [f"{verdict} {json.dumps(payload)}" for verdict, payload in corpus()]
    out.write_text("\n".join(header + body) + "\n")


if __name__ == "__main__":
    main()
