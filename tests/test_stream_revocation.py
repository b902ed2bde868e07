"""Revocation ends live `_changes` feeds, on the replica that revoked and on another one.

Real processes only: a CouchDB-compatible server (express-pouchdb, tests/peers/pouchdb), two
`sidecar run` replicas on one redis-server, and a raw HTTP/1.1 client reading the continuous or
long-poll feed chunk by chunk. After each way of revoking, not one document written afterwards
may reach the client, and its response must end cut (no terminating chunk), never complete.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import pytest
from conftest import admin_session
from support.pouchdb import PouchDBServer, pouchdb_client
from support.redis_server import RedisServer, free_port
from support.sidecar import Replica, base_config, sidecar_process
from support.stream_reader import Feed, open_feed
from yarl import URL

DB = "db"
COOKIE = "SyncGatewaySession"
FEEDS = {
    "continuous": f"/{DB}/_changes?feed=continuous&include_docs=true&since=now&heartbeat=500",
    "longpoll": f"/{DB}/_changes?feed=longpoll&include_docs=true&since=now",
}


@dataclass(frozen=True)
class Stack:
    pouchdb: PouchDBServer
    a: Replica
    b: Replica


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """express-pouchdb with database `db`, and replicas A and B of one sidecar in front of it."""
    a = Replica(free_port(), free_port())
    b = Replica(free_port(), free_port())
    with PouchDBServer() as pouchdb, RedisServer() as redis:
        create = urllib.request.Request(f"{pouchdb.url}/{DB}", method="PUT")
        with urllib.request.urlopen(create, timeout=10) as response:
            assert response.status == 201

        def config(replica: Replica) -> dict[str, Any]:
            return base_config(
                replica.port,
                replica.admin_port,
                upstream=pouchdb.url,
                session_store=redis.url,
                databases={DB: {}},
            )

        with sidecar_process(config(a)), sidecar_process(config(b)):
            yield Stack(pouchdb, a, b)


@dataclass(frozen=True)
class Caller:
    name: str
    session_id: str

    @property
    def cookie(self) -> dict[str, str]:
        return {"Cookie": f"{COOKIE}={self.session_id}"}


async def call(method: str, url: str, *, body: Any = None, headers: Any = None) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, URL(url, encoded=True), json=body, headers=headers) as response,
    ):
        await response.read()
        return response.status


Revoke = Callable[[Replica, Caller], Awaitable[int]]


async def logout(replica: Replica, caller: Caller) -> int:
    return await call("DELETE", f"{replica.url}/{DB}/_session", headers=caller.cookie)


async def admin_delete_session(replica: Replica, caller: Caller) -> int:
    return await call("DELETE", f"{replica.admin_url}/{DB}/_session/{caller.session_id}")


async def revoke_all_sessions(replica: Replica, caller: Caller) -> int:
    return await call("DELETE", f"{replica.admin_url}/{DB}/_user/{caller.name}/_session")


async def delete_user(replica: Replica, caller: Caller) -> int:
    return await call("DELETE", f"{replica.admin_url}/{DB}/_user/{caller.name}")


async def disable_user(replica: Replica, caller: Caller) -> int:
    url = f"{replica.admin_url}/{DB}/_user/{caller.name}"
    return await call("PUT", url, body={"disabled": True})


REVOCATIONS: dict[str, Revoke] = {
    "logout": logout,
    "admin-delete-session": admin_delete_session,
    "revoke-all-sessions": revoke_all_sessions,
    "delete-user": delete_user,
    "disable-user": disable_user,
}


async def new_caller(replica: Replica) -> Caller:
    name = f"u{secrets.token_hex(4)}"
    return Caller(name, await admin_session(replica.admin_url, DB, name))


async def assert_ends_cut(feed: Feed, pouchdb: PouchDBServer, tag: str) -> None:
    """Documents written from now on never reach the feed, which ends without its last chunk."""
    written = []
    for n in range(5):  # written at once: the revocation has already been answered
        written.append(f"{tag}-after-{n}")
        await pouchdb.put_doc(DB, written[-1], n=n)
    assert await feed.outcome(timeout=5) == "cut"  # bound, not a speed claim (the rule: 1 s)
    late = f"{tag}-late"
    await pouchdb.put_doc(DB, late)
    assert not feed.ids() & {*written, late}, bytes(feed.body)


@pytest.mark.parametrize("kind", list(FEEDS))
@pytest.mark.parametrize("revoke", list(REVOCATIONS))
@pytest.mark.parametrize("where", ["same-replica", "other-replica"])
async def test_revocation_ends_the_changes_feed(
    stack: Stack, kind: str, revoke: str, where: str
) -> None:
    caller = await new_caller(stack.a)
    tag = secrets.token_hex(4)
    feed = await open_feed(stack.a.port, FEEDS[kind], caller.cookie)
    try:
        assert feed.status == 200, bytes(feed.body)
        if kind == "continuous":  # it flows: a document written now arrives, body included
            await stack.pouchdb.put_doc(DB, f"{tag}-before", secret="visible")
            await feed.wait_for(f"{tag}-before")
            assert b'"secret":"visible"' in feed.body
        revoking = stack.a if where == "same-replica" else stack.b
        assert await REVOCATIONS[revoke](revoking, caller) == 200
        await assert_ends_cut(feed, stack.pouchdb, tag)
    finally:
        await feed.close()
    # And the credential is refused for a new feed, on both replicas.
    for replica in (stack.a, stack.b):
        assert await call("GET", replica.url + FEEDS["longpoll"], headers=caller.cookie) == 401


async def test_revocation_leaves_other_users_feeds_flowing(stack: Stack) -> None:
    victim, bystander = await new_caller(stack.a), await new_caller(stack.a)
    second_session = Caller(victim.name, await admin_session(stack.a.admin_url, DB, victim.name))
    tag = secrets.token_hex(4)
    feeds = [
        await open_feed(stack.b.port, FEEDS["continuous"], c.cookie)
        for c in (victim, bystander, second_session)
    ]
    try:
        assert await logout(stack.a, victim) == 200  # one session of the victim's
        assert await feeds[0].outcome() == "cut"
        await stack.pouchdb.put_doc(DB, f"{tag}-still")
        await feeds[1].wait_for(f"{tag}-still")  # somebody else's feed
        await feeds[2].wait_for(f"{tag}-still")  # the same user's other session
        assert not feeds[1].ended.done() and not feeds[2].ended.done()
    finally:
        for feed in feeds:
            await feed.close()


@pytest.mark.parametrize("mode", ["changes", "replicate"])
@pytest.mark.parametrize("where", ["same-replica", "other-replica"])
async def test_pouchdb_client_gets_nothing_after_logout(
    stack: Stack, where: str, mode: Literal["changes", "replicate"]
) -> None:
    """The issue's own scenario, with a real PouchDB following the database through the sidecar
    with a session cookie: `db.changes({live: true, include_docs: true})`, or live pull
    replication (which fetches documents in follow-up requests, refused after logout anyway)."""
    caller = await new_caller(stack.a)
    tag = secrets.token_hex(4)
    cookie = f"{COOKIE}={caller.session_id}"
    since = str((await stack.pouchdb.request("GET", f"/{DB}"))["update_seq"])
    async with pouchdb_client(f"{stack.a.url}/{DB}", cookie, mode, since) as client:
        await stack.pouchdb.put_doc(DB, f"{tag}-before")
        await client.wait_for(f"{tag}-before")
        await asyncio.sleep(0.3)  # its next long-poll is open, waiting
        revoking = stack.a if where == "same-replica" else stack.b
        assert await logout(revoking, caller) == 200
        after = [f"{tag}-after-{n}" for n in range(5)]
        for doc_id in after:
            await stack.pouchdb.put_doc(DB, doc_id)
        await client.expect("error")  # its feed was cut, and the sidecar refuses the session
        assert not client.received() & set(after), client.events
        if mode == "replicate":
            ids = await client.ids()
            assert f"{tag}-before" in ids
            assert not ids & set(after)
