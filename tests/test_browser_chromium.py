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

import pytest
from conftest import DB, LoginHarness, builtin_provider
from support.chromium import Chromium, Page, executable
from support.op import OPClient
from test_logout_op import logout_client

pytestmark = pytest.mark.skipif(
    executable() is None, reason="chromium is not installed (make deps installs it)"
)


@pytest.fixture
async def chrome() -> AsyncIterator[Chromium]:
    async with Chromium.launch() as browser:
        yield browser


async def start_with_op(h: LoginHarness, client: OPClient) -> None:
    """The sidecar with the real OP as its provider and the demo upstream."""
    await h.start({"op": h.provider(client, user_prefix="op")}, upstream=None, demo_upstream=True)


async def to_test_provider(page: Page, h: LoginHarness, url: str) -> None:
    """Open `url`; without a session it leads to the test provider's login form."""
    await page.goto(url)
    await page.wait_for_url(lambda now: now.startswith(f"{h.test_issuer}/authorize"))
    await page.wait_for("#username")


async def sign_in_at_test_provider(page: Page, username: str) -> None:
    await page.fill("#username", username)
    await page.click_text("button", "Sign in")


async def to_op(page: Page, h: LoginHarness, url: str) -> None:
    """Open `url`; without a session (here and at the OP) it leads to the OP's login form."""
    await page.goto(url)
    await page.wait_for_url(lambda now: now.startswith(h.op.issuer))
    await page.wait_for("input[name=login]")  # a login form, not a silent re-login


async def sign_in_at_op(page: Page, username: str) -> None:
    await page.fill("input[name=login]", username)
    await page.fill("input[name=password]", "any password")
    await page.click_text("button", "Sign-in")
    await page.wait_for("input[name=prompt][value=consent]")  # the OP's consent page comes next
    await page.click_text("button", "Continue")


async def signed_out(page: Page, h: LoginHarness, url: str) -> None:
    """The sidecar's "Signed out" page is shown at `url`, and no session is left."""
    await page.wait_for_text("You are signed out.")
    assert await page.url() == url
    assert await h.stored("sessions") == 0


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
        await to_test_provider(page, harness, wanted)
        assert "Sign in" in await page.text()
        await sign_in_at_test_provider(page, "alice")
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
        await to_test_provider(page, harness, wanted)
        await page.click_text("button", "Cancel")
        await page.wait_for_url(lambda url: "/_oidc_callback" in url)
        error = await page.text()
        assert "401 Unauthorized" in error and "the user did not authenticate" in error
        await page.click_text("a", "Try again")  # back to the provider, same return target
        await page.wait_for_url(lambda url: "/_oidc_testing/authorize" in url)
        await sign_in_at_test_provider(page, "bob")
        await page.wait_for_url(lambda url: url == wanted)
        assert '"X-Forwarded-User": "test_bob"' in await page.text()

        # Straight to the login, no return target: the signed-in page, no tokens on it.
        await page.goto(f"{harness.url}/{DB}/_oidc")
        await page.wait_for_url(lambda url: "/_oidc_testing/authorize" in url)
        await sign_in_at_test_provider(page, "carol")
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
    await start_with_op(harness, harness.client())
    wanted = f"{harness.url}/{DB}/notes/today"
    async with chrome.page("op-sign-in") as page:
        await to_op(page, harness, wanted)
        await sign_in_at_op(page, "alice")
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
        await to_test_provider(page, harness, wanted)
        await sign_in_at_test_provider(page, "dora")
        await page.wait_for_url(lambda url: url == wanted)
        assert '"X-Forwarded-User": "test_dora"' in await page.text()

        await sign_out_by_confirmation(page, harness)
        await signed_out(page, harness, f"{harness.url}/{DB}/_oidc_logout")  # the POST's answer
        await to_test_provider(page, harness, wanted)  # no session: the login form again


async def test_the_signed_in_pages_sign_out_button(harness: LoginHarness, chrome: Chromium) -> None:
    await start_with_test_provider(harness)
    async with chrome.page("test-provider-sign-out-button") as page:
        await to_test_provider(page, harness, f"{harness.url}/{DB}/_oidc")
        await sign_in_at_test_provider(page, "erin")
        await page.wait_for_url(lambda url: "/_oidc_callback" in url)
        assert "Signed in as test_erin" in await page.text()
        await page.click_text("button", "Sign out")
        await signed_out(page, harness, f"{harness.url}/{DB}/_oidc_logout")
        await to_test_provider(page, harness, f"{harness.url}/{DB}/")


async def test_sign_in_then_sign_out_at_the_real_op(
    harness: LoginHarness, chrome: Chromium
) -> None:
    """Sign-out goes on through the OP's RP-initiated logout (its own confirmation) and back
    to the sidecar's done page; afterwards the OP asks for a login again (its session ended
    too, not only the sidecar's)."""
    await start_with_op(harness, logout_client(harness.op, harness.port))
    wanted = f"{harness.url}/{DB}/notes/today"
    async with chrome.page("op-sign-out") as page:
        await to_op(page, harness, wanted)
        await sign_in_at_op(page, "frank")
        await page.wait_for_url(lambda url: url == wanted)
        assert '"X-Forwarded-User": "op_frank"' in await page.text()

        await sign_out_by_confirmation(page, harness)
        # The OP's own "Do you want to sign-out" page (RP-Initiated Logout 1.0).
        await page.wait_for_url(lambda url: url.startswith(f"{harness.op.issuer}/session/end"))
        await page.click_text("button", "Yes, sign me out")
        done = f"{harness.url}/{DB}/_oidc_logout/done?"
        await page.wait_for_url(lambda url: url.startswith(done))
        await signed_out(page, harness, await page.url())
        await to_op(page, harness, wanted)
