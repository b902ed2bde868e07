"""CORS for other sites' pages (the Fetch standard's CORS protocol), Sync Gateway's per-database
`cors` block: the sidecar alone answers preflights and grants access on every answer.

Pure decisions over a `CorsPolicy` built once from the configuration; the callers (`handlers`,
`observe`) do the lookups. Origins compare as exact strings: the configuration holds them in
the serialized form browsers send (`config._cors_origin` normalizes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import CORSConfig, Settings

# Always allowed besides the configured `headers`: what a sync client sends (a bearer token,
# a JSON body). CORS-safelisted headers (Accept, ...) need no listing (Fetch 2.2.2).
DEFAULT_HEADERS = ("Authorization", "Content-Type")
# Every method the proxied REST API uses (Sync Gateway, CouchDB); a preflight for another
# one fails in the browser.
METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE"
# What the sidecar writes itself; an upstream's own copies never reach the client
# (headers.downstream_response_headers drops them): one authority, these lists.
RESPONSE_HEADERS = frozenset(
    {
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-allow-private-network",
        "access-control-expose-headers",
        "access-control-max-age",
    }
)


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """One database's CORS: which origins may read its answers with credentials."""

    origins: frozenset[str]  # `cors.origin`: every path of the database
    login_origins: frozenset[str]  # `cors.origin` + `cors.login_origin`: `/{db}/_session` too
    allow_headers: str
    expose_headers: str | None
    max_age: str

    @classmethod
    def from_config(cls, conf: CORSConfig) -> CorsPolicy:
        headers: dict[str, str] = {}
        for name in (*DEFAULT_HEADERS, *conf.headers):
            headers.setdefault(name.lower(), name)
        return cls(
            origins=frozenset(conf.origin),
            login_origins=frozenset(conf.origin) | frozenset(conf.login_origin),
            allow_headers=", ".join(headers.values()),
            expose_headers=", ".join(conf.expose_headers) or None,
            max_age=str(conf.max_age),
        )

    def allows(self, origin: str, *, login: bool = False) -> bool:
        """Whether `origin` (serialized, as browsers send it) is listed; `login`: the request
        is a login or logout at `/{db}/_session`, where `login_origin` counts too."""
        return origin in (self.login_origins if login else self.origins)


def policies(settings: Settings) -> dict[str, CorsPolicy]:
    """Each database's policy, by name."""
    return {name: CorsPolicy.from_config(conf.cors) for name, conf in settings.databases.items()}


def is_preflight(headers: Mapping[str, str]) -> bool:
    """An OPTIONS request is a CORS preflight when it has Origin and
    Access-Control-Request-Method (Fetch 3.2.2); any other OPTIONS is an ordinary request."""
    return "Origin" in headers and "Access-Control-Request-Method" in headers


def _single_origin(request: web.Request) -> str | None:
    # Security: two Origin headers are nobody's; the value is compared exactly, never parsed.
    values = request.headers.getall("Origin", ())
    return values[0] if len(values) == 1 else None


def _vary_origin(headers: CIMultiDict[str]) -> None:
    """Answers differ by Origin: a cache must not hand one origin's grant to another."""
    for value in headers.getall("Vary", ()):
        tokens = {t.strip().lower() for t in value.split(",")}
        if "origin" in tokens or "*" in tokens:
            return
    headers.add("Vary", "Origin")


def preflight_answer(request: web.Request, policy: CorsPolicy, *, login: bool) -> web.Response:
    """The answer to a preflight, never authenticated nor forwarded (a preflight carries no
    credentials). A listed origin gets 204 with the grants; any other origin (`null`, two
    Origin headers, one not listed) gets 204 without any, as Sync Gateway answers, and the
    browser stops there."""
    response = web.Response(status=204)
    headers = response.headers
    origin = _single_origin(request)
    if origin is not None and policy.allows(origin, login=login):
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Allow-Methods"] = METHODS
        headers["Access-Control-Allow-Headers"] = policy.allow_headers
        headers["Access-Control-Max-Age"] = policy.max_age
    _vary_origin(headers)
    return response


def grant(request: web.Request, response: web.StreamResponse, policy: CorsPolicy) -> None:
    """On an actual answer (proxied, the sidecar's own, an error) to a request that carried
    Origin: the grant when its origin is listed, and `Vary: Origin`. Security: the grant is
    always with credentials, so it is only ever this exact origin, never `*`."""
    headers = response.headers
    if "Access-Control-Allow-Origin" in headers:  # a preflight answer: complete already
        return
    _vary_origin(headers)
    origin = _single_origin(request)
    if origin is None:
        return
    db = request.match_info.get("db", "")
    if policy.allows(origin, login=request.path == f"/{db}/_session"):
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
        if policy.expose_headers is not None:
            headers["Access-Control-Expose-Headers"] = policy.expose_headers
