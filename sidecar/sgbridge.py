"""Make Couchbase Sync Gateway see the caller: it reads no identity headers, so the sidecar keeps
the user in Sync Gateway (admin REST API) and sends one of Sync Gateway's own sessions upstream.

One `SessionBridge` per database with `sync_gateway` configured. Session ids it obtains are
credentials for Sync Gateway: they live in this process only and must never reach a client
(`strip_set_cookies` removes the ones Sync Gateway re-sends when it extends a session).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import SyncGatewayBridge
from sidecar.errors import Forbidden, UpstreamError
from sidecar.identity import Identity
from sidecar.sessions.store import StoreEvent

log = logging.getLogger("sidecar.sgbridge")

SYNC_GATEWAY_COOKIE = "SyncGatewaySession"  # the name Sync Gateway reads, whatever ours is
GUEST = "GUEST"  # Sync Gateway's anonymous user; its name in the admin API
RENEW_FRACTION = 0.1  # a session with less than this share of its TTL left is replaced
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_ENTRIES = 100_000
REVOCATION_GRACE = 2.0  # seconds close() lets pending session deletions finish
# Sync Gateway's ids are 40 hex digits; anything that could break out of a Cookie header
# (";", ",", whitespace, CR/LF) is refused. Security: the value is written into a header.
_SESSION_ID = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")
# Sync Gateway's own rule (auth/user.go, kValidEmailRegexp); Go's \w is ASCII only.
_SG_EMAIL = re.compile(r"[-+.A-Za-z0-9_]+@[A-Za-z0-9_][-.A-Za-z0-9_]+")


# ---------------------------------------------------------------- pure decisions


@dataclass(frozen=True, slots=True)
class Entry:
    """A Sync Gateway session held for one user, and the identity it was made for."""

    session_id: str
    expires: float
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class Plan:
    put_user: bool  # bring the Sync Gateway user in step with the identity
    new_session: bool  # obtain a new Sync Gateway session

    @property
    def needed(self) -> bool:
        return self.put_user or self.new_session


def fingerprint(identity: Identity) -> bytes:
    """A digest of what the bridge writes into the Sync Gateway user: email, roles, channels."""
    canonical = json.dumps(
        [identity.email, sorted(identity.roles), sorted(identity.channels)],
        separators=(",", ":"),
    )  # ensure_ascii (the default) also encodes lone surrogates
    return hashlib.sha256(canonical.encode("ascii")).digest()


def plan(entry: Entry | None, fp: bytes, *, now: float, ttl: int, sync_user: bool) -> Plan:
    """What to ask Sync Gateway before this request can go upstream.

    No session, or one within RENEW_FRACTION of its end: user (re-synced once per session, which
    also repairs changes made behind our back) and a new session. A changed identity alone:
    the user only; Sync Gateway reads roles and channels from the user at every request, so the
    session stays good.
    """
    if entry is None or now >= entry.expires - RENEW_FRACTION * ttl:
        return Plan(put_user=sync_user, new_session=True)
    if entry.fingerprint != fp:
        return Plan(put_user=sync_user, new_session=False)
    return Plan(put_user=False, new_session=False)


def user_body(identity: Identity) -> dict[str, Any]:
    """The Sync Gateway user fields the bridge owns (PUT /{db}/_user/{name})."""
    email = identity.email if identity.email and _SG_EMAIL.fullmatch(identity.email) else ""
    return {
        # "" clears it: an address Sync Gateway would refuse must not lock the user out.
        "email": email,
        "admin_channels": sorted(identity.channels),
        "admin_roles": sorted(identity.roles),
    }


def session_id_from(raw: bytes) -> str:
    """The session id in Sync Gateway's answer to POST /{db}/_session; raises if unusable."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    session_id = body.get("session_id") if isinstance(body, dict) else None
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise UpstreamError("Sync Gateway answered an unusable session")
    return session_id


def apply(headers: CIMultiDict[str], cookie_name: str, sg_session_id: str) -> None:
    """Make the upstream request carry `SyncGatewaySession=<sg_session_id>` and nothing else
    that Sync Gateway would authenticate with.

    Security: every client-sent `SyncGatewaySession` cookie goes (a caller must not choose the
    Sync Gateway session), as does the sidecar's own session cookie `cookie_name` (it is not a
    Sync Gateway session) and Authorization (Sync Gateway would validate a bearer token or
    Basic credentials itself and prefer them to the session). Other cookies are kept, in order.
    Several Cookie headers become one (RFC 9113 8.2.3 joins them with "; ").
    """
    drop = {SYNC_GATEWAY_COOKIE, cookie_name}
    kept = [
        pair
        for value in headers.getall("Cookie", ())
        for pair in (part.strip() for part in value.split(";"))
        if pair and pair.split("=", 1)[0].strip() not in drop
    ]
    headers.popall("Cookie", None)
    headers.popall("Authorization", None)
    headers["Cookie"] = "; ".join([*kept, f"{SYNC_GATEWAY_COOKIE}={sg_session_id}"])


def strip_set_cookies(headers: CIMultiDict[str]) -> int:
    """Remove Sync Gateway's session cookie from an upstream response; returns how many.

    Sync Gateway re-sends the cookie when it extends a session. Security: it must never reach
    the client, whose own session cookie it would overwrite (same default name) and to whom it
    would hand a Sync Gateway credential.
    """
    values = headers.getall("Set-Cookie", [])
    kept = [v for v in values if v.split("=", 1)[0].strip() != SYNC_GATEWAY_COOKIE]
    if len(kept) == len(values):
        return 0
    headers.popall("Set-Cookie", None)
    for value in kept:
        headers.add("Set-Cookie", value)
    return len(values) - len(kept)


def _excerpt(raw: bytes) -> str:
    return raw[:200].decode("utf-8", "replace")


# ---------------------------------------------------------------- the bridge


@dataclass(eq=False, slots=True)
class _Refresh:
    """One in-flight exchange with Sync Gateway for a user, shared by concurrent requests."""

    fingerprint: bytes
    task: asyncio.Task[str] = field(init=False)
    stale: bool = False  # the user changed meanwhile: use once, never cache
    revoked: bool = False  # ... and was revoked: delete their sessions again once it lands


class SessionBridge:
    """Sync Gateway sessions for authenticated identities, cached per user.

    `http` must have no cookie jar (`aiohttp.DummyCookieJar`): a jar would carry one user's
    Sync Gateway cookie into another user's admin calls.
    """

    def __init__(
        self,
        config: SyncGatewayBridge,
        db_name: str,
        http: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if not isinstance(http.cookie_jar, aiohttp.DummyCookieJar):  # security: see above
            raise ValueError("the Sync Gateway bridge needs a ClientSession without cookie jar")
        self.db_name = db_name
        self.database = config.database or db_name
        self._ttl = config.session_ttl
        self._sync_user = config.sync_user
        self._http = http
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_entries = max_entries
        # Security: a header of its own, never logged (the password is a Secret until here).
        self._auth_headers = (
            {
                "Authorization": aiohttp.encode_basic_auth(
                    config.username, config.password.get() if config.password else ""
                )
            }
            if config.username
            else {}
        )
        self._base = f"{config.admin_url.rstrip('/')}/{quote(self.database, safe='')}"
        self._cache: OrderedDict[str, Entry] = OrderedDict()
        self._inflight: dict[str, _Refresh] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._cache)

    async def upstream_cookie(self, identity: Identity) -> str:
        """The Sync Gateway session id to send upstream for `identity`.

        Fails closed: raises UpstreamError (502) when Sync Gateway cannot provide one, so the
        request never goes upstream as GUEST.
        """
        name = identity.name
        if name == GUEST:  # security: would edit, and sign in as, Sync Gateway's anonymous user
            raise Forbidden(f"user name {GUEST!r} is reserved by Sync Gateway")
        fp = fingerprint(identity)
        while True:
            entry = self._cache.get(name)
            todo = plan(entry, fp, now=self._clock(), ttl=self._ttl, sync_user=self._sync_user)
            if entry is not None and not todo.needed:
                self._cache.move_to_end(name)
                return entry.session_id
            running = self._inflight.get(name)
            if running is None:
                running = self._start(identity, fp, todo, entry)
            elif running.fingerprint != fp or running.stale:
                # An exchange for another view of this user: let it land, then decide again,
                # so an older PUT never overtakes a newer one.
                await asyncio.wait((running.task,))
                continue
            # Shielded: a caller that goes away does not cancel the others' exchange.
            return await asyncio.shield(running.task)

    def on_store_event(self, event: StoreEvent) -> None:
        """SessionStore listener: a changed, disabled, deleted or revoked user is forgotten;
        a revoked one also loses their Sync Gateway sessions (in the background)."""
        if event.kind != "user" or event.db != self.db_name or event.name is None:
            return
        self._cache.pop(event.name, None)
        running = self._inflight.get(event.name)
        if running is not None:
            running.stale = True
            running.revoked = running.revoked or event.revoked
        if event.revoked:
            self._spawn(self._delete_sessions(event.name))

    def forget(self, name: str, session_id: str) -> None:
        """Drop the cached session if it is `session_id` (Sync Gateway answered 401 with it)."""
        entry = self._cache.get(name)
        if entry is not None and entry.session_id == session_id:
            del self._cache[name]

    @staticmethod
    def apply(headers: CIMultiDict[str], cookie_name: str, sg_session_id: str) -> None:
        """See the module-level `apply`."""
        apply(headers, cookie_name, sg_session_id)

    async def close(self) -> None:
        """Let pending revocations finish briefly, then cancel everything still running."""
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=REVOCATION_GRACE)
        tasks: list[asyncio.Task[Any]] = [r.task for r in self._inflight.values()]
        tasks += self._tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the exchange with Sync Gateway ------------------------------------------------------

    def _start(self, identity: Identity, fp: bytes, todo: Plan, entry: Entry | None) -> _Refresh:
        refresh = _Refresh(fp)
        refresh.task = asyncio.get_running_loop().create_task(
            self._refresh(identity, todo, entry, refresh), name=f"sg-session-{self.db_name}"
        )
        self._inflight[identity.name] = refresh
        refresh.task.add_done_callback(partial(self._finished, identity.name, refresh))
        return refresh

    def _finished(self, name: str, refresh: _Refresh, task: asyncio.Task[str]) -> None:
        if self._inflight.get(name) is refresh:
            del self._inflight[name]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone
        if refresh.revoked:
            # The deletion may have run before this session was made; run it again.
            self._spawn(self._delete_sessions(name))

    async def _refresh(
        self, identity: Identity, todo: Plan, entry: Entry | None, refresh: _Refresh
    ) -> str:
        started = self._clock()  # before asking: the session's end is never overestimated
        if todo.put_user:
            await self._put_user(identity)
        if todo.new_session or entry is None:
            session_id = await self._create_session(identity.name)
            expires = started + self._ttl
        else:
            session_id, expires = entry.session_id, entry.expires
        if not refresh.stale:
            self._remember(identity.name, Entry(session_id, expires, refresh.fingerprint))
        return session_id

    def _remember(self, name: str, entry: Entry) -> None:
        self._cache[name] = entry
        self._cache.move_to_end(name)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def _put_user(self, identity: Identity) -> None:
        """Create the user, or bring them in step with the identity.

        Sync Gateway refuses to create a user without a password unless the database sets
        `allow_empty_password`, and a user without one signs in with an empty password. So a
        new user gets 32 random bytes that nobody keeps (create-only POST; 409 when they
        exist). An existing user is updated without a password: Sync Gateway ends every
        session of a user whose password is set, including other replicas' sessions.
        """
        body = user_body(identity)
        name = identity.name
        password = secrets.token_urlsafe(32)  # security: never stored, never logged
        status, raw = await self._call(
            "POST", f"{self._base}/_user/", {"name": name, "password": password, **body}
        )
        if status == 409:
            status, raw = await self._call("PUT", self._user_url(name), body)
        if not 200 <= status < 300:
            self._refused("update the user", status, raw)

    async def _create_session(self, name: str) -> str:
        status, raw = await self._call(
            "POST", f"{self._base}/_session", {"name": name, "ttl": self._ttl}
        )
        if status == 404:
            log.warning("no such user in Sync Gateway", extra={"db": self.db_name, "user": name})
            raise UpstreamError("the user does not exist in Sync Gateway")
        if not 200 <= status < 300:
            self._refused("create a session", status, raw)
        return session_id_from(raw)

    async def _delete_sessions(self, name: str) -> None:
        try:
            status, raw = await self._call("DELETE", f"{self._user_url(name)}/_session")
        except UpstreamError as exc:
            log.error(
                "could not delete the Sync Gateway sessions of a revoked user",
                extra={"db": self.db_name, "user": name, "why": exc.reason},
            )
            return
        if not (200 <= status < 300 or status == 404):  # 404: no such user, nothing to end
            log.error(
                "Sync Gateway refused to delete a revoked user's sessions",
                extra={"db": self.db_name, "user": name, "status": status, "body": _excerpt(raw)},
            )

    def _user_url(self, name: str) -> str:
        return f"{self._base}/_user/{quote(name, safe='')}"

    def _refused(self, what: str, status: int, raw: bytes) -> None:
        log.warning(
            "Sync Gateway refused to %s",
            what,
            extra={"db": self.db_name, "status": status, "body": _excerpt(raw)},
        )
        if status in (401, 403):
            raise UpstreamError(
                f"Sync Gateway's admin API refused the sidecar's credentials (status {status})"
            )
        raise UpstreamError(f"Sync Gateway refused to {what} (status {status})")

    async def _call(
        self, method: str, url: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, bytes]:
        try:
            async with self._http.request(
                method,
                URL(url, encoded=True),  # quoted above; yarl must not quote again
                json=body,
                headers=self._auth_headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "Sync Gateway admin API unavailable",
                extra={"db": self.db_name, "method": method, "error": repr(exc)},
            )
            detail = "timed out" if isinstance(exc, TimeoutError) else "unreachable"
            raise UpstreamError(f"Sync Gateway admin API {detail}") from exc

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name=f"sg-revoke-{self.db_name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
