"""Sign-in and sign-out in a real browser: headless chromium (tests/support/chromium.py) opens
a protected page of a real sidecar, is sent through the built-in test provider or the real
oidc-provider OP (typing a name, clicking the buttons), lands back on the page it asked for,
signs out (the confirmation page, or the signed-in page's button; with the OP on through its
RP-initiated logout and back) and is sent to the provider's login form again.

Skipped when chromium is not installed; `make deps` installs it. On failure a screenshot is
kept under tests/artifacts/ (the failure's note gives the path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import DB, LoginHarness
from support.chromium import Chromium, Page, executable
from test_logout_op import logout_client

pytestmark = pytest.mark.skipif(
    executable() is None, reason="chromium is not installed (make deps installs it)"
)


@pytest.fixture
async def chrome() -> AsyncIterator[Chromium]:
    async with Chromium.launch() as browser:
        yield browser


def builtin_provider(h: LoginHarness) -> dict[str, Any]:
    return {
        "issuer": h.test_issuer,
        "client_id": "sync_gateway",
        "validation_key": "any secret works",
        "register": True,
        "user_prefix": "test",
    }


async def start_with_test_provider(h: LoginHarness) -> None:
    """The sidecar as `make run` has it: the built-in test provider and the demo upstream
    (which echoes the identity headers it receives)."""
    await h.start(
        {"test": builtin_provider(h)},
        unsupported={"oidc_test_provider": {"enabled": True}},
        upstream=None,
        demo_upstream=True,
    )


async def test_sign_in_with_the_test_provider_lands_on_the_page(
    harness: LoginHarness, chrome: Chromium
) -> None:
    await start_with_test_provider(harness)
    wanted = f"{harness.url}/{DB}/docs/report?view=full"
    async with chrome.page("test-provider-sign-in") as page:
        await page.goto(wanted)
        await page.wait_for_url(lambda url: url.startswith(f"{harness.test_issuer}/authorize"))
        assert "Sign in" in await page.text()
        await page.fill("#username", "alice")
        await page.click_text("button", "Sign in")
        assert await page.wait_for_url(lambda url: url == wanted) == wanted
        shown = await page.text()
        assert '"X-Forwarded-User": "test_alice"' in shown
        assert '"path": "/db/docs/report?view=full"' in shown


async def test_signed_in_page_and_cancel_then_try_again(
    harness: LoginHarness, chrome: Chromium
) -> None:
    await start_with_test_provider(harness)
    wanted = f"{harness.url}/{DB}/page"
    async with chrome.page("test-provider-cancel") as page:
        await page.goto(wanted)
        await page.wait_for_url(lambda url: "/_oidc_testing/authorize" in url)
        await page.click_text("button", "Cancel")
        await page.wait_for_url(lambda url: "/_oidc_callback" in url)
        error = await page.text()
        assert "401 Unauthorized" in error and "the user did not authenticate" in error
        await page.click_text("a", "Try again")  # back to the provider, same return target
        await page.wait_for_url(lambda url: "/_oidc_testing/authorize" in url)
        await page.fill("#username", "bob")
        await page.click_text("button", "Sign in")
        await page.wait_for_url(lambda url: url == wanted)
        assert '"X-Forwarded-User": "test_bob"' in await page.text()

        # Straight to the login, no return target: the signed-in page, no tokens on it.
        await page.goto(f"{harness.url}/{DB}/_oidc")
        await page.wait_for_url(lambda url: "/_oidc_testing/authorize" in url)
        await page.fill("#username", "carol")
        await page.click_text("button", "Sign in")
        await page.wait_for_url(lambda url: "/_oidc_callback" in url)
        signed_in = await page.text()
        assert "Signed in as test_carol" in signed_in and "Sign out" in signed_in
        assert "eyJ" not in await page.evaluate("document.documentElement.outerHTML")
        await page.click_text("a", "Continue")
        await page.wait_for_url(lambda url: url == f"{harness.url}/{DB}/")
        assert '"X-Forwarded-User": "test_carol"' in await page.text()


async def test_sign_in_with_the_real_op_lands_on_the_page(
    harness: LoginHarness, chrome: Chromium
) -> None:
    client = harness.client()
    await harness.start(
        {"op": harness.provider(client, user_prefix="op")}, upstream=None, demo_upstream=True
    )
    wanted = f"{harness.url}/{DB}/notes/today"
    async with chrome.page("op-sign-in") as page:
        await page.goto(wanted)
        await page.wait_for_url(lambda url: url.startswith(harness.op.issuer))
        await page.fill("input[name=login]", "alice")
        await page.fill("input[name=password]", "any password")
        await page.click_text("button", "Sign-in")
        await page.wait_for("input[name=prompt][value=consent]")  # the OP's consent page comes next
        await page.click_text("button", "Continue")
        assert await page.wait_for_url(lambda url: url == wanted) == wanted
        assert '"X-Forwarded-User": "op_alice"' in await page.text()


async def sign_out_by_confirmation(page: Page, harness: LoginHarness) -> None:
    """GET /{db}/_oidc_logout (a link an app would show), then the page's Sign out button."""
    await page.goto(f"{harness.url}/{DB}/_oidc_logout")
    confirm = await page.text()
    assert "Sign out?" in confirm, confirm
    await page.click_text("button", "Sign out")


async def test_sign_in_then_sign_out_with_the_test_provider(
    harness: LoginHarness, chrome: Chromium
) -> None:
    await start_with_test_provider(harness)
    wanted = f"{harness.url}/{DB}/docs/report"
    async with chrome.page("test-provider-sign-out") as page:
        await page.goto(wanted)
        await page.wait_for_url(lambda url: url.startswith(f"{harness.test_issuer}/authorize"))
        await page.fill("#username", "dora")
        await page.click_text("button", "Sign in")
        await page.wait_for_url(lambda url: url == wanted)
        assert '"X-Forwarded-User": "test_dora"' in await page.text()

        await sign_out_by_confirmation(page, harness)
        await page.wait_for_text("You are signed out.")
        assert await page.url() == f"{harness.url}/{DB}/_oidc_logout"  # the POST's answer
        assert await harness.stored("sessions") == 0

        # The page again: no session any more, so off to the provider's login form.
        await page.goto(wanted)
        await page.wait_for_url(lambda url: url.startswith(f"{harness.test_issuer}/authorize"))
        await page.wait_for("#username")


async def test_the_signed_in_pages_sign_out_button(harness: LoginHarness, chrome: Chromium) -> None:
    await start_with_test_provider(harness)
    async with chrome.page("test-provider-sign-out-button") as page:
        await page.goto(f"{harness.url}/{DB}/_oidc")
        await page.wait_for_url(lambda url: "/_oidc_testing/authorize" in url)
        await page.fill("#username", "erin")
        await page.click_text("button", "Sign in")
        await page.wait_for_url(lambda url: "/_oidc_callback" in url)
        assert "Signed in as test_erin" in await page.text()
        await page.click_text("button", "Sign out")
        await page.wait_for_text("You are signed out.")
        assert await page.url() == f"{harness.url}/{DB}/_oidc_logout"  # the POST's answer

        await page.goto(f"{harness.url}/{DB}/")
        await page.wait_for_url(lambda url: "/_oidc_testing/authorize" in url)
        await page.wait_for("#username")


async def test_sign_in_then_sign_out_at_the_real_op(
    harness: LoginHarness, chrome: Chromium
) -> None:
    """Sign-out goes on through the OP's RP-initiated logout (its own confirmation) and back
    to the sidecar's done page; afterwards the OP asks for a login again (its session ended
    too, not only the sidecar's)."""
    client = logout_client(harness.op, harness.port)
    await harness.start(
        {"op": harness.provider(client, user_prefix="op")}, upstream=None, demo_upstream=True
    )
    wanted = f"{harness.url}/{DB}/notes/today"
    async with chrome.page("op-sign-out") as page:
        await page.goto(wanted)
        await page.wait_for_url(lambda url: url.startswith(harness.op.issuer))
        await page.fill("input[name=login]", "frank")
        await page.fill("input[name=password]", "any password")
        await page.click_text("button", "Sign-in")
        await page.wait_for("input[name=prompt][value=consent]")
        await page.click_text("button", "Continue")
        await page.wait_for_url(lambda url: url == wanted)
        assert '"X-Forwarded-User": "op_frank"' in await page.text()

        await sign_out_by_confirmation(page, harness)
        # The OP's own "Do you want to sign-out" page (RP-Initiated Logout 1.0).
        await page.wait_for_url(lambda url: url.startswith(f"{harness.op.issuer}/session/end"))
        await page.click_text("button", "Yes, sign me out")
        await page.wait_for_url(
            lambda url: url.startswith(f"{harness.url}/{DB}/_oidc_logout/done?")
        )
        await page.wait_for_text("You are signed out.")
        assert await harness.stored("sessions") == 0

        await page.goto(wanted)
        await page.wait_for_url(lambda url: url.startswith(harness.op.issuer))
        await page.wait_for("input[name=login]")  # a login form, not a silent re-login
