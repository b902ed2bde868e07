"""A real browser for the tests: Debian's `chromium`, headless, driven over the Chrome DevTools
Protocol (CDP) with aiohttp's websocket client (no driver, no browser download).

    async with Chromium.launch() as chrome, chrome.page("my-test") as page:
        await page.goto("http://127.0.0.1:4984/db/doc")
        await page.fill("#username", "alice")
        await page.click("button[type=submit]")
        await page.wait_for_url(lambda url: url.endswith("/db/doc"))

When the block fails, a screenshot, the page's HTML and URL are written to ARTIFACTS (or
$BROWSER_ARTIFACTS) and their path is added to the failure as a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from base64 import b64decode
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import aiohttp

ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", Path(__file__).parents[1] / "artifacts"))
TIMEOUT = 15.0  # seconds any one wait may take

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the tests may run as root (containers, CI)
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--password-store=basic",
    # Hermetic: every host but loopback fails at once (the OP's pages @import web fonts).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1024,768",
)


def executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(Exception):
    pass


class Chromium:
    """One headless chromium process and its CDP connection."""

    def __init__(
        self, proc: subprocess.Popen[bytes], profile: str, ws: aiohttp.ClientWebSocketResponse
    ) -> None:
        self._proc = proc
        self._profile = profile
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls) -> AsyncIterator[Self]:
        path = executable()
        if path is None:
            raise BrowserError("chromium is not installed (make deps installs it)")
        profile = tempfile.mkdtemp(prefix="sidecar-chromium-")
        log = open(Path(profile) / "chromium.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        http = aiohttp.ClientSession()
        try:
            endpoint = await cls._endpoint(proc, Path(profile))
            ws = await http.ws_connect(endpoint, max_msg_size=64 * 1024 * 1024)
            browser = cls(proc, profile, ws)
            try:
                yield browser
            finally:
                await browser._close()
        finally:
            await http.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
            shutil.rmtree(profile, ignore_errors=True)

    @staticmethod
    async def _endpoint(proc: subprocess.Popen[bytes], profile: Path) -> str:
        """The browser's websocket URL, from the DevToolsActivePort file chromium writes."""
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                output = (profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise BrowserError(f"chromium exited with {proc.returncode}: {output}")
            with contextlib.suppress(FileNotFoundError):
                lines = port_file.read_text().split()
                if len(lines) == 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            await asyncio.sleep(0.05)
        raise BrowserError("chromium did not open its DevTools port")

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, session: str | None = None, **params: Any) -> Any:
        """One CDP command; its result, or BrowserError with the protocol's message."""
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_str(json.dumps(message))
        async with asyncio.timeout(TIMEOUT):
            answer = await future
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("Browser.close")
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    @contextlib.asynccontextmanager
    async def page(self, name: str) -> AsyncIterator[Page]:
        """A tab in a fresh browser context (its own cookies); artefacts if the block fails."""
        context = (await self.send("Target.createBrowserContext"))["browserContextId"]
        target = (
            await self.send("Target.createTarget", url="about:blank", browserContextId=context)
        )["targetId"]
        session = (await self.send("Target.attachToTarget", targetId=target, flatten=True))[
            "sessionId"
        ]
        page = Page(self, session)
        await page.call("Page.enable")
        await page.call("Runtime.enable")
        try:
            yield page
        except BaseException as exc:
            with contextlib.suppress(Exception):
                exc.add_note(f"browser artefacts: {await page.save_artifacts(name)}")
            raise
        finally:
            with contextlib.suppress(Exception):
                await self.send("Target.disposeBrowserContext", browserContextId=context)


class Page:
    """One tab: navigate, read, type, click — each as a person would, through the browser."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self._browser = browser
        self._session = session

    async def call(self, method: str, **params: Any) -> Any:
        return await self._browser.send(method, self._session, **params)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (DevTools evaluation: the page's
        Content-Security-Policy does not apply to it)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def _poll(self, expression: str, done: Callable[[Any], bool], what: str) -> Any:
        deadline = time.monotonic() + TIMEOUT
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await self.evaluate(expression)
            except BrowserError:  # mid-navigation: the old document is gone, the new not yet
                last = None
            if done(last):
                return last
            await asyncio.sleep(0.05)
        raise BrowserError(
            f"timed out waiting for {what} (last: {last!r}, url: {await self.url()})"
        )

    async def goto(self, url: str) -> None:
        result = await self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {result['errorText']}")
        await self.wait_for_url(lambda _: True)

    async def url(self) -> str:
        with contextlib.suppress(BrowserError):
            return str(await self.evaluate("location.href"))
        return "?"

    async def wait_for_url(self, matches: Callable[[str], bool]) -> str:
        """Until the page's URL matches and its document has been parsed."""
        state = await self._poll(
            "[location.href, document.readyState]",
            lambda v: isinstance(v, list) and v[1] != "loading" and matches(v[0]),
            "the URL",
        )
        return str(state[0])

    async def wait_for(self, selector: str) -> None:
        await self._poll(
            f"document.querySelector({json.dumps(selector)}) !== null",
            lambda v: v is True,
            f"an element {selector}",
        )

    async def wait_for_text(self, text: str) -> None:
        """Until the page shows `text` (e.g. after a form posted back to the same URL)."""
        await self._poll(
            f"document.body !== null && document.body.innerText.includes({json.dumps(text)})",
            lambda v: v is True,
            f"the text {text!r}",
        )

    async def text(self) -> str:
        return str(await self.evaluate("document.body ? document.body.innerText : ''"))

    async def fill(self, selector: str, value: str) -> None:
        """Focus the field and type `value` into it (keyboard input, not a property set)."""
        await self.wait_for(selector)
        await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.focus(); e.select && e.select(); })()"
        )
        await self.call("Input.insertText", text=value)

    async def click(self, selector: str) -> None:
        """A left click in the middle of the element, as a mouse would do it."""
        await self.wait_for(selector)
        await self._click_at(f"document.querySelector({json.dumps(selector)})")

    async def click_text(self, selector: str, text: str) -> None:
        """Click the first element matching `selector` whose visible text is `text`."""
        finder = (
            f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText.trim() === {json.dumps(text)})"
        )
        await self._poll(f"{finder} !== undefined", lambda v: v is True, f"{selector} {text!r}")
        await self._click_at(finder)

    async def _click_at(self, element: str) -> None:
        x, y = await self.evaluate(
            f"(() => {{ const e = {element}; e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];"
            " })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def save_artifacts(self, name: str) -> Path:
        """Screenshot, HTML and URL of the page now, under ARTIFACTS; returns the PNG's path."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{int(time.time())}"
        shot = await self.call("Page.captureScreenshot", format="png")
        stem.with_suffix(".png").write_bytes(b64decode(shot["data"]))
        html = await self.evaluate("document.documentElement.outerHTML")
        stem.with_suffix(".html").write_text(f"<!-- {await self.url()} -->\n{html}")
        return stem.with_suffix(".png")
