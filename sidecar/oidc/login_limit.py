"""A cheap bound on anonymous login starts.

Each `/{db}/_oidc` or `_oidc_challenge` stores the login's state (with its return target)
for five minutes, for anyone who asks. Token buckets — one per client address, one for the
whole process — bound how fast they can be started, hence how much login state anonymous
callers can make the session store hold (with Redis, memory pressure could evict sessions).
Over the limit: 429 with Retry-After (`oidc.routes`). Pure: the clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from multidict import MultiMapping

from sidecar.config import LoginRateLimitConfig
from sidecar.headers import client_ip_trusted

MAX_CLIENTS = 10_000  # buckets kept, least recently used forgotten first


@dataclass
class TokenBucket:
    """`burst` tokens at most, refilled at `rate` a second."""

    burst: float
    rate: float
    tokens: float
    updated: float

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0: one is)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


class LoginLimiter:
    """The per-client and whole-process buckets of one process."""

    def __init__(
        self,
        config: LoginRateLimitConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._config = config
        self._clock = clock
        self._max_clients = max_clients
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()
        self._total = self._bucket(config.total_burst, config.total_per_minute, clock())

    @staticmethod
    def _bucket(burst: int, per_minute: float, now: float) -> TokenBucket:
        return TokenBucket(float(burst), per_minute / 60, float(burst), now)

    def admit(self, client: str) -> float:
        """0 when `client` may start a login now (a token taken from both buckets), else the
        seconds until it may."""
        now = self._clock()
        bucket = self._clients.pop(client, None)
        if bucket is None:
            config = self._config
            bucket = self._bucket(config.per_client_burst, config.per_client_per_minute, now)
        self._clients[client] = bucket  # most recently used last
        while len(self._clients) > self._max_clients:
            self._clients.popitem(last=False)
        wait = max(bucket.wait(now), self._total.wait(now))
        if wait == 0:
            bucket.take()
            self._total.take()
        return wait


def client_address(
    peer: str | None,
    headers: MultiMapping[str],
    trusted_networks: Sequence[IPv4Network | IPv6Network],
) -> str:
    """The client's address: our peer, or behind trusted proxies the X-Forwarded-For hop
    nearest to us that is not a trusted proxy itself (never simply the first, which the
    client may have written)."""
    if not client_ip_trusted(peer, trusted_networks):
        return peer or "-"
    hops = [
        hop.strip()
        for value in headers.getall("X-Forwarded-For", ())
        for hop in value.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not client_ip_trusted(hop, trusted_networks):
            return hop
    return hops[0] if hops else peer or "-"
