"""A real OpenID Provider (node `oidc-provider`, tests/peers/op) for tests, and a scripted browser.

`OpenIDProvider` runs the peer on a free loopback port; `browser_login` walks its login and consent
pages like a browser; `get_tokens` runs a whole code flow with PKCE to obtain GENUINE tokens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import select
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

import aiohttp
from yarl import URL

from .processes import stop_peer

PEER_DIR = Path(__file__).resolve().parents[1] / "peers" / "op"
SERVER_SCRIPT = PEER_DIR / "server.mjs"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class OPClient:
    """A client registered at the provider; `metadata()` is its RFC 7591 form."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str = "client_secret_basic"
    id_token_signed_response_alg: str = "RS256"
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token")
    # Logout (RP-Initiated and Back-Channel Logout 1.0), registered only when given.
    post_logout_redirect_uris: tuple[str, ...] = ()
    backchannel_logout_uri: str | None = None
    backchannel_logout_session_required: bool = True

    @property
    def redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def metadata(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": list(self.redirect_uris),
            "grant_types": list(self.grant_types),
            "response_types": ["code"],
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "id_token_signed_response_alg": self.id_token_signed_response_alg,
            **(
                {"post_logout_redirect_uris": list(uris)}
                if (uris := self.post_logout_redirect_uris)
                else {}
            ),
            **(
                {
                    "backchannel_logout_uri": self.backchannel_logout_uri,
                    "backchannel_logout_session_required": self.backchannel_logout_session_required,
                }
                if self.backchannel_logout_uri
                else {}
            ),
        }


class OPError(RuntimeError):
    """The provider did not start, or a flow against it went somewhere unexpected."""


@dataclass
class OpenIDProvider:
    """The peer as a child process; usable as a sync or async context manager.

    `users` maps a username to claim overrides (null removes a claim); see server.mjs for the
    default claims every username gets (alice: roles ["editor"], channels ["news", "sports"]).
    """

    clients: Sequence[OPClient] = ()
    users: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    id_token_ttl: int = 3600
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 14 * 24 * 3600
    rotate_refresh_tokens: bool = True
    start_timeout: float = 20.0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _port: int | None = field(default=None, init=False)
    # Known only to this harness: lets `register_client` add clients while the provider runs.
    _registration_token: str = field(
        default_factory=lambda: secrets.token_urlsafe(24), init=False, repr=False
    )

    @property
    def port(self) -> int:
        if self._port is None:
            raise OPError("the provider is not running")
        return self._port

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.issuer}/auth"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks"

    def config(self) -> dict[str, Any]:
        return {
            "clients": [client.metadata() for client in self.clients],
            "users": {name: dict(claims) for name, claims in self.users.items()},
            "id_token_ttl": self.id_token_ttl,
            "access_token_ttl": self.access_token_ttl,
            "refresh_token_ttl": self.refresh_token_ttl,
            "rotate_refresh_tokens": self.rotate_refresh_tokens,
            "registration_token": self._registration_token,
        }

    def start(self) -> Self:
        if self._process is not None:
            raise OPError("the provider is already running")
        node = shutil.which("node")
        if node is None or not (PEER_DIR / "node_modules" / "oidc-provider").is_dir():
            raise OPError("node or tests/peers/op/node_modules is missing: run `make deps`")
        self._log = tempfile.TemporaryFile()  # closed in stop()
        env = {**os.environ, "OP_CONFIG": json.dumps(self.config()), "OP_PORT": "0"}
        # stdin stays a pipe: the peer exits when it closes, so a crashed test leaves no orphan.
        self._process = subprocess.Popen(
            [node, str(SERVER_SCRIPT)],
            cwd=PEER_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        try:
            self._port = self._read_port(time.monotonic() + self.start_timeout)
            self._wait_for_discovery(time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        log, self._log = self._log, None
        stop_peer(process, log)
        self._port = None

    def register_client(self, client: OPClient) -> None:
        """Adds a client at run time (RFC 7591), e.g. once a sidecar's callback URL is known."""
        request = urllib.request.Request(
            f"{self.issuer}/reg",
            data=json.dumps(client.metadata()).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._registration_token}",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as error:
            raise OPError(f"client registration failed: {error.code} {error.read()!r}") from None

    def grant_counts(self, client_id: str) -> dict[str, dict[str, int]]:
        """Token requests the client made: {grant_type: {"success": n, "error": n}}."""
        request = urllib.request.Request(
            f"{self.issuer}/_test/grants?client_id={quote(client_id, safe='')}",
            headers={"Authorization": f"Bearer {self._registration_token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            counts: dict[str, dict[str, int]] = json.load(response)
        return counts

    def _read_port(self, deadline: float) -> int:
        process = self._process
        assert process is not None and process.stdout is not None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise OPError(f"the provider exited with {process.returncode}:\n{self._stderr()}")
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                line = process.stdout.readline()
                if not line:
                    continue  # EOF: poll() reports the exit on the next turn
                return int(json.loads(line)["port"])
        raise OPError(f"the provider did not start in time:\n{self._stderr()}")

    def _wait_for_discovery(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.discovery_url, timeout=2) as response:
                    if json.load(response)["issuer"] == self.issuer:
                        return
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    raise OPError(f"discovery never answered:\n{self._stderr()}") from None
            time.sleep(0.05)

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


# --- a scripted browser -------------------------------------------------------------------------


@dataclass
class _Form:
    action: str
    method: str
    inputs: list[tuple[str, str, str]]  # (type, name, value)


class _PageParser(HTMLParser):
    """Collects forms (action, method, inputs) and link targets from an HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self.links: list[str] = []
        self._form: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {name.lower(): value or "" for name, value in attrs}
        if tag == "form":
            self._form = _Form(attr.get("action", ""), attr.get("method", "get").lower(), [])
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and attr.get("name"):
            kind = attr.get("type", "text").lower()
            self._form.inputs.append((kind, attr["name"], attr.get("value", "")))
        elif tag == "button" and self._form is not None and attr.get("name"):
            self._form.inputs.append(("submit", attr["name"], attr.get("value", "")))
        elif tag == "a" and attr.get("href"):
            self.links.append(attr["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None


def _prompt_of(form: _Form) -> str:
    for kind, name, value in form.inputs:
        if kind == "hidden" and name == "prompt":
            return value
    return "login" if any(kind == "password" for kind, _, _ in form.inputs) else ""


def _fill(form: _Form, username: str, password: str) -> dict[str, str]:
    data: dict[str, str] = {}
    for kind, name, value in form.inputs:
        if kind == "password":
            data[name] = password
        elif kind in {"text", "email"} and name in {"login", "username", "email"}:
            data[name] = username
        elif kind == "hidden" or (kind == "submit" and name not in data):
            data[name] = value
    return data


def _same_endpoint(a: URL, b: URL) -> bool:
    return (a.scheme, a.host, a.port, a.path) == (b.scheme, b.host, b.port, b.path)


async def browser_login(
    session: aiohttp.ClientSession,
    authorize_url: str | URL,
    *,
    username: str,
    password: str = "x",
    consent: bool = True,
    redirect_uri: str | None = None,
    max_steps: int = 20,
) -> URL:
    """Walks from `authorize_url` through login and consent to the client's redirect_uri.

    Returns that final URL (with code & state, or error) WITHOUT requesting it. The redirect_uri
    is the `redirect_uri` parameter of the authorization request seen on the way, unless given.
    `consent=False` presses Cancel on the consent page, so the flow ends in error=access_denied.
    Use a session with `aiohttp.CookieJar(unsafe=True)`: the provider keeps state in cookies.
    """
    target = URL(redirect_uri) if redirect_uri else None
    url = URL(authorize_url)
    method, data = "GET", None
    for _ in range(max_steps):
        if target is None and "redirect_uri" in url.query:
            target = URL(url.query["redirect_uri"])
        async with session.request(method, url, data=data, allow_redirects=False) as response:
            body = await response.text()
            status, location = response.status, response.headers.get("Location")
        if status in REDIRECT_STATUSES and location:
            url = url.join(URL(location))
            if target is not None and _same_endpoint(url, target):
                return url
            if target is None and "redirect_uri" in url.query:
                target = URL(url.query["redirect_uri"])
            method, data = "GET", None
            continue
        if status != 200:
            raise OPError(f"{method} {url} answered {status}: {body[:2000]}")
        page = _PageParser()
        page.feed(body)
        forms = [form for form in page.forms if _prompt_of(form)]
        if not forms:
            raise OPError(f"no login or consent form at {url}: {body[:2000]}")
        form = forms[0]
        if _prompt_of(form) == "consent" and not consent:
            cancel = next((link for link in page.links if link.endswith("/abort")), None)
            if cancel is None:
                raise OPError(f"no cancel link on the consent page at {url}")
            url, method, data = url.join(URL(cancel)), "GET", None
            continue
        data = _fill(form, username, password)
        url, method = url.join(URL(form.action)) if form.action else url, form.method.upper()
    raise OPError(f"no redirect to the client after {max_steps} steps (last: {url})")


async def browser_logout(
    session: aiohttp.ClientSession, end_session_url: str | URL, *, max_steps: int = 5
) -> URL:
    """Walks the provider's RP-Initiated Logout: its confirmation page ("Yes, sign me out",
    logout=yes, which also sends back-channel logout tokens), then its redirect. Returns the
    URL it redirects to (the post_logout_redirect_uri with state), WITHOUT requesting it."""
    url, method, data = URL(end_session_url), "GET", None
    for _ in range(max_steps):
        async with session.request(method, url, data=data, allow_redirects=False) as response:
            body = await response.text()
            status, location = response.status, response.headers.get("Location")
        if status in REDIRECT_STATUSES and location:
            target = url.join(URL(location))
            if target.host == url.host and target.port == url.port:
                url, method, data = target, "GET", None  # still at the provider
                continue
            return target
        if status != 200:
            raise OPError(f"{method} {url} answered {status}: {body[:2000]}")
        page = _PageParser()
        page.feed(body)
        if not page.forms or method == "POST":
            raise OPError(f"no logout form at {url}: {body[:2000]}")
        form = page.forms[0]  # op.logoutForm; its submit button sits outside the form
        data = {name: value for kind, name, value in form.inputs if kind == "hidden"}
        data["logout"] = "yes"
        url, method = url.join(URL(form.action)), "POST"
    raise OPError(f"no redirect away from the provider after {max_steps} steps (last: {url})")


# --- a whole code flow -------------------------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) per RFC 7636 4.1-4.2."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _client_auth(client: OPClient, form: dict[str, str]) -> dict[str, str]:
    """Adds client authentication to a token request; returns the headers to send."""
    if client.token_endpoint_auth_method == "client_secret_post":
        form.update(client_id=client.client_id, client_secret=client.client_secret)
        return {}
    if client.token_endpoint_auth_method == "none":
        form["client_id"] = client.client_id
        return {}
    # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding.
    pair = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}


async def token_request(
    op: OpenIDProvider, client: OPClient, form: Mapping[str, str]
) -> tuple[int, dict[str, Any]]:
    """POSTs `form` to the token endpoint with the client's authentication; (status, JSON)."""
    data = dict(form)
    headers = _client_auth(client, data)
    async with aiohttp.ClientSession() as session:
        async with session.post(op.token_endpoint, data=data, headers=headers) as response:
            return response.status, await response.json(content_type=None)


def authorize_url(
    op: OpenIDProvider,
    client: OPClient,
    *,
    scope: str,
    state: str,
    code_challenge: str,
    nonce: str | None = None,
    **extra: str,
) -> URL:
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uri,
        "scope": scope,
        "state": state,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
        **({"nonce": nonce} if nonce is not None else {}),
        **extra,
    }
    return URL(op.authorization_endpoint).with_query(query)


async def get_tokens(
    op: OpenIDProvider,
    client: OPClient,
    username: str,
    *,
    scope: str = "openid email",
    nonce: str | None = None,
) -> dict[str, Any]:
    """Runs a whole code flow with PKCE as `username`; returns the token endpoint's JSON."""
    state = secrets.token_urlsafe(16)
    verifier, challenge = pkce_pair()
    url = authorize_url(op, client, scope=scope, state=state, code_challenge=challenge, nonce=nonce)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        callback = await browser_login(session, url, username=username)
    if callback.query.get("state") != state or "code" not in callback.query:
        raise OPError(f"unexpected authorization response: {callback}")
    status, body = await token_request(
        op,
        client,
        {
            "grant_type": "authorization_code",
            "code": callback.query["code"],
            "redirect_uri": client.redirect_uri,
            "code_verifier": verifier,
        },
    )
    if status != 200:
        raise OPError(f"code exchange failed: {status} {body}")
    return body


async def refresh_tokens(
    op: OpenIDProvider, client: OPClient, refresh_token: str
) -> dict[str, Any]:
    """Runs the refresh_token grant; returns the token endpoint's JSON."""
    status, body = await token_request(
        op, client, {"grant_type": "refresh_token", "refresh_token": refresh_token}
    )
    if status != 200:
        raise OPError(f"refresh failed: {status} {body}")
    return body
