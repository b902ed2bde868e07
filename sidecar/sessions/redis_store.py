"""The Redis store (plain, TLS, unix socket, Sentinel or Cluster), shared by every replica;
revocations reach the other replicas' caches over pub/sub."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, WatchError

from sidecar.config import SESSION_MAX_LIFETIME
from sidecar.sessions.models import Session, User
from sidecar.sessions.store import SessionStore, StoreEvent, StoreUnavailable

log = logging.getLogger(__name__)

_FAILURES = (RedisError, RedisClusterException, OSError)
_WATCH_ATTEMPTS = 5
_NO_RETRY = Retry(NoBackoff(), 0)
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 2.0  # pub/sub reconnection, seconds
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_GROUP_BATCH = 1000


@dataclass(frozen=True, slots=True)
class RedisClient:
    """A connected-on-demand client plus what else must be closed with it."""

    redis: Redis | RedisCluster
    cluster: bool = False
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self.sentinel is not None:
            for node in self.sentinel.sentinels:
                await node.aclose()


def _hosts(netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """`[user][:password]@host[:port][,host[:port]...]` -> (username, password, hosts)."""
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host or (port and not port.isdigit()):
            raise ValueError(f"bad host {item!r} in Redis URL")
        hosts.append((host, int(port) if port else default_port))
    return username, password, hosts


MAX_CONNECTIONS = 256  # per process and Redis node


def redis_client(url: str, *, timeout: float = 2.0) -> RedisClient:
    """Build (without connecting) the client for a `session_store` URL."""
    # Short socket timeouts: a hung Redis must fail requests fast (StoreUnavailable), not
    # hold them. One quick retry on connection errors only, to heal stale pooled sockets.
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.02), 1, (RedisConnectionError,)),
        "client_name": "oidc-sidecar",
    }
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in ("redis", "rediss", "unix"):
        # A burst of cache misses waits for a pooled connection (up to `timeout`) instead of
        # failing at once with "Too many connections", redis-py's default pool behaviour.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout, **options
        )
        return RedisClient(Redis.from_pool(pool))  # the client owns (and closes) the pool
    base, _, kind = scheme.partition("+")
    if base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(f"unsupported session store URL scheme {scheme!r}")
    ssl = base == "rediss"
    if kind == "sentinel":
        username, password, sentinels = _hosts(parts.netloc, 26379)
        path = [segment for segment in parts.path.split("/") if segment]
        if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("Sentinel URL path must be /service_name[/db]")
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinels, sentinel_kwargs={**sentinel_options, "ssl": ssl}, **options
        )
        master = sentinel.master_for(
            unquote(path[0]),
            db=int(path[1]) if len(path) == 2 else 0,
            username=username,
            password=password,
            ssl=ssl,
        )
        return RedisClient(master, sentinel=sentinel)
    username, password, nodes = _hosts(parts.netloc, 6379)
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        username=username,
        password=password,
        ssl=ssl,
        **options,
    )
    return RedisClient(cluster, cluster=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(raw: bytes | str) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.error("session store: unreadable record")
        return None
    return value


def _user_tag(db: str, name: str) -> str:
    # Security: percent-encoding makes the key injective (no name can forge another user's
    # key with ":" or braces); the braces are a Cluster hash tag keeping a user's keys in one slot.
    return "{" + quote(db, safe="") + ":" + quote(name, safe="") + "}"


class RedisStore(SessionStore):
    def __init__(
        self,
        url: str,
        *,
        local_cache_seconds: float = 30.0,
        prefix: str = "sidecar:",
        timeout: float = 2.0,
        cache_entries: int = 100_000,
        ping_seconds: float = 0.5,
        max_lifetime: int = SESSION_MAX_LIFETIME,
    ) -> None:
        super().__init__(
            local_cache_seconds=local_cache_seconds,
            cache_entries=cache_entries,
            max_lifetime=max_lifetime,
        )
        self._client = redis_client(url, timeout=timeout)
        self._redis = self._client.redis
        # Cluster cannot MULTI across slots; sessions are spread over slots by design.
        self._atomic = not self._client.cluster
        self._prefix = prefix
        self._channel = f"{prefix}events"
        self._origin = secrets.token_hex(8)  # to skip our own events, applied when emitted
        self._timeout = timeout
        self._ping_seconds = ping_seconds
        self._listener: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._failing = False

    @property
    def listening(self) -> bool:
        """Subscribed to the invalidation channel, hence using the local cache."""
        return self._listening

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the invalidation listener; waits (briefly) for its first subscription so a
        healthy store starts with its cache on. Never fails: Redis may come later."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen_forever(), name="session-events")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), self._timeout * 2)

    async def close(self) -> None:
        if self._listener is not None:
            # A cancel that lands as redis-py's read timeout expires can be swallowed
            # (redis/redis-py#2551): cancel again until the task is really done.
            while not self._listener.done():
                self._listener.cancel()
                await asyncio.wait({self._listener}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._client.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _FAILURES:
            return False

    # -- invalidation listener --------------------------------------------------------------

    async def _listen_forever(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never crash: reconnect instead
                if self._listening or not self._first_attempt.is_set():
                    log.warning("session events: %s; local cache off until resubscribed", exc)
                else:
                    log.debug("session events: still failing: %s", exc)
                backoff = _BACKOFF_MIN if self._listening else min(backoff * 2, _BACKOFF_MAX)
            finally:
                self._set_listening(False)
                self._first_attempt.set()
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))  # noqa: S311 jitter

    async def _listen_once(self) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self._redis, RedisCluster):
            await self._redis.initialize()  # its pub/sub needs the slot map to pick a node
        pubsub = self._redis.pubsub()
        connection: Any = None
        pool_retry: Any = None
        try:
            await pubsub.subscribe(self._channel)
            # Security: redis-py would silently reconnect and resubscribe, losing whatever
            # was published meanwhile while the cache kept serving; make it raise instead.
            connection = pubsub.connection
            pool_retry = connection.retry
            connection.retry = _NO_RETRY
            deadline = loop.time() + self._timeout
            while True:
                message = await pubsub.get_message(timeout=self._timeout)
                if message is not None and message["type"] == "subscribe":
                    break
                if loop.time() > deadline:
                    raise TimeoutError("no subscribe confirmation")
            # Messages may have been missed while unsubscribed: _set_listening clears the cache.
            self._set_listening(True)
            self._first_attempt.set()
            log.info("session events: subscribed to %s", self._channel)
            last_heard = last_ping = loop.time()
            while True:
                message = await pubsub.get_message(timeout=self._ping_seconds)
                now = loop.time()
                if message is not None:
                    last_heard = now
                    if message["type"] == "message":
                        self._on_message(message["data"])
                    elif message["type"] == "subscribe":  # resubscribed behind our back
                        raise ConnectionError("pub/sub connection was re-established")
                # Security: a silently dead connection would hide revocations, so ping and
                # give up on the subscription when nothing (not even a pong) comes back.
                if now - last_heard > 4 * self._ping_seconds:
                    raise TimeoutError("no answer on the pub/sub connection")
                if now - last_ping >= self._ping_seconds:
                    await pubsub.ping()
                    last_ping = now
        finally:
            if connection is not None:
                connection.retry = pool_retry  # it goes back to the pool
            with contextlib.suppress(*_FAILURES):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _on_message(self, data: bytes | str) -> None:
        try:
            payload = json.loads(data)
            event = StoreEvent(
                kind=payload["kind"],
                db=payload["db"],
                name=payload.get("name"),
                key=payload.get("key"),
                revoked=payload.get("revoked", True) is not False,
            )
            if event.kind not in ("session", "user") or not isinstance(event.db, str):
                raise ValueError(f"bad event kind {event.kind!r}")
            if not all(isinstance(v, str | None) for v in (event.name, event.key)):
                raise ValueError("bad event name or key")
            origin = payload.get("origin")
        except (ValueError, KeyError, TypeError) as exc:
            # Fail closed: we cannot tell what was invalidated, so forget everything.
            log.warning("session events: unreadable message (%s); cache cleared", exc)
            self._invalidate_all()
            return
        if origin != self._origin:
            self._receive(event)

    # -- keys -------------------------------------------------------------------------------

    def _session_key(self, key: str) -> str:
        return f"{self._prefix}s:{key}"

    def _index_key(self, db: str, name: str) -> str:
        return f"{self._prefix}u:{_user_tag(db, name)}:s"

    def _user_key(self, db: str, name: str) -> str:
        return f"{self._prefix}user:{_user_tag(db, name)}"

    # -- raw operations ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Security: any Redis failure becomes StoreUnavailable (503), never "no session"."""
        try:
            yield
        except _FAILURES as exc:
            if not self._failing:
                log.warning("session store unavailable: %s", exc)
                self._failing = True
            raise StoreUnavailable() from exc
        if self._failing:
            log.info("session store available again")
            self._failing = False

    @staticmethod
    def _parse_session(key: str, raw: bytes | str) -> Session | None:
        try:
            return Session.from_json(key, raw)
        except ValueError as exc:
            log.error("session store: unreadable session %s: %s", key, exc)
            return None

    async def _load_session(self, key: str) -> Session | None:
        with self._unavailable():
            raw = await self._redis.get(self._session_key(key))
        return None if raw is None else self._parse_session(key, raw)

    async def _insert_session(self, session: Session, now: float) -> None:
        ms = max(1, round((session.expires - now) * 1000))
        index = self._index_key(session.db, session.name)
        with self._unavailable():
            async with self._redis.pipeline(transaction=self._atomic) as pipe:
                pipe.set(self._session_key(session.key), session.to_json(), px=ms)
                pipe.sadd(index, session.key)
                self._cover(pipe, index, ms)
                await pipe.execute()

    @staticmethod
    def _cover(pipe: Any, index: str, ms: int) -> None:
        # The index lives as long as its longest-lived session: NX gives a fresh set an
        # expiry, GT only ever pushes it later (Redis >= 7.0). Concurrent writers cannot
        # shorten it, so revoke-all always finds every live session.
        pipe.pexpire(index, ms, nx=True)
        pipe.pexpire(index, ms, gt=True)

    async def _update_session(
        self, key: str, change: Callable[[Session], Session], *, now: float | None
    ) -> Session | None:
        name = self._session_key(key)
        with self._unavailable():
            for _ in range(_WATCH_ATTEMPTS):
                try:
                    # Optimistic transaction: a concurrent rewrite (new roles) or delete
                    # (revocation) is never overwritten with the stale copy.
                    async with self._redis.pipeline(transaction=True) as pipe:
                        await pipe.watch(name)
                        raw = await pipe.get(name)
                        current = None if raw is None else self._parse_session(key, raw)
                        if current is None:
                            return None
                        new = change(current)
                        if new == current:
                            return current
                        ms = None if now is None else max(1, round((new.expires - now) * 1000))
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if ms is None:
                            pipe.set(name, new.to_json(), keepttl=True, xx=True)
                        else:
                            pipe.set(name, new.to_json(), px=ms, xx=True)
                        await pipe.execute()
                except WatchError:
                    continue
                if ms is not None:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        self._cover(pipe, self._index_key(new.db, new.name), ms)
                        await pipe.execute()
                return new
        raise StoreUnavailable()

    async def _load_user_sessions(self, db: str, name: str) -> list[Session]:
        index = self._index_key(db, name)
        with self._unavailable():
            members = sorted(_text(m) for m in await self._redis.smembers(index))
            if not members:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in members:
                    pipe.get(self._session_key(key))
                values = await pipe.execute()
            sessions: list[Session] = []
            stale: list[str] = []
            for key, raw in zip(members, values, strict=True):
                session = None if raw is None else self._parse_session(key, raw)
                if session is None or (session.db, session.name) != (db, name):
                    stale.append(key)
                else:
                    sessions.append(session)
            if stale:  # expired sessions leave their index entry behind; clean lazily
                await self._redis.srem(index, *stale)
        return sessions

    async def _remove_sessions(self, db: str, name: str, keys: list[str]) -> None:
        with self._unavailable():
            async with self._redis.pipeline(transaction=self._atomic) as pipe:
                for key in keys:
                    pipe.delete(self._session_key(key))
                pipe.srem(self._index_key(db, name), *keys)
                await pipe.execute()

    async def _load_user(self, db: str, name: str) -> User | None:
        with self._unavailable():
            raw = await self._redis.get(self._user_key(db, name))
        if raw is None:
            return None
        try:
            return User.from_json(raw)
        except ValueError as exc:
            # Fail closed: a corrupt record must not read as "no such user" (re-registration).
            log.error("session store: unreadable user %r in %r: %s", name, db, exc)
            raise StoreUnavailable() from exc

    async def _save_user(self, user: User) -> None:
        with self._unavailable():
            await self._redis.set(self._user_key(user.db, user.name), user.to_json())

    async def _remove_user(self, db: str, name: str) -> bool:
        with self._unavailable():
            return bool(await self._redis.delete(self._user_key(db, name)))

    def _record_key(self, kind: str, key: str) -> str:
        return f"{self._prefix}r:{kind}:{key}"

    async def put_record(self, kind: str, key: str, value: Mapping[str, Any], ttl: int) -> None:
        data = json.dumps(dict(value), separators=(",", ":"))
        with self._unavailable():
            await self._redis.set(self._record_key(kind, key), data, ex=ttl)

    async def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._unavailable():
            raw = await self._redis.get(self._record_key(kind, key))
        return None if raw is None else _record(raw)

    async def take_record(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._unavailable():
            raw = await self._redis.getdel(self._record_key(kind, key))  # atomic: single use
        return None if raw is None else _record(raw)

    def _lock_key(self, kind: str, key: str) -> str:
        return f"{self._prefix}l:{kind}:{key}"

    async def acquire_lock(self, kind: str, key: str, ttl: float) -> tuple[bool, str]:
        token = secrets.token_urlsafe(16)
        ms = max(1, round(ttl * 1000))
        with self._unavailable():
            # SET NX GET (Redis >= 7.0), atomic: sets it and answers nil, or names the holder.
            holder = await self._redis.set(
                self._lock_key(kind, key), token, nx=True, px=ms, get=True
            )
        if holder is None:
            return True, token
        if not isinstance(holder, bytes | str):
            raise StoreUnavailable()
        return False, _text(holder)

    async def release_lock(self, kind: str, key: str, token: str) -> bool:
        with self._unavailable():
            # Compare and delete in one step: a lock that expired and was taken by another
            # caller meanwhile is theirs now.
            released = await self._redis.eval(_RELEASE_LOCK, 1, self._lock_key(kind, key), token)
        return bool(released)

    def _group_key(self, kind: str, key: str) -> str:
        return f"{self._prefix}g:{kind}:{key}"

    async def _add_to_group(self, kind: str, key: str, member: str, ttl: int) -> None:
        name = self._group_key(kind, key)
        with self._unavailable():
            async with self._redis.pipeline(transaction=self._atomic) as pipe:
                pipe.sadd(name, member)
                self._cover(pipe, name, max(1, ttl) * 1000)
                await pipe.execute()

    async def _take_group(self, kind: str, key: str) -> list[str]:
        name = self._group_key(kind, key)
        members: list[str] = []
        with self._unavailable():
            while True:
                # SPOP with a count is one atomic command: a member goes to one taker only.
                popped = await self._redis.spop(name, _GROUP_BATCH)
                members += (_text(m) for m in popped or () if isinstance(m, bytes | str))
                if not popped or len(popped) < _GROUP_BATCH:
                    break
        return sorted(members)

    async def _put_record_if_absent(
        self, kind: str, key: str, value: Mapping[str, Any], ttl: int
    ) -> bool:
        data = json.dumps(dict(value), separators=(",", ":"))
        with self._unavailable():
            return bool(await self._redis.set(self._record_key(kind, key), data, ex=ttl, nx=True))

    async def _publish(self, event: StoreEvent) -> None:
        payload = {
            "origin": self._origin,
            "kind": event.kind,
            "db": event.db,
            "name": event.name,
            "key": event.key,
            "revoked": event.revoked,
        }
        with self._unavailable():
            await self._redis.publish(self._channel, json.dumps(payload, separators=(",", ":")))
