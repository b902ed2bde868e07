"""Typed, frozen configuration loaded from YAML; every problem is reported with its YAML path.

Validation is pure (no network). Secrets may be inline, `{env: NAME}` or `{file: PATH}`
(a mounted Kubernetes Secret) and are held in `Secret`, whose repr hides the value.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails, core_schema

from sidecar.browser import parse_origin, safe_return_target, serialized_origin

DEFAULT_SCOPE = ("openid", "email")
PROVIDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*$")  # Sync Gateway: no "_"
# Sync Gateway's database name rule: starts with a lowercase letter.
DATABASE_NAME = re.compile(r"^[a-z][a-z0-9_$()+\-]*$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
SESSION_TTL = 86400  # idle TTL, seconds (Sync Gateway's default)
SESSION_MAX_LIFETIME = 7 * 86400  # absolute session lifetime, seconds


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists `path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


class Secret:
    """A secret string whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(cls._resolve)

    @classmethod
    def _resolve(cls, raw: Any) -> Secret:
        if isinstance(raw, Secret):
            return raw
        if isinstance(raw, str):
            if not raw:
                raise ValueError("must not be empty")
            return cls(raw)
        if isinstance(raw, Mapping) and len(raw) == 1:
            ((kind, ref),) = raw.items()
            if kind == "value" and isinstance(ref, str) and ref:
                return cls(ref)
            if kind == "env" and isinstance(ref, str):
                value = os.environ.get(ref)
                if not value:
                    raise ValueError(f"environment variable {ref} is not set or empty")
                return cls(value)
            if kind == "file" and isinstance(ref, str):
                try:
                    value = Path(ref).read_text().strip()
                except OSError as exc:
                    raise ValueError(f"cannot read secret file {ref}: {exc.strerror}") from None
                if not value:
                    raise ValueError(f"secret file {ref} is empty")
                return cls(value)
        raise ValueError("must be a string, {value: ...}, {env: NAME} or {file: PATH}")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _http_url(value: str, *, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL")
    return value


HttpUrl = Annotated[str, Field(min_length=1)]


class ProviderConfig(Model):
    """One OpenID Provider, exactly Sync Gateway's `oidc.providers.<name>` block (plus a few)."""

    issuer: str
    client_id: str = Field(min_length=1)
    validation_key: Secret | None = None  # the client secret; without it no auth code flow
    callback_url: str | None = None
    # `register` shadows BaseModel.register, so the attribute is `register_user`.
    register_user: bool = Field(default=False, alias="register")
    user_prefix: str | None = None
    username_claim: str | None = None
    roles_claim: str | None = None
    channels_claim: str | None = None
    disable_session: bool = False
    scope: tuple[str, ...] = DEFAULT_SCOPE
    include_access: bool = False
    discovery_url: str | None = None
    disable_cfg_validation: bool = False
    disable_callback_state: bool = False
    allow_unsigned_provider_tokens: bool = False
    # Extensions beyond Sync Gateway:
    token_endpoint_auth_method: Literal["auto", "client_secret_basic", "client_secret_post"] = (
        "auto"
    )
    # Extra audiences besides client_id that a token may carry (RFC 7519 aud); empty = none.
    trusted_audiences: tuple[str, ...] = ()
    allowed_algorithms: tuple[str, ...] | None = None
    # The JWKS is fetched again at least this often (and when its Cache-Control max-age runs
    # out, never more often than every 30 s): a key the provider retired stops being accepted
    # within this many seconds even when no token with an unknown kid arrives.
    jwks_refresh_seconds: int = Field(default=300, ge=30, le=86400)
    # RP-Initiated Logout 1.0: where the provider sends the browser after its logout (must be
    # registered there); default: the sidecar's own /{db}/_oidc_logout/done page.
    post_logout_redirect_uri: str | None = None

    @field_validator("issuer", "discovery_url", "callback_url", "post_logout_redirect_uri")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value, what="URL")

    @field_validator("scope", mode="before")
    @classmethod
    def _scope(cls, value: Any) -> Any:
        # Sync Gateway takes a list; a space-separated string (OAuth's own form) is accepted too.
        if isinstance(value, str):
            return tuple(value.split())
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError("must be a list of strings or a space-separated string")

    @field_validator("allow_unsigned_provider_tokens")
    @classmethod
    def _no_unsigned(cls, value: bool) -> bool:
        # Security: unsigned ID tokens are never accepted by this sidecar.
        if value:
            raise ValueError("unsigned provider tokens are never accepted by the sidecar")
        return value

    @field_validator("allowed_algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        from sidecar.oidc.algorithms import ASYMMETRIC_ALGORITHMS

        bad = [a for a in value if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(
                f"unsupported algorithm(s) {bad}; allowed: {sorted(ASYMMETRIC_ALGORITHMS)}"
            )
        if not value:
            raise ValueError("must not be empty")
        return value


class OIDCConfig(Model):
    default_provider: str | None = None
    providers: dict[str, ProviderConfig] = Field(min_length=1)

    @property
    def default(self) -> str | None:
        """The default provider: named by `default_provider`, or the only one."""
        if self.default_provider:
            return self.default_provider
        if len(self.providers) == 1:
            return next(iter(self.providers))
        return None


class SyncGatewayBridge(Model):
    """Make Couchbase Sync Gateway see the user: it reads no identity headers, so the sidecar
    keeps the user in Sync Gateway (admin API) and sends a Sync Gateway session upstream."""

    admin_url: str  # Sync Gateway's admin API, on loopback in the pod, e.g. http://127.0.0.1:4988
    database: str | None = None  # Sync Gateway's database name; default: the sidecar's
    username: str | None = None  # admin API credentials (Sync Gateway 3 RBAC)
    password: Secret | None = None
    session_ttl: int = Field(default=3600, ge=300, le=7 * 86400)
    sync_user: bool = True  # keep email, admin_channels and admin_roles in step with the identity

    @field_validator("admin_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value, what="admin_url")


def _cors_origin(value: str) -> str:
    """An origin as browsers serialize it (RFC 6454 6.2: lowercase scheme and host, no default
    port), so that a request's `Origin` compares with it exactly."""
    if value == "*":
        # Security: a wildcard would let every web site use a visitor's cookie session.
        raise ValueError("'*' is not allowed: it would let any site use a visitor's session")
    if value == "null":
        raise ValueError(
            "'null' is not an origin to list: every sandboxed frame and file: page has it"
        )
    canonical = serialized_origin(value)
    if canonical is None:
        raise ValueError(f"{value!r} is not an origin (scheme://host[:port], nothing more)")
    return canonical


def _header_name(value: str) -> str:
    if not HEADER_NAME.match(value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value


CorsOrigin = Annotated[str, AfterValidator(_cors_origin)]
HeaderName = Annotated[str, AfterValidator(_header_name)]


class CORSConfig(Model):
    """Sync Gateway's per-database CORS block (sidecar/cors.py): other sites' pages allowed to
    call this database with credentials, the sidecar answering preflights itself. The same
    list is the cookie session's Origin policy (sessions/origin.py)."""

    origin: tuple[CorsOrigin, ...] = ()
    # Sync Gateway's list for `/{db}/_session` login/logout from another site; here: origins
    # allowed there (and only there) besides `origin`.
    login_origin: tuple[CorsOrigin, ...] = ()
    headers: tuple[HeaderName, ...] = ()  # allowed request headers besides the defaults
    expose_headers: tuple[HeaderName, ...] = ()  # response headers a page may read
    # Seconds a browser may reuse a preflight's answer (Sync Gateway's default 0 asks again
    # before every request; browsers cap it: Chromium at 7200).
    max_age: int = Field(default=600, ge=0, le=86400)


def _redirect_origin(value: str) -> str:
    origin = parse_origin(value)
    if origin is None or origin[0] not in ("http", "https"):
        raise ValueError(
            f"{value!r} is not an origin: scheme://host[:port] (http or https, "
            "no trailing /, path, user, query or fragment)"
        )
    return value


class DatabaseConfig(Model):
    upstream: str | None = None  # overrides the global upstream for this database
    session_cookie_name: str = "SyncGatewaySession"
    oidc: OIDCConfig | None = None
    sync_gateway: SyncGatewayBridge | None = None
    cors: CORSConfig = CORSConfig()
    # Browsers: a page load without credentials is sent to the login instead of a 401.
    browser_login: bool = True
    # Origins besides the sidecar's own that a login's `rd` return target may point to.
    allowed_redirect_origins: tuple[Annotated[str, AfterValidator(_redirect_origin)], ...] = ()

    @field_validator("upstream")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value, what="upstream")

    @field_validator("session_cookie_name")
    @classmethod
    def _cookie(cls, value: str) -> str:
        if not HEADER_NAME.match(value) or "=" in value:
            raise ValueError("not a valid cookie name")
        return value


class IdentityHeaders(Model):
    user: str = "X-Forwarded-User"
    email: str = "X-Forwarded-Email"
    roles: str = "X-Forwarded-Roles"
    channels: str = "X-Forwarded-Channels"

    @field_validator("user", "email", "roles", "channels")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError("not a valid HTTP header name")
        return value


class CouchDBProxyAuth(Model):
    """CouchDB proxy authentication headers (X-Auth-CouchDB-UserName/-Roles/-Token)."""

    enabled: bool = False
    secret: Secret | None = None  # couch_httpd_auth.secret; adds X-Auth-CouchDB-Token when set


class SessionConfig(Model):
    ttl: int = Field(default=SESSION_TTL, ge=60, le=365 * 86400)  # idle TTL, seconds
    # Absolute lifetime: no extension goes past created + max_lifetime (>= ttl, cross_checks).
    max_lifetime: int = Field(default=SESSION_MAX_LIFETIME, ge=60, le=365 * 86400)
    cookie_secure: Literal["auto", "always", "never"] = "auto"
    # Sessions are cached locally for this long at most; invalidation via pub/sub is immediate.
    local_cache_seconds: float = Field(default=30.0, ge=0, le=300)


class LoginRateLimitConfig(Model):
    """How many logins (`/{db}/_oidc`, `_oidc_challenge`) this process starts: a token bucket
    per client address and one for the whole process; each start stores login state for 5
    minutes, so this bounds what anonymous callers can make the session store hold."""

    per_client_burst: int = Field(default=30, ge=1, le=1_000_000)
    per_client_per_minute: float = Field(default=30.0, gt=0, le=1_000_000)
    total_burst: int = Field(default=600, ge=1, le=1_000_000)
    total_per_minute: float = Field(default=1200.0, gt=0, le=10_000_000)


class TestProviderConfig(Model):
    enabled: bool = False


class UnsupportedConfig(Model):
    oidc_test_provider: TestProviderConfig = TestProviderConfig()


class LoggingConfig(Model):
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class TimeoutsConfig(Model):
    upstream_connect: float = Field(default=10.0, gt=0)
    upstream_read: float = Field(default=300.0, gt=0)  # time between bytes, not total
    provider: float = Field(default=10.0, gt=0)
    # Longest a client connection may sit with no request in progress: idle keep-alive, or a
    # request whose head has not fully arrived (slowloris). Answers in progress (streams,
    # websockets) are never cut by it.
    client_idle: float = Field(default=75.0, gt=0, le=3600)


AdminPath = Literal["/_metrics", "/_health", "/_ready"]
ADMIN_OPEN_PATHS: tuple[AdminPath, ...] = ("/_metrics", "/_health", "/_ready")
# RFC 6750 2.1 b64token: what a client can send after `Bearer ` as is.
BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


class AdminAuthConfig(Model):
    """Authentication for the admin listener: HTTP Basic (username + password) and/or a bearer
    secret. Without this block the admin API is open to whoever reaches its port."""

    username: str | None = None
    password: Secret | None = None
    bearer_token: Secret | None = None
    # Paths answered without credentials (Prometheus, kubelet probes); any of ADMIN_OPEN_PATHS.
    open_paths: tuple[AdminPath, ...] = ADMIN_OPEN_PATHS

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        # RFC 7617 2: the user-id cannot contain a colon; control characters cannot be typed.
        if value is not None and (not value or ":" in value or not value.isprintable()):
            raise ValueError("must be non-empty, printable and without ':'")
        return value

    @field_validator("bearer_token")
    @classmethod
    def _bearer(cls, value: Secret | None) -> Secret | None:
        if value is not None and not BEARER_TOKEN.match(value.get()):  # never echoes the value
            raise ValueError("must be RFC 6750 token characters (A-Z a-z 0-9 -._~+/ then =)")
        return value


def _listen(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be host:port or :port, as a string (e.g. '127.0.0.1:4984')")
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("must be host:port or :port (e.g. '127.0.0.1:4984' or ':4984')")
    if not 0 < int(port) < 65536:
        raise ValueError("port must be between 1 and 65535")
    return text


class Settings(Model):
    interface: str = ":4984"
    admin_interface: str = "127.0.0.1:4985"
    upstream: str | None = None
    public_url: str | None = None  # e.g. https://sync.example.com, used for callback URLs
    # redis://, rediss://, unix://, redis+sentinel://, redis+cluster://; a Secret because the
    # URL may carry a password ({env: ...} or {file: ...} keep it out of the ConfigMap).
    session_store: Secret | None = None
    databases: dict[str, DatabaseConfig] = Field(min_length=1)
    identity_headers: IdentityHeaders = IdentityHeaders()
    couchdb_proxy_auth: CouchDBProxyAuth = CouchDBProxyAuth()
    pass_authorization: bool = False  # forward the bearer token / session cookie upstream
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* headers are trusted
    # More request headers to remove besides the built-in lists: names, or "Prefix-*".
    strip_request_headers: tuple[str, ...] = ()
    clock_skew_seconds: int = Field(default=60, ge=0, le=600)
    session: SessionConfig = SessionConfig()
    login_rate_limit: LoginRateLimitConfig = LoginRateLimitConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    unsupported: UnsupportedConfig = UnsupportedConfig()
    logging: LoggingConfig = LoggingConfig()
    admin_auth: AdminAuthConfig | None = None  # None: the admin listener asks no credentials
    shutdown_grace_seconds: float = Field(default=25.0, ge=0, le=3600)
    max_body_bytes: int | None = Field(default=None, ge=0)  # None: unlimited, streamed
    demo_upstream: bool = False  # serve a small built-in upstream (for `make run`)
    # HTTP client of the proxied path: aiohttp's ClientSession, or the lean httptools one
    # (sidecar/upstream_h1.py). WebSockets always go through aiohttp's client.
    upstream_transport: Literal["aiohttp", "h1"] = "h1"

    @field_validator("interface", "admin_interface", mode="before")
    @classmethod
    def _listen(cls, value: Any) -> str:
        return _listen(value)

    @field_validator("upstream", "public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value, what="URL")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        # The sidecar's URLs and cookie paths are built under it: a base, nothing after.
        if value is not None and ("?" in value or "#" in value):
            raise ValueError(
                "must not have a query or fragment (a base URL, e.g. https://host/prefix)"
            )
        return value

    @field_validator("session_store")
    @classmethod
    def _store(cls, value: Secret | None) -> Secret | None:
        if value is None:
            return value
        scheme = urlsplit(value.get()).scheme
        allowed = (
            "redis",
            "rediss",
            "unix",
            "redis+sentinel",
            "rediss+sentinel",
            "redis+cluster",
            "rediss+cluster",
        )
        if scheme not in allowed:  # the URL itself is not echoed: it may hold a password
            raise ValueError(f"must be a Redis URL ({', '.join(s + '://' for s in allowed)})")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return value

    @field_validator("strip_request_headers")
    @classmethod
    def _strip(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            name = item.removesuffix("*")
            # "*" alone (or a one-letter prefix) would remove headers the upstream needs.
            if len(name) < 2 or not HEADER_NAME.match(name) or "*" in name:
                raise ValueError(
                    f"{item!r} is not a header name or a 'Prefix-*' of at least 2 characters"
                )
        return value

    def upstream_for(self, db: str) -> str:
        conf = self.databases[db]
        url = conf.upstream or self.upstream
        assert url is not None  # guaranteed by cross_checks unless demo_upstream fills it in
        return url


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


_PLAIN = {
    "missing": "required",
    "extra_forbidden": "unknown key",
    "string_type": "must be a string",
    "string_unicode": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "none_required": "must be empty",
}
_BOUNDS = {  # error type -> (words, the bound's name in the error's context)
    "greater_than_equal": ("must be at least", "ge"),
    "greater_than": ("must be greater than", "gt"),
    "less_than_equal": ("must be at most", "le"),
    "less_than": ("must be less than", "lt"),
}


def _plain(err: ErrorDetails) -> str:
    """pydantic's error in plain words: its own wording ("Input should be a valid ...",
    "Value error, ...") never reaches the user. Every error type our models can raise is here;
    anything else says what was expected without pydantic's phrasing."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", "is not valid"))
    unit = "characters" if kind.startswith("string_") else "entries"
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length", 1)
        return "must not be empty" if least == 1 else f"must have at least {least} {unit}"
    if kind in ("too_long", "string_too_long"):
        return f"must have at most {ctx.get('max_length')} {unit}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind in _BOUNDS:
        words, bound = _BOUNDS[kind]
        return f"{words} {ctx.get(bound)}"
    return _PLAIN.get(kind, "is not valid here")


def _messages(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = _plain(err)
        if loc and loc[-1] == "[key]":  # a mapping's key, e.g. a database name given as 1
            loc, msg = loc[:-1], f"name {msg}"
        problems.append(f"{_path(loc)}: {msg}")
    return problems


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cross_checks(data: Mapping[str, Any]) -> list[str]:
    """Rules that span keys, run on the raw document so they are reported even when other
    fields are invalid too (pydantic skips a model's own validators once a field failed)."""
    problems: list[str] = _admin_auth_checks(data.get("admin_auth"))
    session = data.get("session")
    if isinstance(session, Mapping):
        ttl = session.get("ttl", SESSION_TTL)
        lifetime = session.get("max_lifetime", SESSION_MAX_LIFETIME)
        if _whole(ttl) and _whole(lifetime) and lifetime < ttl:
            problems.append(
                f"session.max_lifetime: must be at least session.ttl ({ttl}); "
                f"the default is {SESSION_MAX_LIFETIME} (7 days)"
            )
    databases = data.get("databases")
    if not isinstance(databases, Mapping):
        return problems
    for db, conf in databases.items():
        path = f"databases.{db}"
        if not isinstance(db, str) or not DATABASE_NAME.match(db):
            problems.append(f"{path}: database name must start with a-z and use a-z 0-9 _$()+-")
        if not isinstance(conf, Mapping):
            conf = {}
        if not conf.get("upstream") and not data.get("upstream") and not data.get("demo_upstream"):
            problems.append(f"upstream: required (database {db} has no upstream of its own)")
        oidc = conf.get("oidc")
        if not isinstance(oidc, Mapping):
            continue
        providers = oidc.get("providers")
        names = list(providers) if isinstance(providers, Mapping) else []
        for name in names:
            if not isinstance(name, str) or not PROVIDER_NAME.match(name):
                problems.append(
                    f"{path}.oidc.providers.{name}: provider names may contain only letters, "
                    "digits, '.' and '-' (no '_')"
                )
        problems += _post_logout_checks(data, conf, path, providers)
        default = oidc.get("default_provider")
        if default is not None and default not in names:
            problems.append(f"{path}.oidc.default_provider: {default!r} is not in providers")
    return problems


def _post_logout_checks(
    data: Mapping[str, Any], conf: Mapping[str, Any], path: str, providers: Any
) -> list[str]:
    """A provider's `post_logout_redirect_uri` follows the return-target rule of `rd`
    (sidecar.browser.safe_return_target): its origin is listed in the database's
    `allowed_redirect_origins`, or is `public_url`'s."""
    if not isinstance(providers, Mapping):
        return []
    allowed = conf.get("allowed_redirect_origins") or ()
    if not isinstance(allowed, list | tuple) or not all(isinstance(a, str) for a in allowed):
        return []  # reported by the model
    public_url = data.get("public_url")
    if isinstance(public_url, str):
        parts = urlsplit(public_url)
        allowed = (*allowed, f"{parts.scheme}://{parts.netloc}")
    problems = []
    for name, provider in providers.items():
        uri = provider.get("post_logout_redirect_uri") if isinstance(provider, Mapping) else None
        if isinstance(uri, str) and safe_return_target(uri, allowed) is None:
            problems.append(
                f"{path}.oidc.providers.{name}.post_logout_redirect_uri: not an allowed return "
                f"target: list its origin in {path}.allowed_redirect_origins (or set public_url "
                "to this origin)"
            )
    return problems


def _admin_auth_checks(auth: Any) -> list[str]:
    if not isinstance(auth, Mapping):
        return []
    user, password = auth.get("username") is not None, auth.get("password") is not None
    if user and not password:
        return ["admin_auth.password: required when username is set"]
    if password and not user:
        return ["admin_auth.username: required when password is set"]
    if not user and auth.get("bearer_token") is None:
        return ["admin_auth: needs username and password, or bearer_token, or both"]
    return []


def parse_settings(data: Any) -> Settings:
    """Validate a parsed YAML document; raises ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(["(top level): must be a mapping"])
    problems = []
    settings = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = _messages(exc)
    problems += cross_checks(data)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def load_settings(path: str | os.PathLike[str]) -> Settings:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_settings(data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML, but a key given twice is an error: with the last one silently winning, a
    later `pass_authorization: true` could hide an earlier `false`."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
