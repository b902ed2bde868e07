"""Every typed key for app and request state, declared in one place."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network

from aiohttp import ClientSession, web

from sidecar.config import Settings
from sidecar.cors import CorsPolicy
from sidecar.databases import Databases
from sidecar.exchanges import Exchanges
from sidecar.identity import Identity
from sidecar.identity_cache import BearerIdentities
from sidecar.lifecycle import Lifecycle
from sidecar.observability import Metrics
from sidecar.oidc.login_limit import LoginLimiter
from sidecar.proxy import Forwarder
from sidecar.sessions.store import SessionStore
from sidecar.sgbridge import SessionBridge

SETTINGS = web.AppKey[Settings]("settings")
STORE = web.AppKey[SessionStore]("session_store")
DATABASES = web.AppKey[Databases]("databases")
PROVIDER_HTTP = web.AppKey[ClientSession]("provider_http")
FORWARDER = web.AppKey[Forwarder]("forwarder")
EXCHANGES = web.AppKey[Exchanges]("exchanges")  # live proxied requests and websockets
METRICS = web.AppKey[Metrics]("metrics")
LIFECYCLE = web.AppKey[Lifecycle]("lifecycle")
TRUSTED_NETWORKS = web.AppKey[Sequence[IPv4Network | IPv6Network]]("trusted_networks")
SG_BRIDGES = web.AppKey[dict[str, SessionBridge]]("sg_bridges")  # by database name
BEARER_IDENTITIES = web.AppKey[BearerIdentities]("bearer_identities")
CORS = web.AppKey[dict[str, CorsPolicy]]("cors")  # by database name
LOGIN_LIMITER = web.AppKey[LoginLimiter]("login_limiter")  # oidc.login_limit
PUBLIC_APP = web.AppKey[web.Application]("public_app")  # the admin app reaches the public one

# Request state.
IDENTITY = web.RequestKey[Identity]("identity")
REQUEST_ID = web.RequestKey[str]("request_id")
DB_NAME = web.RequestKey[str]("db")
CONTINUE_DEFERRED = web.RequestKey[bool]("continue_deferred")  # Expect: 100-continue pending
SG_SESSION = web.RequestKey[str]("sg_session")  # the Sync Gateway session sent upstream
RETURN_TARGET = web.RequestKey[str | None]("return_target")  # where a login lands the browser
QUIET = web.RequestKey[bool]("quiet")  # the sidecar's own fetch: no access-log line
