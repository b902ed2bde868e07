"""The bound on anonymous login starts: token buckets per client and per process (pure, with a
fake clock), the client address behind trusted proxies, and the real sidecar's 429."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import aiohttp
import pytest
from multidict import CIMultiDict
from support.builtin_provider import DB, builtin_sidecar

from sidecar.browser import MAX_RETURN_TARGET, safe_return_target
from sidecar.config import LoginRateLimitConfig
from sidecar.oidc.login_limit import LoginLimiter, client_address


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **config: float) -> LoginLimiter:
    settings = {"per_client_burst": 3, "per_client_per_minute": 60, "total_burst": 5}
    return LoginLimiter(
        LoginRateLimitConfig.model_validate(settings | config), clock=clock, max_clients=4
    )


def test_per_client_bucket() -> None:
    clock = Clock()
    limit = limiter(clock)
    assert [limit.admit("a") for _ in range(3)] == [0, 0, 0]
    assert limit.admit("a") == pytest.approx(1.0)  # 60 a minute: one a second
    assert limit.admit("b") == 0  # another client has its own bucket
    clock.now += 0.5
    assert limit.admit("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limit.admit("a") == 0
    assert limit.admit("a") == pytest.approx(1.0)
    clock.now += 3600
    assert [limit.admit("a") for _ in range(4)][-1] > 0  # refilled to the burst, no more


def test_process_bucket_bounds_every_client_together() -> None:
    clock = Clock()
    limit = limiter(clock, total_burst=5, total_per_minute=6)
    assert [limit.admit(f"c{i}") for i in range(5)] == [0] * 5
    assert limit.admit("c9") == pytest.approx(10.0)  # 6 a minute: one every 10 s
    clock.now += 10
    assert limit.admit("c9") == 0


def test_refused_starts_take_no_token() -> None:
    clock = Clock()
    limit = limiter(clock, total_burst=1)
    assert limit.admit("a") == 0
    assert limit.admit("b") > 0  # the process bucket is empty...
    clock.now += 2
    assert limit.admit("b") == 0  # ...and b's own bucket was not drained by the refusal


def test_client_buckets_are_bounded() -> None:
    clock = Clock()
    limit = limiter(clock, total_burst=1000)
    for _ in range(3):
        limit.admit("a")
    for name in "bcde":  # max_clients=4: a, the least recently used, is forgotten
        limit.admit(name)
    assert limit.admit("a") == 0
    assert len(limit._clients) == 4


TRUSTED = [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("203.0.113.5", [], "203.0.113.5"),
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # untrusted peer: its claim ignored
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.2", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client wrote 6.6.6.6
        ("10.0.0.2", ["6.6.6.6", "198.51.100.1, 10.0.0.9"], "198.51.100.1"),
        ("10.0.0.2", ["10.0.0.7, 10.0.0.9"], "10.0.0.7"),  # all trusted: the first
        ("10.0.0.2", [], "10.0.0.2"),
        (None, [], "-"),
    ],
)
def test_client_address(peer: str | None, forwarded_for: list[str], client: str) -> None:
    headers: CIMultiDict[str] = CIMultiDict(("X-Forwarded-For", v) for v in forwarded_for)
    assert client_address(peer, headers, TRUSTED) == client


def test_return_target_length_bound() -> None:
    assert MAX_RETURN_TARGET == 1024
    assert safe_return_target("/" + "a" * (MAX_RETURN_TARGET - 1)) is not None
    assert safe_return_target("/" + "a" * MAX_RETURN_TARGET) is None


async def test_login_starts_over_the_limit_get_429() -> None:
    limit = {"per_client_burst": 2, "per_client_per_minute": 1}
    async with builtin_sidecar(login_rate_limit=limit) as sidecar, aiohttp.ClientSession() as http:
        statuses = []
        for path in ("_oidc", "_oidc_challenge", "_oidc", "_oidc_challenge"):
            async with http.get(f"{sidecar.url}/{DB}/{path}", allow_redirects=False) as response:
                statuses.append(response.status)
                last = response
                body = await response.json() if response.status == 429 else None
        assert statuses == [302, 401, 429, 429]
        assert body == {
            "error": "Too Many Requests",
            "reason": "too many logins started: try again later",
        }
        assert 1 <= int(last.headers["Retry-After"]) <= 60
        assert "Set-Cookie" not in last.headers
        # Other endpoints are not limited.
        async with http.get(
            f"{sidecar.url}/{DB}/_oidc_testing/.well-known/openid-configuration"
        ) as r:
            assert r.status == 200


async def test_an_over_long_return_target_falls_back() -> None:
    async with builtin_sidecar() as sidecar, aiohttp.ClientSession() as http:
        for length in (MAX_RETURN_TARGET + 1, 5000):  # beyond the other parameters' 4096 too
            rd = f"/{DB}/" + "a" * length
            async with http.get(
                f"{sidecar.url}/{DB}/_oidc", params={"rd": rd}, allow_redirects=False
            ) as response:
                assert response.status == 302
                assert "rd" not in response.headers["Location"]
