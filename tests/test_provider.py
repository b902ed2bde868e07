"""Provider discovery, JWKS fetching and refresh against a real OP stand-in on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from support.jwt_factory import CLIENT_ID, SigningKey, claims, header_for, make_key, mint

import sidecar.oidc.provider as provider_mod
from sidecar.config import OIDCConfig, ProviderConfig
from sidecar.errors import BadRequest, ProviderError
from sidecar.oidc.provider import (
    MAX_DOCUMENT_BYTES,
    Provider,
    ProviderMetadata,
    ProviderRegistry,
    allowed_algorithms,
    discovery_url,
    key_refresh_interval,
    parse_metadata,
    refresh_interval,
)
from sidecar.oidc.tokens import TokenError

K1 = make_key("RS256", "k1")
K2 = make_key("RS256", "k2")
EC = make_key("ES256", "ec")
LEEWAY = 60


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class OPState:
    """What the stand-in provider serves; tests change it while it runs."""

    base: str = ""
    keys: list[SigningKey] = field(default_factory=lambda: [K1])
    down: bool = False
    delay: float = 0.0
    doc_issuer: str | None = None  # None: the real issuer
    doc_extra: dict[str, Any] = field(default_factory=dict)
    cache_control: str | None = None
    content_type: str = "application/json"
    raw_discovery: bytes | None = None
    stream_discovery: bytes | None = None  # sent chunked, without Content-Length
    hits: Counter[str] = field(default_factory=Counter)

    @property
    def issuer(self) -> str:
        return self.base + "/op"

    def document(self) -> dict[str, Any]:
        doc = {
            "issuer": self.doc_issuer if self.doc_issuer is not None else self.issuer,
            "authorization_endpoint": self.issuer + "/auth",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "userinfo_endpoint": self.issuer + "/me",
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "HS256", "none"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "code_challenge_methods_supported": ["S256"],
        }
        doc.update(self.doc_extra)
        return doc


def make_app(state: OPState) -> web.Application:
    async def answer(request: web.Request, kind: str, body: Any) -> web.StreamResponse:
        state.hits[kind] += 1
        if state.delay:
            await asyncio.sleep(state.delay)
        if state.down:
            return web.Response(status=503, text="down")
        headers = {"Cache-Control": state.cache_control} if state.cache_control else {}
        if kind == "discovery" and state.stream_discovery is not None:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(state.stream_discovery), 256 * 1024):
                await resp.write(state.stream_discovery[i : i + 256 * 1024])
            await resp.write_eof()
            return resp
        if kind == "discovery" and state.raw_discovery is not None:
            return web.Response(body=state.raw_discovery, content_type=state.content_type)
        return web.json_response(body, headers=headers, content_type=state.content_type)

    async def discovery(request: web.Request) -> web.StreamResponse:
        return await answer(request, "discovery", state.document())

    async def jwks(request: web.Request) -> web.StreamResponse:
        return await answer(request, "jwks", {"keys": [k.public_jwk() for k in state.keys]})

    app = web.Application()
    app.router.add_get("/op/.well-known/openid-configuration", discovery)
    app.router.add_get("/elsewhere/discovery.json", discovery)
    app.router.add_get("/op/jwks", jwks)
    return app


@dataclass
class OP:
    state: OPState
    server: Any
    http: aiohttp.ClientSession
    clock: Clock

    @property
    def issuer(self) -> str:
        return self.state.issuer

    def config(self, **overrides: Any) -> ProviderConfig:
        return ProviderConfig(issuer=self.issuer, client_id=CLIENT_ID, **overrides)

    def provider(self, *, jwks_refresh_seconds: float | None = None, **overrides: Any) -> Provider:
        options = {k: overrides.pop(k) for k in ("min_jwks_refresh_interval",) if k in overrides}
        config = self.config(**overrides)
        if jwks_refresh_seconds is not None:
            # Test only: below the 30 s the config allows, to watch keys change in a second.
            config = config.model_copy(update={"jwks_refresh_seconds": jwks_refresh_seconds})
        return Provider("op", config, self.http, clock=self.clock, **options)

    def token(self, key: SigningKey = K1, **overrides: Any) -> str:
        payload = claims(now=self.clock.now, **({"iss": self.issuer} | overrides))
        return mint(key, payload)


@pytest.fixture
async def op(aiohttp_server: AiohttpServer) -> AsyncIterator[OP]:
    state = OPState()
    server = await aiohttp_server(make_app(state))
    state.base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        yield OP(state, server, http, Clock())


async def wait_for(condition: Callable[[], bool]) -> None:
    # Polling is right here: the conditions are other components' state, not our events.
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# --- pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "discovery", "expected"),
    [
        ("https://op.example.com", None, "https://op.example.com/.well-known/openid-configuration"),
        (
            "https://op.example.com/",
            None,
            "https://op.example.com/.well-known/openid-configuration",
        ),
        ("https://x.example/t/", None, "https://x.example/t/.well-known/openid-configuration"),
        ("https://x.example", "https://y.example/d.json", "https://y.example/d.json"),
    ],
)
def test_discovery_url(issuer: str, discovery: str | None, expected: str) -> None:
    conf = ProviderConfig(issuer=issuer, client_id="c", discovery_url=discovery)
    assert discovery_url(conf) == expected


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 3600),
        ("", 3600),
        ("public", 3600),
        ("max-age=600", 600),
        ("public, max-age=19800, must-revalidate", 19800),
        ("max-age=5", 60),
        ("max-age=0", 60),
        ("max-age=999999", 86400),
        ("no-cache", 60),
        ("no-store, max-age=0", 60),
        ("s-maxage=10", 3600),
        ("max-age=abc", 3600),
    ],
)
def test_refresh_interval(header: str | None, seconds: float) -> None:
    assert refresh_interval(header) == seconds


@pytest.mark.parametrize(
    ("header", "floor", "ceiling", "seconds"),
    [
        (None, 30, 300, 300),  # no max-age: jwks_refresh_seconds
        ("public", 30, 300, 300),
        ("max-age=120", 30, 300, 120),  # when max-age runs out
        ("public, max-age=86400", 30, 300, 300),  # but at least every jwks_refresh_seconds
        ("max-age=5", 30, 300, 30),  # never more often than the floor
        ("max-age=0", 30, 300, 30),
        ("no-cache", 30, 300, 30),
        ("no-store", 30, 3600, 30),
        ("max-age=600", 30, 3600, 600),
        ("max-age=abc", 30, 300, 300),
        ("s-maxage=10", 30, 300, 300),
        ("max-age=5", 1, 300, 5),  # a lower floor (tests) lets max-age through
        (None, 1, 0.5, 1),  # the floor wins over a smaller ceiling
    ],
)
def test_key_refresh_interval(
    header: str | None, floor: float, ceiling: float, seconds: float
) -> None:
    assert key_refresh_interval(header, floor=floor, ceiling=ceiling) == seconds


def _meta(algs: list[str] | None) -> ProviderMetadata:
    doc: dict[str, Any] = {"issuer": "https://op", "jwks_uri": "https://op/jwks"}
    if algs is not None:
        doc["id_token_signing_alg_values_supported"] = algs
    return parse_metadata(doc, expected_issuer="https://op")


@pytest.mark.parametrize(
    ("configured", "advertised", "expected"),
    [
        (None, None, ("RS256",)),
        (None, [], ("RS256",)),
        (None, ["HS256", "none"], ("RS256",)),
        (None, ["RS256", "HS256", "ES256", "none"], ("RS256", "ES256")),
        (None, ["EdDSA"], ("EdDSA",)),
        (("ES256",), ["RS256"], ("ES256",)),
    ],
)
def test_allowed_algorithms(
    configured: tuple[str, ...] | None, advertised: list[str] | None, expected: tuple[str, ...]
) -> None:
    conf = ProviderConfig(issuer="https://op", client_id="c", allowed_algorithms=configured)
    assert allowed_algorithms(conf, _meta(advertised)) == expected


@pytest.mark.parametrize(
    "doc",
    [
        [],
        "x",
        {},
        {"issuer": "https://op"},
        {"issuer": "https://op", "jwks_uri": "/relative"},
        {"issuer": "https://op", "jwks_uri": "file:///etc/passwd"},
        {"issuer": "https://op", "jwks_uri": 5},
        {"issuer": "https://op/", "jwks_uri": "https://op/jwks"},
        {"issuer": "https://OP", "jwks_uri": "https://op/jwks"},
        {"issuer": "https://op", "jwks_uri": "https://op/jwks", "token_endpoint": ["x"]},
    ],
)
def test_parse_metadata_rejects(doc: Any) -> None:
    with pytest.raises(ProviderError):
        parse_metadata(doc, expected_issuer="https://op")


# --- discovery -----------------------------------------------------------------------------


async def test_discovery_ok(op: OP) -> None:
    provider = op.provider()
    assert not provider.ready
    meta = await provider.ensure_metadata()
    assert meta.issuer == op.issuer
    assert meta.jwks_uri == op.issuer + "/jwks"
    assert meta.token_endpoint == op.issuer + "/token"
    assert meta.end_session_endpoint is None
    assert meta.code_challenge_methods_supported == ("S256",)
    assert meta.raw["authorization_endpoint"] == op.issuer + "/auth"
    claims_ = await provider.validate(op.token(), leeway=LEEWAY)
    assert claims_["sub"] == "user-123"
    assert provider.ready and provider.last_error is None
    assert op.state.hits == {"discovery": 1, "jwks": 1}


async def test_trailing_slash_issuer(op: OP) -> None:
    op.state.doc_issuer = op.issuer + "/"
    provider = Provider("op", ProviderConfig(issuer=op.issuer + "/", client_id=CLIENT_ID), op.http)
    assert (await provider.ensure_metadata()).issuer == op.issuer + "/"


async def test_issuer_mismatch_rejected(op: OP) -> None:
    op.state.doc_issuer = op.issuer + "/"
    provider = op.provider()
    with pytest.raises(ProviderError) as info:
        await provider.ensure_metadata()
    assert "issuer" in info.value.reason
    assert not provider.ready
    assert provider.last_error is not None and "issuer" in provider.last_error


@pytest.mark.parametrize("option", ["disable_cfg_validation", "discovery_url"])
async def test_issuer_mismatch_tolerated(op: OP, option: str) -> None:
    op.state.doc_issuer = "https://somewhere.else"
    overrides: dict[str, Any] = (
        {"disable_cfg_validation": True}
        if option == "disable_cfg_validation"
        else {"discovery_url": op.state.base + "/elsewhere/discovery.json"}
    )
    provider = op.provider(**overrides)
    assert (await provider.ensure_metadata()).issuer == "https://somewhere.else"
    # Tokens are still checked against the configured issuer.
    assert (await provider.validate(op.token(), leeway=LEEWAY))["iss"] == op.issuer
    with pytest.raises(TokenError) as info:
        await provider.validate(op.token(iss="https://somewhere.else"), leeway=LEEWAY)
    assert info.value.code == "issuer"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"down": True}, "HTTP 503"),
        ({"content_type": "text/html"}, "not JSON"),
        ({"raw_discovery": b"{not json"}, "not valid JSON"),
        ({"raw_discovery": b'{"issuer": NaN}'}, "not valid JSON"),
        ({"raw_discovery": b"[]"}, "not a JSON object"),
        ({"raw_discovery": b"\xff\xfe"}, "not valid JSON"),
        ({"raw_discovery": b"x" * (MAX_DOCUMENT_BYTES + 1)}, "larger than"),
        ({"stream_discovery": b" " * (MAX_DOCUMENT_BYTES + 1)}, "larger than"),
        ({"doc_extra": {"jwks_uri": None}}, "jwks_uri"),
    ],
)
async def test_bad_discovery(op: OP, change: dict[str, Any], fragment: str) -> None:
    for name, value in change.items():
        setattr(op.state, name, value)
    with pytest.raises(ProviderError) as info:
        await op.provider().ensure_metadata()
    assert fragment in info.value.reason


async def test_unreachable_provider(op: OP) -> None:
    await op.server.close()
    provider = op.provider()
    with pytest.raises(ProviderError) as info:
        await provider.ensure_metadata()
    assert "unreachable" in info.value.reason
    assert "Traceback" not in info.value.reason


async def test_timeout(op: OP) -> None:
    op.state.delay = 1.0
    provider = Provider("op", op.config(), op.http, timeout=0.2)
    with pytest.raises(ProviderError) as info:
        await provider.ensure_metadata()
    assert "timed out" in info.value.reason


async def test_concurrent_callers_share_one_fetch(op: OP) -> None:
    op.state.delay = 0.1
    provider = op.provider()
    results = await asyncio.gather(*(provider.ensure_metadata() for _ in range(20)))
    assert all(r is results[0] for r in results)
    keys = await asyncio.gather(*(provider.ensure_keys() for _ in range(20)))
    assert all(k is keys[0] for k in keys)
    assert op.state.hits == {"discovery": 1, "jwks": 1}


async def test_concurrent_callers_share_one_failure(op: OP) -> None:
    op.state.delay = 0.1
    op.state.down = True
    provider = op.provider()
    results = await asyncio.gather(
        *(provider.ensure_metadata() for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, ProviderError) for r in results)
    assert op.state.hits["discovery"] == 1


async def test_failure_cooldown_then_retry_on_request(op: OP) -> None:
    op.state.down = True
    provider = op.provider()
    for _ in range(5):
        with pytest.raises(ProviderError):
            await provider.validate(op.token(), leeway=LEEWAY)
    assert op.state.hits["discovery"] == 1  # the cooldown spares the provider
    op.state.down = False
    op.clock.now += 3  # past the cooldown: the next request retries
    assert await provider.validate(op.token(), leeway=LEEWAY)
    assert provider.ready


async def test_cancelled_fetch_does_not_poison_waiters(op: OP) -> None:
    op.state.delay = 0.2
    provider = op.provider()
    first = asyncio.ensure_future(provider.ensure_metadata())
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(provider.ensure_metadata())
    await asyncio.sleep(0.01)
    first.cancel()
    meta = await second
    assert meta.issuer == op.issuer
    assert op.state.hits["discovery"] == 2  # the waiter fetched itself, no shared "failure"


# --- validation and keys -------------------------------------------------------------------


async def test_garbage_costs_no_request(op: OP) -> None:
    provider = op.provider()
    for token in ["", "garbage", "a.b.c", op.token().replace(".", "", 1)]:
        with pytest.raises(TokenError) as info:
            await provider.validate(token, leeway=LEEWAY)
        assert info.value.code == "malformed"
    unsigned = "eyJhbGciOiJub25lIn0." + op.token().split(".")[1] + "."
    with pytest.raises(TokenError) as info:
        await provider.validate(unsigned, leeway=LEEWAY)
    assert info.value.code == "alg"
    assert not op.state.hits


async def test_algorithms_follow_the_discovery_document(op: OP) -> None:
    op.state.keys = [K1, EC]
    op.state.doc_extra = {"id_token_signing_alg_values_supported": ["RS256"]}
    provider = op.provider()
    assert await provider.validate(op.token(K1), leeway=LEEWAY)
    with pytest.raises(TokenError) as info:
        await provider.validate(op.token(EC), leeway=LEEWAY)
    assert info.value.code == "alg"
    configured = op.provider(allowed_algorithms=("ES256",))
    assert await configured.validate(op.token(EC), leeway=LEEWAY)
    with pytest.raises(TokenError) as info:
        await configured.validate(op.token(K1), leeway=LEEWAY)
    assert info.value.code == "alg"


async def test_trusted_audiences_from_config(op: OP) -> None:
    token = op.token(aud=[CLIENT_ID, "api"])
    with pytest.raises(TokenError) as info:
        await op.provider().validate(token, leeway=LEEWAY)
    assert info.value.code == "audience"
    assert await op.provider(trusted_audiences=("api",)).validate(token, leeway=LEEWAY)


async def test_cache_answers_first_but_still_checks_nonce(op: OP) -> None:
    provider = op.provider()
    token = op.token()
    sentinel = claims(now=op.clock.now, iss=op.issuer, sub="from-cache")
    provider.cache.put(token, op.issuer, CLIENT_ID, sentinel)
    assert (await provider.validate(token, leeway=LEEWAY))["sub"] == "from-cache"
    assert not op.state.hits  # no verification, no fetch
    assert await provider.validate(token, nonce="n-0S6_WzA2Mj", leeway=LEEWAY)
    with pytest.raises(TokenError) as info:
        await provider.validate(token, nonce="other", leeway=LEEWAY)
    assert info.value.code == "nonce"


async def test_retired_key_empties_the_cache(op: OP) -> None:
    provider = op.provider()
    token = op.token(K1)
    assert await provider.validate(token, leeway=LEEWAY)
    op.state.keys = [K1, K2]
    await provider.refresh()  # a key added: cached answers stay
    assert len(provider.cache) == 1 and provider.keys_epoch == 0
    op.state.keys = [K2]
    await provider.refresh()  # K1 retired: its tokens are no longer accepted from the cache
    assert len(provider.cache) == 0
    assert provider.keys_epoch == 1  # and other caches keyed on the epoch (bearer identities)
    with pytest.raises(TokenError) as info:
        await provider.validate(token, leeway=LEEWAY)
    assert info.value.code == "unknown_kid"


async def test_key_rotation_refetches_jwks(op: OP) -> None:
    provider = op.provider()
    assert await provider.validate(op.token(K1), leeway=LEEWAY)
    op.state.keys = [K1, K2]  # the provider rotates in a new key
    assert await provider.validate(op.token(K2), leeway=LEEWAY)
    assert op.state.hits["jwks"] == 2
    op.state.keys = [K2]  # and retires the old one; cached keys still verify K1 tokens
    assert await provider.validate(op.token(K1, sub="again"), leeway=LEEWAY)
    assert op.state.hits["jwks"] == 2


async def test_flood_of_unknown_kids_is_bounded(op: OP) -> None:
    provider = op.provider(min_jwks_refresh_interval=30.0)
    assert await provider.validate(op.token(K1), leeway=LEEWAY)
    rogue = make_key("RS256", "rogue")
    junk = [
        mint(
            rogue, claims(now=op.clock.now, iss=op.issuer), header=header_for(rogue, kid=f"kid-{i}")
        )
        for i in range(100)
    ]

    async def attempt(token: str) -> str:
        try:
            await provider.validate(token, leeway=LEEWAY)
        except TokenError as exc:
            return exc.code
        return "ok"

    codes = await asyncio.gather(*(attempt(t) for t in junk))
    codes += [await attempt(t) for t in junk]
    assert set(codes) == {"unknown_kid"}
    assert op.state.hits["jwks"] == 2  # the initial fetch and one re-fetch
    op.clock.now += 31  # the next interval allows exactly one more
    for token in junk[:10]:
        assert await attempt(token) == "unknown_kid"
    assert op.state.hits["jwks"] == 3


async def test_provider_down_later_cached_keys_still_validate(op: OP) -> None:
    provider = op.provider()
    assert await provider.validate(op.token(), leeway=LEEWAY)
    await op.server.close()
    assert (await provider.validate(op.token(sub="fresh"), leeway=LEEWAY))["sub"] == "fresh"
    with pytest.raises(ProviderError):
        await provider.refresh()
    assert provider.ready
    assert provider.last_error is not None
    assert (await provider.validate(op.token(sub="later"), leeway=LEEWAY))["sub"] == "later"
    # An unknown kid cannot be fetched now: the token is refused, not the provider.
    with pytest.raises(TokenError) as info:
        await provider.validate(op.token(K2), leeway=LEEWAY)
    assert info.value.code == "unknown_kid"


async def test_jwks_with_no_usable_keys(op: OP) -> None:
    op.state.keys = []
    provider = op.provider()
    with pytest.raises(ProviderError) as info:
        await provider.validate(op.token(), leeway=LEEWAY)
    assert "no usable" in info.value.reason


# --- background refresh --------------------------------------------------------------------


async def test_run_refresh_recovers_from_a_provider_down_at_start(
    op: OP, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_mod, "INITIAL_BACKOFF_SECONDS", 0.05)
    op.state.down = True
    provider = op.provider()
    stop = asyncio.Event()
    task = asyncio.create_task(provider.run_refresh(stop))
    await wait_for(lambda: op.state.hits["discovery"] >= 3)  # retried with backoff
    assert not provider.ready and task.done() is False
    op.state.down = False
    await wait_for(lambda: provider.ready)
    assert await provider.validate(op.token(), leeway=LEEWAY)
    stop.set()
    await asyncio.wait_for(task, 1)


async def test_run_refresh_follows_cache_control(op: OP, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider_mod, "MIN_REFRESH_SECONDS", 0.05)
    op.state.cache_control = "max-age=0"
    provider = op.provider(min_jwks_refresh_interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(provider.run_refresh(stop))
    await wait_for(lambda: op.state.hits["jwks"] >= 3)
    op.state.keys = [K2]  # picked up by the loop, no token needed to trigger it
    hits = op.state.hits["jwks"]
    await wait_for(lambda: op.state.hits["jwks"] > hits)
    keys = provider.keys
    assert keys is not None and [k.kid for k in keys] == ["k2"]
    stop.set()
    await asyncio.wait_for(task, 1)


async def test_keys_follow_max_age_within_the_floor_and_jwks_refresh_seconds(op: OP) -> None:
    op.state.cache_control = "max-age=7"
    provider = op.provider()
    await provider.refresh()
    assert provider.keys_refresh_seconds == 30  # the floor: never more often than every 30 s
    op.state.cache_control = "max-age=86400"
    await provider.refresh()
    assert provider.keys_refresh_seconds == 300  # jwks_refresh_seconds, the default
    op.state.cache_control = None
    await provider.refresh()
    assert provider.keys_refresh_seconds == 300
    lowered = op.provider(min_jwks_refresh_interval=1.0)
    op.state.cache_control = "max-age=7"
    await lowered.refresh()
    assert lowered.keys_refresh_seconds == 7


async def test_a_retired_key_stops_working_without_any_unknown_kid(op: OP) -> None:
    """The provider rotates K1 out for K2; only the background loop can notice, since every
    token that arrives carries the old, still known, kid."""
    op.state.cache_control = "max-age=3600"  # what a provider may say; jwks_refresh_seconds wins
    provider = op.provider(min_jwks_refresh_interval=0.05, jwks_refresh_seconds=0.2)
    old = op.token(K1)
    stop = asyncio.Event()
    task = asyncio.create_task(provider.run_refresh(stop))
    try:
        await wait_for(lambda: provider.ready)
        assert await provider.validate(old, leeway=LEEWAY)  # and now cached as verified
        discovery_hits = op.state.hits["discovery"]
        op.state.keys = [K2]
        await wait_for(lambda: [k.kid for k in provider.keys or ()] == ["k2"])
        with pytest.raises(TokenError) as info:
            await provider.validate(old, leeway=LEEWAY)
        assert info.value.code == "unknown_kid"
        assert await provider.validate(op.token(K2), leeway=LEEWAY)
        # The discovery document keeps its own (hour-long) schedule meanwhile.
        assert op.state.hits["discovery"] == discovery_hits
    finally:
        stop.set()
        await asyncio.wait_for(task, 1)


async def test_a_failed_key_refresh_keeps_the_keys_and_backs_off(
    op: OP, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_mod, "INITIAL_BACKOFF_SECONDS", 0.05)
    provider = op.provider(min_jwks_refresh_interval=0.05, jwks_refresh_seconds=0.1)
    token = op.token(K1)
    stop = asyncio.Event()
    task = asyncio.create_task(provider.run_refresh(stop))
    try:
        await wait_for(lambda: provider.ready)
        op.state.down = True
        hits = op.state.hits["jwks"]
        await wait_for(lambda: op.state.hits["jwks"] >= hits + 3)  # retried, again and again
        assert provider.last_error == "JWKS answered HTTP 503"
        keys = provider.keys
        assert keys is not None and [k.kid for k in keys] == ["k1"]  # kept
        provider.cache.clear()  # not from the cache: verified with the kept keys
        assert await provider.validate(token, leeway=LEEWAY)
        op.state.down = False
        op.state.keys = [K1, K2]
        await wait_for(lambda: len([k.kid for k in provider.keys or ()]) == 2)
        assert provider.last_error is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 1)


async def test_key_refresh_backoff_grows() -> None:
    """Failures are retried later each time (jittered doubling), up to a cap."""
    loop = asyncio.get_running_loop()
    failures = 0

    async def failing() -> None:
        nonlocal failures
        failures += 1
        raise ProviderError("down")

    config = ProviderConfig(issuer="https://op.example", client_id=CLIENT_ID)
    async with aiohttp.ClientSession() as http:
        provider = Provider("op", config, http)
        schedule = provider_mod._Schedule("JWKS", failing, lambda: 300.0, backoff=1.0)
        delays = []
        for _ in range(10):
            before = loop.time()
            await provider._run_one(schedule, loop)
            delays.append(schedule.due - before)
    assert failures == 10
    assert 0.5 <= delays[0] <= 1.0
    # Each wait is at least the previous one: b(n+1) * 0.5 = b(n) >= b(n) * jitter.
    assert all(delays[n + 1] >= delays[n] for n in range(5))
    assert max(delays) <= provider_mod.MAX_BACKOFF_SECONDS
    assert schedule.backoff == provider_mod.MAX_BACKOFF_SECONDS


async def test_run_refresh_survives_errors_and_is_cancellable(
    op: OP, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_mod, "INITIAL_BACKOFF_SECONDS", 0.05)
    op.state.raw_discovery = b"[]"
    provider = op.provider()
    task = asyncio.create_task(provider.run_refresh())
    await wait_for(lambda: op.state.hits["discovery"] >= 2)
    assert provider.last_error is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- registry ------------------------------------------------------------------------------


def _registry(op: OP, **extra: Any) -> ProviderRegistry:
    oidc = OIDCConfig(
        providers={
            "first": op.config(),
            "second": ProviderConfig(issuer=op.issuer, client_id="second-client"),
            "other": ProviderConfig(issuer="http://127.0.0.1:9/other", client_id=CLIENT_ID),
        },
        **extra,
    )
    return ProviderRegistry(oidc, op.http, clock=op.clock)


async def test_registry_chooses_provider_by_iss_and_aud(op: OP) -> None:
    registry = _registry(op)
    assert registry.for_token(op.token()).name == "first"
    assert registry.for_token(op.token(aud=["x", "second-client"])).name == "second"
    assert registry.for_token(op.token(iss="http://127.0.0.1:9/other")).name == "other"
    for token in [op.token(aud="nobody"), op.token(iss="https://nowhere"), op.token(aud=None)]:
        with pytest.raises(TokenError):
            registry.for_token(token)
    with pytest.raises(TokenError) as info:
        registry.for_token("garbage")
    assert info.value.code == "malformed"
    # The choice is only a choice: the chosen provider still verifies everything.
    forged = mint(make_key("RS256", "k1"), claims(now=op.clock.now, iss=op.issuer))
    with pytest.raises(TokenError) as info:
        await registry.for_token(forged).validate(forged, leeway=LEEWAY)
    assert info.value.code == "signature"


async def test_registry_single_provider_takes_every_token(op: OP) -> None:
    registry = ProviderRegistry(OIDCConfig(providers={"only": op.config()}), op.http)
    assert registry.for_token("garbage").name == "only"
    assert registry.default is not None and registry.default.name == "only"
    assert registry.get(None).name == "only"


async def test_registry_get_and_status(op: OP) -> None:
    registry = _registry(op, default_provider="second")
    assert registry.get(None).name == "second"
    assert registry.get("").name == "second"
    assert registry.get("other").name == "other"
    with pytest.raises(BadRequest) as info:
        registry.get("missing")
    assert info.value.reason == "Unable to identify provider"
    no_default = _registry(op)
    assert no_default.default is None
    with pytest.raises(BadRequest):
        no_default.get(None)
    assert [p.name for p in registry.providers] == ["first", "second", "other"]
    assert len(registry) == 3
    assert not registry.ready
    assert registry.status() == {"first": False, "second": False, "other": False}
    await registry.get("first").validate(op.token(), leeway=LEEWAY)
    assert registry.ready
    assert registry.status() == {"first": True, "second": False, "other": False}


async def test_registry_run_refresh(op: OP) -> None:
    registry = ProviderRegistry(OIDCConfig(providers={"a": op.config(), "b": op.config()}), op.http)
    stop = asyncio.Event()
    task = asyncio.create_task(registry.run_refresh(stop))
    await wait_for(lambda: all(registry.status().values()))
    stop.set()
    await asyncio.wait_for(task, 1)
