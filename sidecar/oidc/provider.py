"""OpenID Providers as seen by the sidecar: discovery, JWKS, periodic refresh, token validation.

`Provider` fetches and caches one OP's metadata and keys; `ProviderRegistry` holds one database's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

import aiohttp
from joserfc.jwk import KeySet

from sidecar.config import OIDCConfig, ProviderConfig
from sidecar.errors import BadRequest, ProviderError, outside_text
from sidecar.oidc import self_fetch
from sidecar.oidc.algorithms import ASYMMETRIC_ALGORITHMS, DEFAULT_ALGORITHMS
from sidecar.oidc.tokens import (
    ParsedToken,
    TokenError,
    VerifiedTokenCache,
    check_header,
    check_logout_header,
    check_nonce,
    parse_jwks,
    parse_token,
    verify_logout_token,
    verify_parsed,
)
from sidecar.streams import read_bounded

log = logging.getLogger("sidecar.oidc")

MAX_DOCUMENT_BYTES = 1024 * 1024
MIN_REFRESH_SECONDS = 60.0
MAX_REFRESH_SECONDS = 24 * 3600.0
DEFAULT_REFRESH_SECONDS = 3600.0
INITIAL_BACKOFF_SECONDS = 0.25  # a provider served by this very process answers once it listens
MAX_BACKOFF_SECONDS = 60.0
WELL_KNOWN = "/.well-known/openid-configuration"
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of an OpenID Provider Metadata document (OIDC Discovery 3) we use."""

    issuer: str
    authorization_endpoint: str | None
    token_endpoint: str | None
    jwks_uri: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None
    id_token_signing_alg_values_supported: tuple[str, ...]
    token_endpoint_auth_methods_supported: tuple[str, ...]
    code_challenge_methods_supported: tuple[str, ...]
    # RFC 9207 3: the provider puts `iss` in every authorization response; absent means false.
    authorization_response_iss_parameter_supported: bool
    # OIDC Back-Channel Logout 1.0 section 2.1: whether the OP sends logout tokens (with sid).
    backchannel_logout_supported: bool
    backchannel_logout_session_supported: bool
    raw: Mapping[str, Any] = field(repr=False)


def discovery_url(config: ProviderConfig) -> str:
    """OIDC Discovery 4: issuer + /.well-known/openid-configuration (no doubled slash)."""
    return config.discovery_url or config.issuer.rstrip("/") + WELL_KNOWN


def max_age(cache_control: str | None) -> float | None:
    """The Cache-Control lifetime: max-age's seconds, 0 for no-cache/no-store, else None."""
    if not cache_control:
        return None
    match = _MAX_AGE.search(cache_control)
    if match is not None:
        return float(match.group(1))
    lowered = cache_control.lower()
    return 0.0 if "no-cache" in lowered or "no-store" in lowered else None


def refresh_interval(cache_control: str | None) -> float:
    """Seconds until the discovery document's next refresh: max-age clamped to [1 min, 24 h]."""
    age = max_age(cache_control)
    if age is None:
        return DEFAULT_REFRESH_SECONDS
    return min(max(age, MIN_REFRESH_SECONDS), MAX_REFRESH_SECONDS)


def key_refresh_interval(cache_control: str | None, *, floor: float, ceiling: float) -> float:
    """Seconds until the JWKS's next refresh: when its max-age runs out, but never sooner than
    `floor` (30 s) and never later than `ceiling` (the provider's `jwks_refresh_seconds`), so a
    key the provider retired stops being accepted within `ceiling` even if it says "a day"."""
    age = max_age(cache_control)
    return max(floor, ceiling if age is None else min(age, ceiling))


def _fail(reason: str) -> NoReturn:
    raise ProviderError(reason)


def _url_member(doc: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        _fail(f"discovery document: {name} missing or not a string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"discovery document: {name} is not an absolute http(s) URL")
    return value


def _str_list(doc: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = doc.get(name)
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _flag(doc: Mapping[str, Any], name: str) -> bool:
    value = doc.get(name, False)
    # Security: a flag that turns a check on is never guessed from a non-boolean value.
    if not isinstance(value, bool):
        _fail(f"discovery document: {name} is not a boolean")
    return value


def parse_metadata(doc: Any, *, expected_issuer: str | None) -> ProviderMetadata:
    """Validate a discovery document; `expected_issuer` None skips the issuer check."""
    if not isinstance(doc, dict):
        _fail("discovery document is not a JSON object")
    issuer = doc.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        _fail("discovery document: issuer missing")
    # Security: OIDC Discovery 4.3: the issuer in the document MUST be identical to the one
    # used to find it, or a compromised or mix-up document could name another issuer's keys.
    if expected_issuer is not None and issuer != expected_issuer:
        _fail("discovery document: issuer does not match the configured issuer")
    jwks_uri = _url_member(doc, "jwks_uri", required=True)
    assert jwks_uri is not None
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=_url_member(doc, "authorization_endpoint"),
        token_endpoint=_url_member(doc, "token_endpoint"),
        jwks_uri=jwks_uri,
        userinfo_endpoint=_url_member(doc, "userinfo_endpoint"),
        end_session_endpoint=_url_member(doc, "end_session_endpoint"),
        id_token_signing_alg_values_supported=_str_list(
            doc, "id_token_signing_alg_values_supported"
        ),
        token_endpoint_auth_methods_supported=_str_list(
            doc, "token_endpoint_auth_methods_supported"
        ),
        code_challenge_methods_supported=_str_list(doc, "code_challenge_methods_supported"),
        authorization_response_iss_parameter_supported=_flag(
            doc, "authorization_response_iss_parameter_supported"
        ),
        backchannel_logout_supported=doc.get("backchannel_logout_supported") is True,
        backchannel_logout_session_supported=doc.get("backchannel_logout_session_supported")
        is True,
        raw=doc,
    )


def allowed_algorithms(config: ProviderConfig, metadata: ProviderMetadata) -> tuple[str, ...]:
    """Configured algorithms, else the document's ∩ asymmetric ones, else RS256."""
    if config.allowed_algorithms:
        return tuple(a for a in config.allowed_algorithms if a in ASYMMETRIC_ALGORITHMS)
    advertised = tuple(
        a for a in metadata.id_token_signing_alg_values_supported if a in ASYMMETRIC_ALGORITHMS
    )
    return advertised or DEFAULT_ALGORITHMS


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


# (provider, "discovery" | "jwks", "ok" | "failed", seconds): for metrics.
FetchObserver = Callable[[str, str, str, float], None]


class Provider:
    """One OpenID Provider: metadata and keys, fetched lazily and refreshed in the background."""

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        http: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
        min_jwks_refresh_interval: float = 30.0,
        failure_cooldown: float = 1.0,
        cache: VerifiedTokenCache | None = None,
        on_fetch: FetchObserver | None = None,
    ) -> None:
        self.name = name
        self._on_fetch = on_fetch
        self.config = config
        self.cache = cache if cache is not None else VerifiedTokenCache()
        self.keys_epoch = 0  # bumped when a key leaves the JWKS: caches keyed on it start over
        self.last_error: str | None = None
        self.jwks_fetches = 0  # attempts, for metrics and tests
        self.discovery_fetches = 0
        self.min_jwks_refresh_interval = min_jwks_refresh_interval
        self._http = http
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._failure_cooldown = failure_cooldown
        self._metadata: ProviderMetadata | None = None
        self._keys: KeySet | None = None
        self._metadata_lock = asyncio.Lock()
        self._keys_lock = asyncio.Lock()
        self._metadata_attempts = 0
        self._keys_attempts = 0
        self._metadata_failed_at: float | None = None
        self._keys_failed_at: float | None = None
        self._kid_refetch_at: float | None = None
        self._metadata_interval = DEFAULT_REFRESH_SECONDS
        self._keys_interval = float(config.jwks_refresh_seconds)

    def __repr__(self) -> str:
        return f"<Provider {self.name} ready={self.ready}>"

    @property
    def ready(self) -> bool:
        """Metadata and keys loaded at least once."""
        return self._metadata is not None and self._keys is not None

    @property
    def metadata(self) -> ProviderMetadata | None:
        return self._metadata

    @property
    def keys(self) -> KeySet | None:
        return self._keys

    @property
    def keys_refresh_seconds(self) -> float:
        """How long the JWKS is used before the background loop fetches it again."""
        return self._keys_interval

    def matches(self, iss: str, aud: list[str]) -> bool:
        return iss == self.config.issuer and self.config.client_id in aud

    # --- fetching -------------------------------------------------------------------------

    async def _fetch_json(self, url: str, what: str) -> tuple[Any, str | None]:
        """GET a JSON document (bounded size, JSON type); also its Cache-Control header."""
        if self._on_fetch is None:
            return await self._fetch_json_unobserved(url, what)
        started = time.perf_counter()
        result = "failed"
        try:
            found = await self._fetch_json_unobserved(url, what)
            result = "ok"
            return found
        finally:
            kind = "jwks" if what == "JWKS" else "discovery"
            self._on_fetch(self.name, kind, result, time.perf_counter() - started)

    async def _fetch_json_unobserved(self, url: str, what: str) -> tuple[Any, str | None]:
        try:
            async with self._http.get(
                url,
                timeout=self._timeout,
                headers={"Accept": "application/json", **self_fetch.headers_for(url)},
                max_redirects=3,
            ) as resp:
                if resp.status != 200:
                    _fail(f"{what} answered HTTP {resp.status}")
                if not _is_json(resp.content_type):
                    _fail(f"{what} is not JSON ({outside_text(resp.content_type, 64)})")
                # Security: bounded reads; a hostile or broken provider cannot fill our memory.
                if resp.content_length is not None and resp.content_length > MAX_DOCUMENT_BYTES:
                    _fail(f"{what} is larger than {MAX_DOCUMENT_BYTES} bytes")
                body = await read_bounded(resp.content, MAX_DOCUMENT_BYTES)
                if body is None:
                    _fail(f"{what} is larger than {MAX_DOCUMENT_BYTES} bytes")
                cache_control = resp.headers.get("Cache-Control")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # ClientError covers connection refused, TLS failures, too many redirects.
            detail = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            _fail(f"{what} unreachable: {detail}")
        try:
            document = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            _fail(f"{what} is not valid JSON")
        return document, cache_control

    async def _fetch_metadata(self) -> ProviderMetadata:
        self.discovery_fetches += 1
        strict = not (self.config.discovery_url or self.config.disable_cfg_validation)
        doc, cache_control = await self._fetch_json(
            discovery_url(self.config), "discovery document"
        )
        metadata = parse_metadata(doc, expected_issuer=self.config.issuer if strict else None)
        self._metadata_interval = refresh_interval(cache_control)
        return metadata

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        self.jwks_fetches += 1
        doc, cache_control = await self._fetch_json(jwks_uri, "JWKS")
        try:
            keys, skipped = parse_jwks(doc)
        except ValueError:
            _fail("JWKS is not a JWK Set")
        for note in skipped:
            log.warning("provider %s: JWKS %s skipped", self.name, note)
        if not keys.keys:
            _fail("JWKS has no usable signature keys")
        self._keys_interval = key_refresh_interval(
            cache_control,
            floor=self.min_jwks_refresh_interval,
            ceiling=self.config.jwks_refresh_seconds,
        )
        return keys

    def _recently_failed(self, failed_at: float | None) -> bool:
        return failed_at is not None and self._clock() - failed_at < self._failure_cooldown

    def _unavailable(self) -> NoReturn:
        raise ProviderError(
            f"OpenID Provider {self.name} unavailable: {self.last_error or 'not loaded'}"
        )

    async def _load_metadata(self, *, refresh: bool) -> ProviderMetadata:
        """One fetch at a time; callers that waited for someone else's fetch share its outcome."""
        seen = self._metadata_attempts
        async with self._metadata_lock:
            if self._metadata_attempts != seen:
                if self._metadata is not None:
                    return self._metadata
                self._unavailable()
            if not refresh:
                if self._metadata is not None:
                    return self._metadata
                if self._recently_failed(self._metadata_failed_at):
                    self._unavailable()
            # Attempts are counted when they finish: a cancelled fetch leaves the next waiter
            # to try again instead of sharing a failure that never happened.
            try:
                metadata = await self._fetch_metadata()
            except ProviderError as exc:
                self._metadata_attempts += 1
                self._metadata_failed_at = self._clock()
                self.last_error = exc.reason
                raise
            self._metadata_attempts += 1
            self._metadata = metadata
            self._metadata_failed_at = None
            return metadata

    async def _load_keys(self, mode: Literal["initial", "refresh", "unknown_kid"]) -> KeySet | None:
        """The JWKS; for an unknown kid at most one re-fetch per min_jwks_refresh_interval."""
        metadata = await self.ensure_metadata()
        seen = self._keys_attempts
        async with self._keys_lock:
            if self._keys_attempts != seen:
                if self._keys is not None:
                    return self._keys
                self._unavailable()
            if mode == "initial":
                if self._keys is not None:
                    return self._keys
                if self._recently_failed(self._keys_failed_at):
                    self._unavailable()
            elif mode == "unknown_kid":
                # Security: a flood of tokens with junk kids costs the provider one request
                # per interval at most.
                now = self._clock()
                last = self._kid_refetch_at
                if last is not None and now - last < self.min_jwks_refresh_interval:
                    return None
                self._kid_refetch_at = now
            try:
                keys = await self._fetch_keys(metadata.jwks_uri)
            except ProviderError as exc:
                self._keys_attempts += 1
                self._keys_failed_at = self._clock()
                self.last_error = exc.reason
                raise
            self._keys_attempts += 1
            if self._keys is None:
                log.info("provider %s ready: %d signature key(s)", self.name, len(keys.keys))
            elif {k.kid for k in self._keys} - {k.kid for k in keys}:
                # Security: a key left the JWKS (retired, maybe compromised): tokens it
                # verified are verified again rather than served from a cache (this one, and
                # every cache that remembers this epoch: auth's bearer identities).
                self.cache.clear()
                self.keys_epoch += 1
            self._keys = keys
            self._keys_failed_at = None
            self.last_error = None
            return keys

    async def ensure_metadata(self) -> ProviderMetadata:
        """The provider's metadata, fetched on first use (concurrent callers share one fetch)."""
        if self._metadata is not None:
            return self._metadata
        return await self._load_metadata(refresh=False)

    async def ensure_keys(self) -> KeySet:
        if self._keys is not None:
            return self._keys
        keys = await self._load_keys("initial")
        assert keys is not None
        return keys

    async def refresh(self) -> None:
        """Re-fetch metadata and JWKS now; raises ProviderError (old values are kept)."""
        await self._load_metadata(refresh=True)
        await self._load_keys("refresh")

    # --- validation -----------------------------------------------------------------------

    async def validate(
        self, token: str, *, nonce: str | None = None, leeway: int
    ) -> dict[str, Any]:
        """The claims of a valid ID token for this provider; TokenError or ProviderError."""
        issuer, client_id = self.config.issuer, self.config.client_id
        cached = self.cache.get(token, issuer, client_id, self._clock())
        if cached is not None:
            if nonce is not None:
                check_nonce(cached, nonce)
            return cached
        failure = self.cache.get_failure(token, issuer, client_id, self._clock())
        if failure is not None:
            raise failure

        # Cheap checks first: garbage never costs a request to the provider.
        parsed = parse_token(token)
        check_header(parsed.header, self.config.allowed_algorithms or ASYMMETRIC_ALGORITHMS)

        metadata = await self.ensure_metadata()
        keys = await self.ensure_keys()
        options: dict[str, Any] = {
            "issuer": issuer,
            "client_id": client_id,
            "allowed_algs": allowed_algorithms(self.config, metadata),
            "leeway": leeway,
            "nonce": nonce,
            "trusted_audiences": self.config.trusted_audiences,
        }
        try:
            claims = await self._verify(parsed, keys, verify_parsed, options)
        except TokenError as exc:
            self.cache.put_failure(token, issuer, client_id, exc, self._clock())
            raise
        self.cache.put(token, issuer, client_id, claims)
        return claims

    async def validate_logout_token(self, token: str, *, leeway: int) -> dict[str, Any]:
        """The claims of a valid Back-Channel Logout 1.0 logout token from this provider (not
        cached: each is used once); TokenError or ProviderError. Replay is the caller's check."""
        parsed = parse_token(token)
        check_logout_header(parsed.header, self.config.allowed_algorithms or ASYMMETRIC_ALGORITHMS)
        metadata = await self.ensure_metadata()
        keys = await self.ensure_keys()
        options: dict[str, Any] = {
            "issuer": self.config.issuer,
            "client_id": self.config.client_id,
            "allowed_algs": allowed_algorithms(self.config, metadata),
            "leeway": leeway,
            "trusted_audiences": self.config.trusted_audiences,
        }
        return await self._verify(parsed, keys, verify_logout_token, options)

    async def _verify(
        self,
        parsed: ParsedToken,
        keys: KeySet,
        verify: Callable[..., dict[str, Any]],
        options: dict[str, Any],
    ) -> dict[str, Any]:
        """`verify` with the cached keys, once more after a JWKS re-fetch for an unknown kid."""
        try:
            return verify(parsed, keys=keys, now=self._clock(), **options)
        except TokenError as exc:
            if exc.code != "unknown_kid":
                raise
            refreshed = await self._refetch_for_unknown_kid()
            if refreshed is None:
                raise
            return verify(parsed, keys=refreshed, now=self._clock(), **options)

    async def _refetch_for_unknown_kid(self) -> KeySet | None:
        try:
            return await self._load_keys("unknown_kid")
        except ProviderError as exc:
            # Keys cached before still serve; this token is simply not verifiable now.
            log.warning("provider %s: JWKS re-fetch failed: %s", self.name, exc.reason)
            return None

    # --- background -----------------------------------------------------------------------

    async def run_refresh(self, stop: asyncio.Event | None = None) -> None:
        """Discover, then keep metadata and keys fresh until `stop` is set or cancelled.

        Each document has its own schedule: the discovery document its max-age (1 min..24 h),
        the JWKS its max-age within [min_jwks_refresh_interval, jwks_refresh_seconds]. A failed
        refresh keeps what was loaded and is retried with jittered exponential backoff.
        """
        stop = stop if stop is not None else asyncio.Event()
        loop = asyncio.get_running_loop()
        schedules = (
            _Schedule(
                "discovery document",
                lambda: self._load_metadata(refresh=True),
                lambda: self._metadata_interval,
                backoff=INITIAL_BACKOFF_SECONDS,
            ),
            _Schedule(
                "JWKS",
                lambda: self._load_keys("refresh"),
                lambda: self._keys_interval,
                backoff=INITIAL_BACKOFF_SECONDS,
            ),
        )
        while not stop.is_set():
            for schedule in schedules:
                if schedule.due <= loop.time():
                    await self._run_one(schedule, loop)
            delay = min(schedule.due for schedule in schedules) - loop.time()
            try:
                await asyncio.wait_for(stop.wait(), max(delay, 0.0))
            except TimeoutError:
                pass

    async def _run_one(self, schedule: _Schedule, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await schedule.load()
        except Exception as exc:  # the loop must survive anything; CancelledError passes
            reason = exc.reason if isinstance(exc, ProviderError) else type(exc).__name__
            if not isinstance(exc, ProviderError):
                log.exception("provider %s: refresh failed unexpectedly", self.name)
                self.last_error = reason
            delay = schedule.backoff * random.uniform(0.5, 1.0)  # noqa: S311 (jitter)
            schedule.backoff = min(schedule.backoff * 2, MAX_BACKOFF_SECONDS)
            log.warning(
                "provider %s: %s refresh failed (%s); retrying in %.1fs",
                self.name,
                schedule.what,
                reason,
                delay,
            )
        else:
            schedule.backoff = INITIAL_BACKOFF_SECONDS
            delay = self._keys_interval if schedule.what == "JWKS" else self._metadata_interval
        schedule.due = loop.time() + delay


@dataclass(slots=True)
class _Schedule:
    """One document's refresh in the background loop: when next, and the backoff after a failure."""

    what: str
    load: Callable[[], Awaitable[object]]
    interval: Callable[[], float]  # after a success: the document's lifetime
    backoff: float
    due: float = 0.0


class ProviderRegistry:
    """The providers of one database, in configuration order."""

    def __init__(
        self,
        oidc: OIDCConfig,
        http: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
        min_jwks_refresh_interval: float = 30.0,
        on_fetch: FetchObserver | None = None,
    ) -> None:
        self._providers = {
            name: Provider(
                name,
                conf,
                http,
                clock=clock,
                timeout=timeout,
                min_jwks_refresh_interval=min_jwks_refresh_interval,
                on_fetch=on_fetch,
            )
            for name, conf in oidc.providers.items()
        }
        default = oidc.default
        self.default: Provider | None = self._providers[default] if default else None

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._providers.values())

    def __len__(self) -> int:
        return len(self._providers)

    @property
    def providers(self) -> tuple[Provider, ...]:
        return tuple(self._providers.values())

    def get(self, name: str | None) -> Provider:
        """The named provider, or the default for None/""; BadRequest when there is none."""
        provider = self._providers.get(name) if name else self.default
        if provider is None:
            raise BadRequest("Unable to identify provider")
        return provider

    def for_token(self, token: str) -> Provider:
        """Sync Gateway's bearer rule: the only provider, else the first matching iss and aud.

        The unverified payload is read only to choose; the chosen provider verifies everything.
        """
        if len(self._providers) == 1:
            return next(iter(self._providers.values()))
        claims = parse_token(token).claims
        iss, aud = claims.get("iss"), claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if isinstance(iss, str) and isinstance(audiences, list):
            strings = [a for a in audiences if isinstance(a, str)]
            for provider in self._providers.values():
                if provider.matches(iss, strings):
                    return provider
        raise TokenError("no provider matches the token's issuer and audience", "issuer")

    @property
    def ready(self) -> bool:
        return any(p.ready for p in self._providers.values())

    def status(self) -> dict[str, bool]:
        """Readiness per provider name (no URLs, no secrets)."""
        return {name: p.ready for name, p in self._providers.items()}

    async def run_refresh(self, stop: asyncio.Event | None = None) -> None:
        """Every provider's refresh loop, together; returns when `stop` is set."""
        async with asyncio.TaskGroup() as group:
            for provider in self._providers.values():
                group.create_task(provider.run_refresh(stop), name=f"oidc-refresh-{provider.name}")
