"""The status page (GET /) in a real headless Chromium, driven with Playwright.

No browser download: Playwright's async API launches Debian's `chromium` (`executable_path=`), never a
browser fetched by `playwright install`. Skipped, with the reason shown, where no chromium is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import ConsoleMessage, Error, Page, async_playwright

from ondemand.web import create_app, setup

TOKEN = "page-t0ken"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Playwright adds --headless and, with chromium_sandbox=False, --no-sandbox (needed as root, as here).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--disable-dev-shm-usage"]
LAUNCH_TIMEOUT_MS = 30_000
ACTION_TIMEOUT_MS = 15_000  # Playwright's own bound on navigation, locator reads, fill and click
EVALUATE_TIMEOUT_S = 15  # page.evaluate has no timeout of its own
CLOSE_TIMEOUT_S = 15


@pytest.fixture
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed: the status page's browser test needs Debian's `chromium` "
                "(apt-get install chromium); .ci/run installs it")


class StatusPage:
    """One Playwright page, and what the browser reported as wrong on it."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.found: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.found.append(f"exception: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        # Console errors and warnings, and (Playwright forwards the DevTools Log domain as console messages)
        # what the browser itself logs: failed loads, CSP violations.
        if message.type in ("error", "warning", "assert"):
            location = message.location.get("url", "")
            self.found.append(f"console.{message.type}: {message.text} {location}".rstrip())

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and failed loads seen so far."""
        return list(self.found)

    async def evaluate(self, expression: str) -> Any:
        return await asyncio.wait_for(self.page.evaluate(expression), EVALUATE_TIMEOUT_S)

    async def text(self, element_id: str) -> str:
        return (await self.page.locator(f"#{element_id}").text_content() or "").strip()

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate until truthy, every 100 ms; the last value in the failure message.

        Polled from here rather than with page.wait_for_function: some Playwright versions compile that
        predicate with eval() in the page, which the page's CSP (no 'unsafe-eval') refuses."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r}; last value {value!r}; "
                                     f"page problems: {self.problems()}")
            await asyncio.sleep(0.1)

    async def wait_for_problem(self, needle: str, timeout: float = 5.0) -> str:
        """The first problem that mentions needle, once the browser has reported it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (found := [p for p in self.found if needle in p]):
            assert loop.time() < deadline, f"no problem mentions {needle!r}: {self.found}"
            await asyncio.sleep(0.05)
        return found[0]

    async def open(self, url: str) -> None:
        await self.page.goto(url, wait_until="load")
        await self.wait_for("document.readyState === 'complete' && !!document.getElementById('chart')")


@contextlib.asynccontextmanager
async def browser(binary: str) -> AsyncIterator[StatusPage]:
    """Headless Chromium through Playwright; the browser is closed, and Playwright's driver stopped,
    on the way out (stopping the driver also kills the browser should close() not finish in time)."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=binary, headless=True, chromium_sandbox=False,
                                                    args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS)
        try:
            context = await chromium.new_context(viewport={"width": 1280, "height": 1200})
            context.set_default_timeout(ACTION_TIMEOUT_MS)
            context.set_default_navigation_timeout(ACTION_TIMEOUT_MS)
            yield StatusPage(await context.new_page())
        finally:
            # A browser that crashed fails close(); let the test's own failure be the one reported.
            with contextlib.suppress(asyncio.TimeoutError, Error):
                await asyncio.wait_for(chromium.close(), CLOSE_TIMEOUT_S)


def text_of(element_id: str) -> str:
    return f"document.getElementById({element_id!r}).textContent.trim()"


CHART = "document.getElementById('chart')"


async def test_page_files_are_open_and_self_contained(aiohttp_client, make_config) -> None:
    """No browser needed: with a token set, the page's files are served without one (the data is not),
    with a strict CSP, and they load nothing from another origin."""
    client = await aiohttp_client(create_app(make_config({"server": {"api_token": TOKEN}})))
    for path, kind in (("/", "text/html"), ("/static/status.js", "text/javascript"),
                       ("/static/status.css", "text/css")):
        resp = await client.get(path)
        assert resp.status == 200 and resp.content_type == kind, path
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        text = await resp.text()
        assert "http://" not in text and "https://" not in text, path  # no CDN, no external anything
    assert (await client.get("/api/cache/status")).status == 401
    assert (await client.get("/static/other.js")).status == 401  # only the listed files are open
    assert (await client.get("/api/cache/status", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200


async def test_status_page_goes_live_and_charts_operations(aiohttp_server, make_config, chromium) -> None:
    server = await aiohttp_server(create_app(make_config()))
    async with browser(chromium) as page, aiohttp.ClientSession() as http:
        # Nothing has started Redis yet.
        await page.open(str(server.make_url("/")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        assert await page.text("state") == "stopped"
        assert await page.text("pid") == "—"
        plugins = await page.page.locator("#plugins li").all_text_contents()
        assert "lifecycle_subprocess" in plugins and "storage_redis" in plugins
        assert await page.text("breaker") == "closed"

        # One cache operation over HTTP starts Redis; the page shows it running, with its pid.
        async with http.put(server.make_url("/api/sessions/x"), json={"user": 1}) as resp:
            assert resp.status == 200
        await page.wait_for(f"{text_of('state')} === 'running'")
        await page.wait_for(f"/^[0-9]+$/.test({text_of('pid')})")
        # The idle countdown (idle_timeout is 30 s in the tests) ticks down.
        idle = await page.wait_for(f"/^[0-9.]+ s$/.test({text_of('idle')}) && {text_of('idle')}")
        assert 0 < float(idle.split()[0]) <= 30
        await page.wait_for(f"{text_of('idle')} !== {idle!r}")
        await page.wait_for("document.querySelectorAll('#pools tr td').length >= 6")  # the session pool

        # The chart grows by one point a second, and traffic shows up as ops/s and hit ratio.
        points = int(await page.wait_for(f"Number({CHART}.dataset.points) >= 1 && {CHART}.dataset.points"))
        before = await page.evaluate(f"{CHART}.toDataURL()")

        async def traffic() -> None:
            for i in itertools.count():
                async with http.get(server.make_url("/api/sessions/x")) as resp:
                    assert resp.status == 200
                async with http.get(server.make_url(f"/api/users/u{i}/profile")) as resp:
                    assert resp.status == 404
                await asyncio.sleep(0.02)

        load = asyncio.create_task(traffic())
        try:
            await page.wait_for(f"Number({CHART}.dataset.points) >= {points + 2}")
            await page.wait_for(f"Number({CHART}.dataset.lastOps) > 1 && parseFloat({text_of('ops-now')}) > 1")
            # Each round reads one hit and one miss: about 50 %, give or take a round cut by the interval.
            # (The first interval may hold a partial round, hence a range and a wait.)
            await page.wait_for(f"/^[0-9.]+ %$/.test({text_of('hit-now')}) "
                                f"&& Math.abs(parseFloat({text_of('hit-now')}) - 50) <= 15")
        finally:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
        assert await page.evaluate(f"{CHART}.toDataURL()") != before
        assert (await page.text("conn-text")).startswith("live")
        assert page.problems() == []

        # The page's CSP holds in the browser: an injected inline script does not run, and the browser
        # reports the violation (which also shows that problems() sees what the browser logs).
        ran = await page.evaluate("(() => { const s = document.createElement('script');"
                                  " s.textContent = 'window.inlineRan = true'; document.body.append(s);"
                                  " return window.inlineRan === true; })()")
        assert ran is False
        violation = await page.wait_for_problem("Content Security Policy")
        assert "inline script" in violation and "script-src 'self'" in violation


async def test_status_page_with_an_api_token(aiohttp_server, make_config, chromium) -> None:
    server = await aiohttp_server(create_app(make_config({"server": {"api_token": TOKEN}})))
    async with browser(chromium) as page:
        # Without a token the page loads (it holds no data) and asks for one; the status stays closed.
        await page.open(str(server.make_url("/")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'auth'")
        form, field = page.page.locator("#token-form"), page.page.locator("#token-input")
        assert await form.is_visible()
        assert await field.get_attribute("type") == "password"
        assert await page.text("state") == "—"

        # Typed into the password field and submitted with the button: kept in sessionStorage, sent as a
        # bearer token, and not left in the field.
        await field.fill(TOKEN)
        await page.page.get_by_role("button", name="Use token").click()
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        assert await page.text("state") == "stopped"
        assert await page.evaluate("sessionStorage.getItem('ondemand.apiToken')") == TOKEN
        assert await field.input_value() == "" and await form.is_hidden()
        # The browser logged the 401 answers it got before the token; nothing else went wrong.
        assert any("status of 401" in p for p in page.problems()), page.problems()
        assert [p for p in page.problems() if "status of 401" not in p] == []

        # From ?token=: used, then removed from the address bar; no console errors from then on.
        await page.evaluate("sessionStorage.clear(); true")
        page.found.clear()
        await page.open(str(server.make_url(f"/?token={TOKEN}")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        assert await page.evaluate("location.search") == ""
        assert TOKEN not in page.page.url
        assert await page.evaluate("sessionStorage.getItem('ondemand.apiToken')") == TOKEN
        await page.wait_for(f"Number({CHART}.dataset.points) >= 1")
        assert page.problems() == []


async def test_status_page_under_a_prefix_of_a_users_app(aiohttp_server, make_config, chromium) -> None:
    """Mounted with `setup(app, config, routes="/ondemand")`: the page, its files and its polls all live
    below the prefix (every URL of the page is relative); the bare prefix redirects to the page, with
    ?token= kept and then removed from the address bar as usual."""
    app = web.Application()
    setup(app, make_config({"server": {"api_token": TOKEN}}), routes="/ondemand")
    server = await aiohttp_server(app)
    async with browser(chromium) as page, aiohttp.ClientSession() as http:
        await page.open(str(server.make_url(f"/ondemand?token={TOKEN}")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        assert await page.evaluate("location.pathname") == "/ondemand/"
        assert await page.evaluate("location.search") == ""
        assert await page.text("state") == "stopped"
        # A request through the prefixed API starts Redis; the page's poll (below the prefix) shows it.
        resp = await http.put(server.make_url("/ondemand/api/sessions/s1"), json={"u": 1},
                              headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 200
        await page.wait_for(f"{text_of('state')} === 'running'")
        assert await page.page.locator("footer a").get_attribute("href") == "api/openapi.json"
        assert page.problems() == []


async def test_a_page_opened_mid_incident_shows_the_minutes_before(aiohttp_server, make_config, chromium) -> None:
    """Redis cannot start (its config has a directive it refuses) and there is no durable store: the service is
    unavailable, and has been for a while when the page opens. The chart shows that time from the server's
    history (shaded), not only from the page's own polls; the error is shown whole, every line of the
    server's log tail; the server's version is shown."""
    config = make_config({"server": {"history_interval": 0.1},
                          "lifecycle": {"redis_options": {"bogus-directive": "1"}, "restart_backoff": 0.05}})
    server = await aiohttp_server(create_app(config))
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            async with http.put(server.make_url(f"/api/users/u{i}/profile"), json={"n": i}) as resp:
                assert resp.status == 200 and resp.headers["Ondemand-Write"] == "dropped"
            await asyncio.sleep(0.1)
        async with http.get(server.make_url("/api/cache/history")) as resp:
            samples = (await resp.json())["samples"]
        assert sum(1 for s in samples if s["readiness"] == "unavailable") >= 3, samples
    async with browser(chromium) as page:
        await page.open(str(server.make_url("/")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        # Drawn at once, before the page could have polled that often itself (one poll a second).
        await page.wait_for(f"Number({CHART}.dataset.historyPoints) >= 3")
        assert int(await page.evaluate(f"{CHART}.dataset.incidents")) >= 3
        error = await page.evaluate("document.getElementById('redis-error').textContent")
        assert "last lines of" in error and "FATAL CONFIG FILE ERROR" in error and "Bad directive" in error
        assert error.count("\n") >= 3  # shown as lines (white-space: pre-wrap), not run together
        assert await page.evaluate("getComputedStyle(document.getElementById('redis-error')).whiteSpace") == \
            "pre-wrap"
        assert re.fullmatch(r"Valkey [0-9.]+ \(binary\)|Redis [0-9.]+ \(binary\)", await page.text("redis-version"))
        assert page.problems() == []


async def test_the_page_shows_the_server_versions(aiohttp_server, durable_config, chromium) -> None:
    server = await aiohttp_server(create_app(durable_config()))
    async with browser(chromium) as page, aiohttp.ClientSession() as http:
        async with http.put(server.make_url("/api/sessions/v"), json={"v": 1}) as resp:  # starts both stores
            assert resp.status == 200
        await page.open(str(server.make_url("/")))
        await page.wait_for(f"/^(Valkey|Redis) [0-9.]+$/.test({text_of('redis-version')})")
        await page.wait_for(f"/^PostgreSQL [0-9.]+$/.test({text_of('durable-version')})")
        assert page.problems() == []


async def test_the_page_shows_get_or_compute_once_it_loaded_something(aiohttp_server, make_config, chromium) -> None:
    from ondemand.web import RUNTIME

    app = create_app(make_config())
    server = await aiohttp_server(app)
    async with browser(chromium) as page:
        await page.open(str(server.make_url("/")))
        await page.wait_for(f"{text_of('state')} !== ''")
        assert await page.page.evaluate("document.getElementById('aside-card').hidden")  # nothing loaded yet

        async def loader() -> str:
            await asyncio.sleep(0.02)
            return "v"

        rt = app[RUNTIME]
        await asyncio.gather(*(rt.cache.get_or_compute("profile", "p", loader, ttl=60) for _ in range(3)))
        await page.wait_for("!document.getElementById('aside-card').hidden")
        first_row = "document.querySelector('#aside tr')"
        row = await page.wait_for(f"{first_row} && {first_row}.innerText")
        assert row.split("\t")[:2] == ["profile", "1"] and row.split("\t")[3] == "2"  # one load, two joins
        assert page.problems() == []
