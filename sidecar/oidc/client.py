"""The relying party's calls: the authorization URL, the code exchange and the refresh grant.

authlib builds the URL and form bodies (RFC 6749 4.1, RFC 7636); client authentication is ours
because RFC 6749 2.3.1 wants the id and secret form-encoded before base64, which authlib skips.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import aiohttp
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    prepare_grant_uri,
    prepare_token_request,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]

from sidecar.config import ProviderConfig
from sidecar.errors import OAuthError, ProviderError, outside_text
from sidecar.oidc.provider import ProviderMetadata
from sidecar.streams import read_bounded

MAX_TOKEN_RESPONSE = 256 * 1024


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """What the authorization request committed to; kept server-side until the callback."""

    state: str
    nonce: str
    code_verifier: str
    redirect_uri: str
    provider: str
    offline: bool


def new_login(provider: str, redirect_uri: str, *, offline: bool) -> LoginRequest:
    return LoginRequest(
        state=secrets.token_urlsafe(32),  # 256 bits; Sync Gateway's is 160
        nonce=secrets.token_urlsafe(32),
        code_verifier=secrets.token_urlsafe(48),  # RFC 7636 4.1: 43..128 chars
        redirect_uri=redirect_uri,
        provider=provider,
        offline=offline,
    )


def authorization_url(meta: ProviderMetadata, config: ProviderConfig, login: LoginRequest) -> str:
    if not meta.authorization_endpoint:  # optional in discovery, required for this flow
        raise ProviderError("provider metadata has no authorization_endpoint")
    extra: dict[str, str] = {
        "nonce": login.nonce,
        "code_challenge": create_s256_code_challenge(login.code_verifier),
        "code_challenge_method": "S256",
    }
    if login.offline:  # Sync Gateway: offline=true adds access_type=offline&prompt=consent
        extra |= {"access_type": "offline", "prompt": "consent"}
    url: str = prepare_grant_uri(
        meta.authorization_endpoint,
        client_id=config.client_id,
        response_type="code",
        redirect_uri=login.redirect_uri,
        scope=" ".join(config.scope),
        state=login.state,
        **extra,
    )
    return url


def basic_credentials(client_id: str, secret: str) -> str:
    """RFC 6749 2.3.1: form-urlencode id and secret, then base64 `id:secret`."""
    raw = f"{quote_plus(client_id, safe='')}:{quote_plus(secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode("ascii")


def auth_method(meta: ProviderMetadata, config: ProviderConfig) -> str:
    if config.token_endpoint_auth_method != "auto":
        return config.token_endpoint_auth_method
    supported = meta.token_endpoint_auth_methods_supported or ("client_secret_basic",)
    # OIDC Discovery: the default when absent is client_secret_basic.
    return "client_secret_basic" if "client_secret_basic" in supported else "client_secret_post"


async def token_request(
    http: aiohttp.ClientSession,
    meta: ProviderMetadata,
    config: ProviderConfig,
    grant_type: str,
    **params: str,
) -> dict[str, Any]:
    """POST to the token endpoint; OAuth errors keep their wire code, transport errors are 502."""
    if config.validation_key is None:
        raise ProviderError("provider has no validation_key (client secret) configured")
    if not meta.token_endpoint:
        raise ProviderError("provider metadata has no token_endpoint")
    secret = config.validation_key.get()
    headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
    if auth_method(meta, config) == "client_secret_basic":
        headers["Authorization"] = basic_credentials(config.client_id, secret)
        body = prepare_token_request(grant_type, **params)
    else:
        body = prepare_token_request(
            grant_type, client_id=config.client_id, client_secret=secret, **params
        )
    try:
        async with http.post(
            meta.token_endpoint, data=body, headers=headers, allow_redirects=False
        ) as resp:
            status = resp.status
            raw = await read_bounded(resp.content, MAX_TOKEN_RESPONSE)
            if raw is None:
                raise ProviderError("token endpoint answer too large")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ProviderError(f"token endpoint unreachable: {type(exc).__name__}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ProviderError(f"token endpoint answered {status} without a JSON object")
    if status != 200 or "error" in data:
        # Security: both are provider text that ends up in the caller's reason.
        code = data.get("error")
        code = outside_text(code, limit=64) if isinstance(code, str) else ""
        description = data.get("error_description")
        raise OAuthError(
            code or "invalid_response",
            outside_text(description) if isinstance(description, str) else "",
        )
    if not isinstance(data.get("id_token"), str):
        raise ProviderError("token endpoint answer has no id_token")
    return data
