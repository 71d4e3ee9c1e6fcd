"""The status page (GET /) in a real headless Chromium, driven over the DevTools protocol.

No browser download and no extra Python package: Debian's `chromium` with `--remote-debugging-port=0`
(it writes the port it chose to `DevToolsActivePort` in its profile directory), and aiohttp's own
websocket client speaking CDP. Skipped, with the reason shown, where no chromium is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.web import create_app

TOKEN = "page-t0ken"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
    "--window-size=1280,1200",
)


@pytest.fixture
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed: the status page's browser test needs Debian's `chromium` "
                "(apt-get install chromium); .ci/run installs it")


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._pending.pop(data["id"], None) if "id" in data else None
            if future is None:
                self.events.append(data)
            elif not future.done():
                if "error" in data:
                    future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        return await asyncio.wait_for(future, 15)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate until truthy; the last value in the failure message."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r}; last value {value!r}; "
                                     f"page problems: {self.problems()}")
            await asyncio.sleep(0.1)

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && !!document.getElementById('chart')")

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and failed loads seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                args = [arg.get("value", arg.get("description")) for arg in params["args"]]
                found.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                entry = params["entry"]
                found.append(f"log {entry['level']} ({entry['source']}): {entry['text']} {entry.get('url', '')}")
        return found


@contextlib.asynccontextmanager
async def browser(binary: str, profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium in its own process group, killed (the whole group) on the way out."""
    profile.mkdir()
    log = (profile.parent / "chromium.log").open("wb")
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited early: {(profile.parent / 'chromium.log').read_text()}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                devtools = DevTools(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await devtools.send(f"{domain}.enable")
                yield devtools
    finally:
        # SIGTERM to the browser process alone lets it stop and reap its helpers; then the whole group.
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # also whatever renderer or helper is left in the group
        proc.wait(timeout=5)
        log.close()


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


async def test_status_page_goes_live_and_charts_operations(aiohttp_server, make_config, chromium, tmp_path) -> None:
    server = await aiohttp_server(create_app(make_config()))
    async with browser(chromium, tmp_path / "profile") as page, aiohttp.ClientSession() as http:
        # Nothing has started Redis yet.
        await page.open(str(server.make_url("/")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        assert await page.evaluate(text_of("state")) == "stopped"
        assert await page.evaluate(text_of("pid")) == "—"
        plugins = await page.evaluate("[...document.querySelectorAll('#plugins li')].map(li => li.textContent)")
        assert "lifecycle_subprocess" in plugins and "storage_redis" in plugins
        assert await page.evaluate(text_of("breaker")) == "closed"

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
        assert (await page.evaluate(text_of("conn-text"))).startswith("live")
        assert page.problems() == []


async def test_status_page_with_an_api_token(aiohttp_server, make_config, chromium, tmp_path) -> None:
    server = await aiohttp_server(create_app(make_config({"server": {"api_token": TOKEN}})))
    async with browser(chromium, tmp_path / "profile") as page:
        # Without a token the page loads (it holds no data) and asks for one; the status stays closed.
        await page.open(str(server.make_url("/")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'auth'")
        assert await page.evaluate("document.getElementById('token-form').hidden") is False
        assert await page.evaluate(text_of("state")) == "—"

        # Typed into the form: kept in sessionStorage and sent as a bearer token.
        await page.evaluate(f"document.getElementById('token-input').value = {TOKEN!r};"
                            "document.getElementById('token-form').requestSubmit(); true")
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        assert await page.evaluate(text_of("state")) == "stopped"
        assert await page.evaluate("sessionStorage.getItem('ondemand.apiToken')") == TOKEN
        # The browser logs the 401 answers it got before the token; nothing else went wrong.
        assert [p for p in page.problems() if "status of 401" not in p] == []

        # From ?token=: used, then removed from the address bar; no console errors from then on.
        await page.evaluate("sessionStorage.clear(); true")
        page.events.clear()
        await page.open(str(server.make_url(f"/?token={TOKEN}")))
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        assert await page.evaluate("location.search") == ""
        assert await page.evaluate("sessionStorage.getItem('ondemand.apiToken')") == TOKEN
        await page.wait_for(f"Number({CHART}.dataset.points) >= 1")
        assert page.problems() == []
