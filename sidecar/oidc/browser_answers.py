"""What the login callback answers a person's browser: a redirect to the return target or
the signed-in page instead of Sync Gateway's token JSON, also on a reload or Back.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web
from yarl import URL

from sidecar import keys
from sidecar.auth import identity_from_session, session_cookie
from sidecar.browser import logout_csrf_token, site_path
from sidecar.databases import Database
from sidecar.errors import BadRequest, SidecarError, Unauthorized
from sidecar.oidc.provider import Provider
from sidecar.pages import redirect, signed_in_page
from sidecar.sessions.store import hash_session_id

# How long a reload or Back on a used callback still finds where the login went.
SIGNED_IN_TTL = 3600
_SIGNED_IN = "signed_in"  # store record kind, keyed by the digest of the login's state


async def browser_answer(
    request: web.Request,
    db: Database,
    provider: Provider,
    state_key: str,
    body: dict[str, Any],
    api_answer: web.Response,
) -> web.Response:
    """The callback's answer to a browser: 302 to the return target, else the signed-in page;
    the session cookie `api_answer` sets comes along, the tokens in `body` never do."""
    session_id = body.get("session_id")
    target = request.get(keys.RETURN_TARGET)
    if isinstance(session_id, str):
        record = {"db": db.name, "rd": target, "session": hash_session_id(session_id)}
        await request.app[keys.STORE].put_record(_SIGNED_IN, state_key, record, SIGNED_IN_TTL)
        if target:  # via the landing check: did the session cookie stick?
            answer: web.Response = redirect(_landing_path(request, db, state_key))
        else:
            answer = await signed_in(request, db, provider, body["name"], session_id)
    else:  # disable_session: nothing to come back with, so no redirect (it would loop)
        answer = await signed_in(request, db, provider, body["name"], None, onward=target)
    for cookie in api_answer.headers.getall("Set-Cookie", ()):
        answer.headers.add("Set-Cookie", cookie)
    return answer


LANDED = "landed"  # the callback's query parameter of the landing check
COOKIE_NOT_KEPT = (
    "Signed in, but this browser did not send the session cookie back, so every page would "
    "send it to sign in again. Allow cookies for this site; if the page is served over plain "
    "http, the sidecar's session.cookie_secure must not be 'always' (a Secure cookie is never "
    "sent over http)."
)


def _landing_path(request: web.Request, db: Database, state_key: str) -> str:
    public_url = request.app[keys.SETTINGS].public_url
    path = URL(site_path(public_url, f"/{db.name}/_oidc_callback"))
    return str(path.with_query({LANDED: state_key}))


async def landing(request: web.Request, db: Database, state_key: str) -> web.Response:
    """The hop between a browser's callback and its return target, which stops a redirect
    loop: only when the session cookie the callback just set comes back here does the browser
    go on to the return target; a browser that does not keep it gets an error page saying so
    (else the target would send it to sign in again, and again)."""
    record = None
    if len(state_key) == 64:  # a SHA-256 hex digest, else no store lookup
        record = await request.app[keys.STORE].get_record(_SIGNED_IN, state_key)
    if record is None or record.get("db") != db.name or not isinstance(record.get("rd"), str):
        raise BadRequest("this sign-in is unknown or too old: sign in again")
    # With this login's session: its return target (another valid session: the signed-in page).
    onward = await replayed_callback(request, db, state_key)
    if onward is None:  # no valid session cookie came back
        request[keys.RETURN_TARGET] = record["rd"]  # "Try again" goes back there
        raise BadRequest(COOKIE_NOT_KEPT)
    return onward


async def replayed_callback(
    request: web.Request, db: Database, state_key: str
) -> web.Response | None:
    """A reload or Back on a callback whose state is used up: when this browser holds a valid
    session, where the first callback went (the return target, if that login created this
    very session) or the signed-in page; None (the error stands) otherwise."""
    session_id = session_cookie(request, db.cookie_name)
    if session_id is None:
        return None
    try:
        identity = await identity_from_session(request.app, db, session_id)
    except Unauthorized:
        return None
    record = await request.app[keys.STORE].get_record(_SIGNED_IN, state_key)
    if (
        record is not None
        and record.get("db") == db.name
        and isinstance(record.get("session"), str)
        # Security: only the browser that this login signed in goes on to its return target.
        and hmac.compare_digest(record["session"], hash_session_id(session_id))
        and isinstance(record.get("rd"), str)
    ):
        return redirect(record["rd"])
    provider = None
    if db.providers is not None:
        try:
            provider = db.providers.get(identity.provider)
        except SidecarError:
            provider = None  # the provider left the configuration: no provider logout then
    return await signed_in(request, db, provider, identity.name, session_id)


async def signed_in(
    request: web.Request,
    db: Database,
    provider: Provider | None,
    name: str,
    session_id: str | None,
    *,
    onward: str | None = None,
) -> web.Response:
    """The signed-in page, with a sign-out form when there is a session to end."""
    public_url = request.app[keys.SETTINGS].public_url
    form_targets: tuple[str, ...] = ()
    if provider is not None and provider.metadata is not None:
        end_session = provider.metadata.end_session_endpoint
        if end_session:  # sign-out continues there (RP-Initiated Logout)
            form_targets = (str(URL(end_session).origin()),)
    return signed_in_page(
        name=name,
        onward=onward or site_path(public_url, f"/{db.name}/"),
        logout_url=site_path(public_url, f"/{db.name}/_oidc_logout") if session_id else None,
        csrf_token=logout_csrf_token(session_id) if session_id else None,
        form_targets=form_targets,
    )
