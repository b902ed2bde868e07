"""The few HTML pages a person in a browser sees from the sidecar itself: signed in, signed
out, sign out?, and an error with a way forward; and the redirects that move a browser on.
Every interpolated value is escaped; no page holds a token.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping

from aiohttp import web

_STYLE = (
    "body{font-family:system-ui,sans-serif;background:#f3f4f6;margin:0;color:#1f2937}"
    "main{max-width:28rem;margin:3rem auto;background:#fff;padding:2rem;border-radius:.5rem;"
    "box-shadow:0 1px 4px rgba(0,0,0,.15)}h1{font-size:1.4rem;margin-top:0}"
    "a,button{font-size:1rem}button{padding:.5rem 1rem;border-radius:.3rem;cursor:pointer;"
    "border:1px solid #9ca3af;background:#fff}form{margin-top:1.5rem}"
    ".reason{background:#fef2f2;border:1px solid #fca5a5;border-radius:.3rem;padding:.75rem;"
    "word-break:break-word}"
)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body><main>
{body}
</main></body></html>
"""


def page_headers(form_targets: Iterable[str] = ()) -> dict[str, str]:
    """The headers of every sidecar page. Security: no scripts, no framing, no referrer, no
    caching; forms may post only to this origin and to `form_targets` (origins): browsers
    apply form-action to the redirects that follow a post too (sign-out goes on to the
    provider's end_session_endpoint)."""
    form_action = " ".join(["'self'", *form_targets])
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
            f"form-action {form_action}; frame-ancestors 'none'"
        ),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def page(
    title: str,
    body: str,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    form_targets: Iterable[str] = (),
) -> web.Response:
    """A page: `title` is text (escaped here), `body` is HTML built with `esc`."""
    text = _PAGE.format(title=esc(title), style=_STYLE, body=body)
    return web.Response(
        text=text, status=status, headers={**page_headers(form_targets), **(headers or {})}
    )


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def signed_in_page(
    *,
    name: str,
    onward: str,
    logout_url: str | None,
    csrf_token: str | None,
    form_targets: Iterable[str] = (),
) -> web.Response:
    """After a login with no return target: who you are, a link onward, a sign-out button
    (a POST with the session's CSRF token; absent when no session was created)."""
    body = [f"<h1>Signed in as {esc(name)}</h1>", f'<p><a href="{esc(onward)}">Continue</a></p>']
    if logout_url is not None and csrf_token is not None:
        body.append(sign_out_form(logout_url, csrf_token))
    return page(f"Signed in as {name}", "\n".join(body), form_targets=form_targets)


def sign_out_form(action: str, csrf_token: str, *, rd: str | None = None) -> str:
    """The *Sign out* button: a POST to `/{db}/_oidc_logout` carrying the session's CSRF token
    (sidecar.browser.logout_csrf_token) and, when given, the return target `rd`."""
    fields = [("csrf", csrf_token)] + ([("rd", rd)] if rd else [])
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{esc(value)}">' for name, value in fields
    )
    return (
        f'<form method="post" action="{esc(action)}">{hidden}'
        '<button type="submit">Sign out</button></form>'
    )


def redirect(location: str) -> web.Response:
    """302 to `location` (already judged safe by the caller), never stored by a cache."""
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def error_page(
    status: int,
    error: str,
    reason: str,
    *,
    retry_url: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error for a person: the same status, error and reason an API client gets as JSON,
    and a "Try again" link when there is somewhere to try again."""
    body = [f"<h1>{esc(status)} {esc(error)}</h1>", f'<p class="reason">{esc(reason)}</p>']
    if retry_url is not None:
        body.append(f'<p><a href="{esc(retry_url)}">Try again</a></p>')
    return page(f"{status} {error}", "\n".join(body), status=status, headers=headers)
