"""Shared fixtures: a real redis-server and a real OpenID Provider (npm oidc-provider), once per run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from support.op import OpenIDProvider
from support.redis_server import RedisServer
from support.sidecar import Upstream, running_upstream


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def op() -> Iterator[OpenIDProvider]:
    """The real OP; tests register their clients at run time (their callback ports vary)."""
    with OpenIDProvider() as provider:
        yield provider


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as up:
        yield up
